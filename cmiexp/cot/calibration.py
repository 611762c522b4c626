"""Expected calibration error (equal-width bins), as reported for MI-CoT students."""

from __future__ import annotations

import numpy as np


def expected_calibration_error(confidences, correct, n_bins: int = 10) -> float:
    """ECE = sum_k (n_k / N) * |acc_k - conf_k| over ``n_bins`` equal-width bins of [0, 1].

    Bin k (k = 1..n_bins) holds the confidences in ``((k-1)/n_bins, k/n_bins]``; the first bin
    is closed on the left so a confidence of exactly 0 lands in it. This is the same binning as
    ``ceil(conf * n_bins)`` in the MI-CoT evaluation code, with 0 sent to bin 1 instead of
    failing. ``acc_k`` is the fraction of correct predictions in the bin, ``conf_k`` the mean
    confidence; empty bins contribute nothing.

    ``confidences``: probabilities in [0, 1] (e.g. the student's sequence or answer-token
    probability); ``correct``: booleans or 0/1 of the same length. Raises ValueError on empty
    input, mismatched lengths, values outside [0, 1] or NaN.
    """
    conf = np.asarray(confidences, dtype=np.float64).reshape(-1)
    corr = np.asarray(correct, dtype=np.float64).reshape(-1)
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    if conf.size == 0:
        raise ValueError("expected_calibration_error needs at least one prediction")
    if conf.shape != corr.shape:
        raise ValueError(f"confidences ({conf.size}) and correct ({corr.size}) differ in length")
    if np.isnan(conf).any() or (conf < 0).any() or (conf > 1).any():
        raise ValueError("confidences must be probabilities in [0, 1]")
    if not np.isin(corr, (0.0, 1.0)).all():
        raise ValueError("correct must hold booleans or 0/1")
    # Bin index 0..n_bins-1 of the right-closed interval containing each confidence.
    bins = np.clip(np.ceil(conf * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    total = 0.0
    for k in range(n_bins):
        in_bin = bins == k
        n_k = int(in_bin.sum())
        if n_k:
            total += n_k * abs(corr[in_bin].mean() - conf[in_bin].mean())
    return float(total / conf.size)
