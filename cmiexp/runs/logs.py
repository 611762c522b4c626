"""The run's own logs, part of the run-directory contract (written by the training runner).

* ``train_log.jsonl``  every ``trainer.log_every`` steps: ``{"step", "train/loss", "train/lr",
  "train/<objective term>"...}``
* ``metrics.jsonl``    every evaluation: ``{"step", "epoch", "lr", "dev/<metric>"...}`` (dev metrics,
  ``dev/cmi`` among them for classification)
* ``curves.png``       those curves drawn once at the end of a run (``cmiexp.report.curves``)
"""

from __future__ import annotations

import math
from pathlib import Path

from cmiexp.io import read_jsonl

TRAIN_LOG = "train_log.jsonl"
EVAL_LOG = "metrics.jsonl"
CURVES = "curves.png"


def read_curve(run_dir: str | Path, key: str) -> list[tuple[int, float]]:
    """(step, value) of ``key`` (``train/loss``, ``dev/accuracy``...) from the log that holds it, in
    step order; entries without a finite number are left out, and a step logged twice (a resumed
    run re-evaluating) keeps its last value."""
    log = TRAIN_LOG if key.startswith("train/") else EVAL_LOG
    points: dict[int, float] = {}
    for rec in read_jsonl(Path(run_dir) / log):
        step, v = rec.get("step"), rec.get(key)
        if isinstance(step, int) and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            points[step] = float(v)
    return sorted(points.items())
