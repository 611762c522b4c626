"""Regression targets: normalised for training, reported in the original scale.

``normalize_task_targets(task, method)`` rescales every split's ``label`` column with statistics
of the *training* split only and records them in ``task.extra["target_scale"]``::

    {"method": "zscore" | "minmax", "shift": m, "scale": s}      y_train = (y - shift) / scale

Evaluation (``cmiexp.train.evaluate.metrics_from_predictions``) maps predictions and labels back
with ``denormalize`` before computing MSE/MAE/Pearson/Spearman, so reported numbers are in the
dataset's own units. Unlabelled rows (NaN) stay NaN.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from cmiexp.errors import ConfigError, DataError

NORMALIZERS = ("none", "zscore", "minmax")


def target_stats(values, method: str) -> dict[str, Any]:
    """(shift, scale) of finite training targets: z-score = (mean, population std), min-max = (min, max - min)."""
    if method not in NORMALIZERS or method == "none":
        raise ConfigError(f"task.normalize_targets={method!r}; valid choices: {', '.join(NORMALIZERS)}")
    y = np.asarray(values, dtype=np.float64).reshape(-1)
    y = y[np.isfinite(y)]
    if y.size < 2:
        raise DataError(f"cannot normalise regression targets: {y.size} finite training label(s)")
    if method == "zscore":
        shift, scale = float(y.mean()), float(y.std())
    else:
        shift, scale = float(y.min()), float(y.max() - y.min())
    if not (scale > 0 and math.isfinite(scale)):
        raise DataError("cannot normalise regression targets: every training label has the same value")
    return {"method": method, "shift": shift, "scale": scale}


def normalize(values, stats: dict) -> np.ndarray:
    return (np.asarray(values, dtype=np.float64) - stats["shift"]) / stats["scale"]


def denormalize(values, stats: dict):
    """Inverse of ``normalize``; works on numpy arrays and torch tensors alike."""
    return values * stats["scale"] + stats["shift"]


def _rescale_split(ds, stats: dict):
    if ds is None:
        return None
    import datasets

    new = normalize(ds["label"][:], stats).astype(np.float32)
    feats = ds.features.copy()
    feats["label"] = datasets.Value("float32")
    return ds.remove_columns("label").add_column("label", new.tolist(), feature=feats["label"])


def normalize_task_targets(task, method: str | None):
    """Normalise a regression task's labels in place (no-op for classification, ``None``/``"none"``,
    or a task already normalised). Returns the task."""
    if method is None or str(method) == "none" or not getattr(task, "is_regression", False):
        return task
    if "target_scale" in task.extra:
        return task
    stats = target_stats(task.train["label"][:], str(method))
    task.train = _rescale_split(task.train, stats)
    task.eval_splits = {a: _rescale_split(d, stats) for a, d in task.eval_splits.items()}
    task.test = _rescale_split(task.test, stats)
    if isinstance(task.extra.get("test_splits"), dict):
        task.extra["test_splits"] = {a: _rescale_split(d, stats) for a, d in task.extra["test_splits"].items()}
    task.extra["target_scale"] = stats
    return task


__all__ = ["NORMALIZERS", "denormalize", "normalize", "normalize_task_targets", "target_stats"]
