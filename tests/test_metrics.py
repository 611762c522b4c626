"""compute_metrics against hand-worked values and direct scikit-learn / scipy calls."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from scipy import stats
from sklearn import metrics as skm

from cmiexp.errors import ConfigError, DataError
from cmiexp.metrics import (
    METRIC_HIGHER_IS_BETTER,
    VALID_METRICS,
    compute_metrics,
    is_improvement,
)

# Fixed binary predictions (written out, not generated).
REFS = [0, 1, 1, 0, 1, 1, 0, 0, 1, 1, 0, 1]
PREDS = [0, 1, 0, 0, 1, 1, 1, 0, 1, 0, 1, 1]

# Fixed 3-class predictions.
REFS3 = [0, 1, 2, 2, 1, 0, 0, 2, 1, 1]
PREDS3 = [0, 2, 2, 2, 1, 0, 1, 0, 1, 1]

# Fixed regression predictions (STS-B-like scores).
SREFS = [4.8, 0.2, 3.1, 2.5, 1.0, 3.9, 4.4, 0.7]
SPREDS = [4.1, 0.9, 2.6, 3.0, 1.5, 3.5, 4.9, 0.1]


def test_binary_metrics_match_sklearn():
    got = compute_metrics(["accuracy", "f1", "macro_f1", "matthews_correlation"], PREDS, REFS)
    assert got["accuracy"] == pytest.approx(skm.accuracy_score(REFS, PREDS))
    assert got["f1"] == pytest.approx(skm.f1_score(REFS, PREDS, pos_label=1))
    assert got["macro_f1"] == pytest.approx(skm.f1_score(REFS, PREDS, average="macro"))
    assert got["matthews_correlation"] == pytest.approx(skm.matthews_corrcoef(REFS, PREDS))
    assert list(got) == ["accuracy", "f1", "macro_f1", "matthews_correlation"]


def test_multiclass_metrics_match_sklearn():
    got = compute_metrics(["accuracy", "macro_f1", "matthews_correlation"], PREDS3, REFS3)
    assert got["accuracy"] == pytest.approx(skm.accuracy_score(REFS3, PREDS3))
    assert got["macro_f1"] == pytest.approx(skm.f1_score(REFS3, PREDS3, average="macro"))
    assert got["matthews_correlation"] == pytest.approx(skm.matthews_corrcoef(REFS3, PREDS3))
    assert got["accuracy"] == pytest.approx(0.7)  # 7 of 10 correct, counted by hand


def test_regression_metrics_match_scipy_sklearn():
    got = compute_metrics(["pearson", "spearman", "mse", "mae"], SPREDS, SREFS)
    assert got["pearson"] == pytest.approx(stats.pearsonr(SPREDS, SREFS)[0])
    assert got["spearman"] == pytest.approx(stats.spearmanr(SPREDS, SREFS)[0])
    assert got["mse"] == pytest.approx(skm.mean_squared_error(SREFS, SPREDS))
    assert got["mae"] == pytest.approx(skm.mean_absolute_error(SREFS, SPREDS))


def test_hand_computed_binary_case():
    # refs 1 1 0 0, preds 1 0 0 0: TP=1 FN=1 FP=0 TN=2.
    got = compute_metrics(
        ["accuracy", "f1", "macro_f1", "matthews_correlation"], [1, 0, 0, 0], [1, 1, 0, 0]
    )
    assert got["accuracy"] == pytest.approx(3 / 4)
    # precision 1/1, recall 1/2 -> F1 = 2 * 1 * 0.5 / 1.5 = 2/3
    assert got["f1"] == pytest.approx(2 / 3)
    # class 0: precision 2/3, recall 1 -> F1 0.8; class 1: 2/3; mean = 11/15
    assert got["macro_f1"] == pytest.approx((0.8 + 2 / 3) / 2)
    # MCC = (TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = 2 / sqrt(1*2*2*3)
    assert got["matthews_correlation"] == pytest.approx(2 / math.sqrt(12))


def test_hand_computed_regression_case():
    # preds 1 2 3 4, refs 1 3 2 4: squared errors 0 1 1 0, abs errors 0 1 1 0.
    got = compute_metrics(["pearson", "spearman", "mse", "mae"], [1.0, 2.0, 3.0, 4.0], [1.0, 3.0, 2.0, 4.0])
    assert got["mse"] == pytest.approx(0.5)
    assert got["mae"] == pytest.approx(0.5)
    # deviations (-1.5,-.5,.5,1.5) vs (-1.5,.5,-.5,1.5): sum xy = 4, sum x^2 = sum y^2 = 5 -> 0.8
    assert got["pearson"] == pytest.approx(0.8)
    assert got["spearman"] == pytest.approx(0.8)  # ranks equal the values here


def test_constant_inputs_give_zero_correlation_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = compute_metrics(["pearson", "spearman", "mse"], [2.0, 2.0, 2.0], [1.0, 2.0, 3.0])
        assert got["pearson"] == 0.0 and got["spearman"] == 0.0
        assert got["mse"] == pytest.approx((1 + 0 + 1) / 3)
        got = compute_metrics(["pearson", "spearman"], [1.0, 2.0, 3.0], [4.0, 4.0, 4.0])
        assert got == {"pearson": 0.0, "spearman": 0.0}
        # A one-class prediction: F1 of the positive class is 0, MCC is 0.
        got = compute_metrics(["f1", "matthews_correlation", "accuracy"], [0, 0, 0, 0], [1, 0, 1, 0])
        assert got == {"f1": 0.0, "matthews_correlation": 0.0, "accuracy": 0.5}


def test_returns_plain_python_floats_for_arrays_and_tensors():
    got = compute_metrics(list(VALID_METRICS[:4]), np.array(PREDS), torch.tensor(REFS))
    assert all(type(v) is float for v in got.values())
    got = compute_metrics(["pearson", "mse"], torch.tensor(SPREDS), np.array(SREFS, dtype=np.float32))
    assert all(type(v) is float for v in got.values())
    assert got["mse"] == pytest.approx(skm.mean_squared_error(SREFS, SPREDS), rel=1e-6)


def test_unknown_metric_lists_valid_names():
    with pytest.raises(ConfigError) as ei:
        compute_metrics(["accuracy", "bleu"], [0], [0])
    msg = str(ei.value)
    assert "'bleu'" in msg and "\n" not in msg
    for name in ("accuracy", "f1", "macro_f1", "matthews_correlation", "pearson", "spearman", "mse", "mae"):
        assert name in msg


def test_length_mismatch_and_empty_are_refused():
    with pytest.raises(DataError, match="3 predictions but 2 references"):
        compute_metrics(["accuracy"], [0, 1, 1], [0, 1])
    with pytest.raises(DataError, match="empty"):
        compute_metrics(["accuracy"], [], [])


def test_direction_table():
    assert set(METRIC_HIGHER_IS_BETTER) == set(VALID_METRICS) == {
        "accuracy", "f1", "macro_f1", "matthews_correlation", "pearson", "spearman", "mse", "mae"
    }
    assert METRIC_HIGHER_IS_BETTER["mse"] is False and METRIC_HIGHER_IS_BETTER["mae"] is False
    assert all(METRIC_HIGHER_IS_BETTER[m] for m in VALID_METRICS if m not in ("mse", "mae"))
    assert is_improvement("accuracy", 0.8, 0.7) and not is_improvement("accuracy", 0.7, 0.7)
    assert is_improvement("mse", 0.1, 0.2) and not is_improvement("mse", 0.3, 0.2)
    assert is_improvement("mae", 5.0, None)
