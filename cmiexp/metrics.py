"""Evaluation metrics for classification and regression tasks (scikit-learn / scipy), and the
expected calibration error reported for chain-of-thought students.

``compute_metrics(names, predictions, references)`` returns plain Python floats so results
can go straight into JSON. ``METRIC_HIGHER_IS_BETTER`` tells model selection which direction
is an improvement.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import numpy as np
from scipy import stats
from sklearn import metrics as skm

from cmiexp.errors import ConfigError, DataError


def _accuracy(p: np.ndarray, r: np.ndarray) -> float:
    return skm.accuracy_score(r, p)


def _f1(p: np.ndarray, r: np.ndarray) -> float:
    # GLUE reports F1 of the positive class (MRPC "equivalent", QQP "duplicate" = id 1);
    # zero_division=0 gives 0.0 (not a warning + NaN) when no positive is predicted or present.
    return skm.f1_score(r, p, average="binary", pos_label=1, zero_division=0)


def _macro_f1(p: np.ndarray, r: np.ndarray) -> float:
    return skm.f1_score(r, p, average="macro", zero_division=0)


def _mcc(p: np.ndarray, r: np.ndarray) -> float:
    # sklearn already returns 0.0 when a row or column of the confusion matrix is empty.
    return skm.matthews_corrcoef(r, p)


def _is_constant(x: np.ndarray) -> bool:
    return x.size == 0 or bool(np.all(x == x.flat[0]))


def _pearson(p: np.ndarray, r: np.ndarray) -> float:
    # A correlation with a constant vector is undefined (0/0). A model that predicts one value
    # for everything carries no ranking information, so we report 0.0 instead of NaN: NaN would
    # poison model selection (every comparison with NaN is False) and JSON reports.
    if len(p) < 2 or _is_constant(p) or _is_constant(r):
        return 0.0
    return stats.pearsonr(p.astype(np.float64), r.astype(np.float64))[0]


def _spearman(p: np.ndarray, r: np.ndarray) -> float:
    # Same reasoning as _pearson: constant input -> 0.0 rather than NaN.
    if len(p) < 2 or _is_constant(p) or _is_constant(r):
        return 0.0
    return stats.spearmanr(p.astype(np.float64), r.astype(np.float64))[0]


def _mse(p: np.ndarray, r: np.ndarray) -> float:
    return skm.mean_squared_error(r.astype(np.float64), p.astype(np.float64))


def _mae(p: np.ndarray, r: np.ndarray) -> float:
    return skm.mean_absolute_error(r.astype(np.float64), p.astype(np.float64))


_METRICS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "accuracy": _accuracy,
    "f1": _f1,
    "macro_f1": _macro_f1,
    "matthews_correlation": _mcc,
    "pearson": _pearson,
    "spearman": _spearman,
    "mse": _mse,
    "mae": _mae,
}

METRIC_HIGHER_IS_BETTER: dict[str, bool] = {
    "accuracy": True,
    "f1": True,
    "macro_f1": True,
    "matthews_correlation": True,
    "pearson": True,
    "spearman": True,
    "mse": False,
    "mae": False,
}

VALID_METRICS: tuple[str, ...] = tuple(_METRICS)


def check_metric_names(names: Iterable[str], key: str = "metrics") -> None:
    """Raise ConfigError naming ``key`` if any metric name is unknown."""
    bad = [n for n in names if n not in _METRICS]
    if bad:
        raise ConfigError(
            f"unknown metric {', '.join(map(repr, bad))} in {key}; "
            f"valid metrics: {', '.join(VALID_METRICS)}"
        )


def is_improvement(name: str, new: float, best: float | None) -> bool:
    """True if ``new`` beats ``best`` for metric ``name`` (any value beats ``None``)."""
    check_metric_names([name])
    if best is None:
        return True
    return new > best if METRIC_HIGHER_IS_BETTER[name] else new < best


def compute_metrics(names: list[str], predictions: Any, references: Any) -> dict[str, float]:
    """Compute each named metric of ``predictions`` against ``references``.

    Predictions are class ids for classification metrics and floats for regression metrics
    (lists, numpy arrays or CPU tensors). Returns ``{name: float}`` in the order of ``names``.
    """
    check_metric_names(names)
    p = np.asarray(predictions).reshape(-1)
    r = np.asarray(references).reshape(-1)
    if p.shape != r.shape:
        raise DataError(
            f"cannot compute metrics: {p.size} predictions but {r.size} references"
        )
    if p.size == 0:
        raise DataError("cannot compute metrics on an empty set of predictions")
    return {n: float(_METRICS[n](p, r)) for n in names}


# Calibration of generated answers (MI-CoT reports it for its students).
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
