"""What a report column is: metric specs, task names and their order, and the pure statistics.

Shared by every part of the report (collect, tables, render, html); holds no I/O.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from cmiexp.errors import ConfigError

DASH = "—"

GLUE_ORDER = ("cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli")
GLUE_HEADERS = {
    "cola": "CoLA",
    "sst2": "SST-2",
    "mrpc": "MRPC",
    "stsb": "STS-B",
    "qqp": "QQP",
    "mnli": "MNLI",
    "qnli": "QNLI",
    "rte": "RTE",
    "wnli": "WNLI",
}
# Sanh et al. 2019, Table 1 conventions; every GLUE task not listed uses accuracy.
GLUE_DEFAULT_METRICS = {
    "cola": "matthews_correlation",
    "stsb": "mean(pearson,spearman)",
}
# Scores in [0, 1] (or [-1, 1]) that papers print x100; errors and CMI values stay unscaled.
SCALED_METRICS = frozenset(
    {
        "accuracy",
        "mismatched_accuracy",
        "f1",
        "macro_f1",
        "matthews_correlation",
        "pearson",
        "spearman",
        "exact_match",
    }
)
BASELINE_OBJECTIVE = "ce"


def mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (ddof=1) of ``values``.

    Returns ``(None, None)`` for no values and ``(mean, None)`` for one value, since a sample
    std of a single seed is undefined (printing 0.0 would claim a certainty we do not have).
    """
    n = len(values)
    if n == 0:
        return None, None
    mean = math.fsum(values) / n
    if n == 1:
        return mean, None
    var = math.fsum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var)

_NAME_RE = re.compile(r"^[A-Za-z0-9_.\-/]+$")


@dataclass(frozen=True)
class MetricSpec:
    """A report metric: one metric name, or the mean of several (``mean(pearson,spearman)``)."""

    parts: tuple[str, ...]

    @property
    def name(self) -> str:
        if len(self.parts) == 1:
            return self.parts[0]
        return "mean(" + ",".join(self.parts) + ")"

    @property
    def scaled(self) -> bool:
        """True when the value is a GLUE-style score printed x100."""
        return all(p in SCALED_METRICS for p in self.parts)

    def value(self, metrics: Mapping[str, Any] | None) -> float | None:
        """The metric from a run's metrics dict, or None when a part is absent or not finite."""
        if not metrics:
            return None
        vals = []
        for p in self.parts:
            v = metrics.get(p)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                return None
            vals.append(float(v))
        return math.fsum(vals) / len(vals)


def parse_metric_spec(text: str) -> MetricSpec:
    """Parse ``accuracy`` or ``mean(pearson, spearman)``; raise ConfigError otherwise."""
    s = str(text).strip()
    m = re.fullmatch(r"mean\((.*)\)", s)
    parts = [p.strip() for p in m.group(1).split(",")] if m else [s]
    if not parts or any(not p or not _NAME_RE.match(p) for p in parts):
        raise ConfigError(f"invalid metric {text!r}: expected a metric name or mean(a,b,...)")
    # A mean does not depend on the order of its parts; one canonical form lets reference
    # columns match regardless of how a user wrote it.
    return MetricSpec(tuple(sorted(set(parts))) if m else tuple(parts))


def task_key(task: str) -> str:
    """Column key of a task: the GLUE short name (``glue/sst-2`` -> ``sst2``) or the full name."""
    t = str(task).strip()
    base = t.lower()
    if base.startswith("glue/"):
        base = base[len("glue/") :]
    short = base.replace("-", "").replace("_", "")
    if short in GLUE_HEADERS and ("/" not in base):
        return short
    return t


def task_header(key: str) -> str:
    return GLUE_HEADERS.get(key, key)


def task_sort_key(key: str) -> tuple[int, int, str]:
    if key in GLUE_ORDER:
        return (0, GLUE_ORDER.index(key), "")
    return (1, 0, key)


def one_line(msg: Any, limit: int = 300) -> str:
    text = " ".join(str(msg).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def opt_str(v: Any) -> str | None:
    if v is None:
        return None
    s = str(v).strip()
    return s or None


def opt_int(v: Any) -> int | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    if isinstance(v, float) and v.is_integer():
        return int(v)
    if isinstance(v, str) and re.fullmatch(r"-?\d+", v.strip()):
        return int(v)
    return None

