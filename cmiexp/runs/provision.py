"""Provisioned runs: a finished run for a resolved config, reused by content hash or trained now.

Some runs need another run first: a KD student its teacher (``objective.teacher_config``), an
MCMI run the CE model it fine-tunes (``objective.start=ce``). Both go through ``provision``:

* the run's folder is ``<paths.teachers_dir>/<task>/<model>/<objective>/<hash12>`` where the hash
  covers the resolved config minus the keys that do not change what is trained (``provision_hash``),
  so every run that asks for the same training finds the same folder (a CE KD teacher and the MCMI
  teacher's starting model are one run);
* a folder holding a completed run (``finished_run``) is reused as it is;
* otherwise a ``filelock`` on ``<parent>/.<hash12>.lock`` is taken (a second process asking for the
  same run waits there, then finds it finished), the resolved config is written to
  ``provision_config.yaml`` and the run is trained by a separate ``cmiexp`` process
  (``python -m cmiexp.train.run_resolved <folder>``): it shares no RNG, Accelerate or Hydra state
  with the process that asked, and holds the folder's own run lock (its pid is in ``.lock.owner``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from cmiexp.errors import CmiexpError
from cmiexp.io import atomic_write_json, atomic_write_text
from cmiexp.runs.lock import waiting_lock
from cmiexp.runs.results import read_results

log = logging.getLogger("cmiexp")

#: Keys left out of the hash: they name or report a run but do not change what is trained.
HASH_EXCLUDED = ("experiment_name", "paths", "logger", "hydra")
HASH_EXCLUDED_TRAINER = ("resume", "stop_after_steps", "progress_bar", "num_workers", "log_every", "collapse_share")
HASH_LEN = 12
#: The resolved config the child trains, and a description of the run (hash, overrides, config).
CONFIG_FILE = "provision_config.yaml"
SPEC_FILE = "teacher_spec.json"
#: The module the child process runs (``python -m``); it lives with the trainer it calls.
CHILD_MODULE = "cmiexp.train.run_resolved"
#: Files that make ``checkpoint/best`` a loadable model: a transformers config, or a prompt head's.
CHECKPOINT_MARKERS = ("config.json", "cmiexp_head.json")
#: Environment of a distributed launch: the child trains as one plain process.
DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "GROUP_WORLD_SIZE",
            "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT")
DIST_ENV_PREFIXES = ("ACCELERATE_", "TORCHELASTIC_")


@dataclass
class Provisioned:
    """A finished run: where it is, whether this call trained it, and how long that took."""

    run_dir: Path
    source: str  # "trained" | "reused"
    train_time_s: float | None = None


def flatten_items(prefix: str, value: Any) -> list[tuple[str, Any]]:
    """Nested mappings as (dotted key, leaf value) pairs, in order (an empty mapping gives none)."""
    if isinstance(value, Mapping):
        out: list[tuple[str, Any]] = []
        for k, v in value.items():
            out += flatten_items(f"{prefix}.{k}" if prefix else str(k), v)
        return out
    return [(prefix, value)]


def hashed_content(cfg: DictConfig) -> dict:
    """The part of a resolved config that decides what is trained (what the hash covers)."""
    c = OmegaConf.to_container(cfg, resolve=True)
    for k in HASH_EXCLUDED:
        c.pop(k, None)
    for k in HASH_EXCLUDED_TRAINER:
        c.get("trainer", {}).pop(k, None)
    return c


def _drop_none(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _drop_none(v) for k, v in node.items() if v is not None}
    if isinstance(node, list):
        return [_drop_none(v) for v in node]
    return node


def provision_hash(cfg: DictConfig) -> str:
    """12 hex digits of the hashed content. Null-valued keys are left out, so a release that adds a
    new option defaulting to null (= off) does not orphan the runs trained before it."""
    blob = json.dumps(_drop_none(hashed_content(cfg)), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:HASH_LEN]


def provisioned_dir(cfg: DictConfig) -> Path:
    """``<teachers_dir>/<task>/<model>/<objective>/<hash12>``."""
    root = Path(str(cfg.paths.teachers_dir)).expanduser()
    return root / str(cfg.task.name) / str(cfg.model.name) / str(cfg.objective.name) / provision_hash(cfg)


def finished_run(d: str | os.PathLike) -> bool:
    """A completed results.json and a loadable ``checkpoint/best``: the one test of "finished"
    shared by KD teachers and starting models."""
    d = Path(d)
    res = read_results(d)
    best = d / "checkpoint" / "best"
    return bool(res and res.get("status") == "completed" and any((best / m).is_file() for m in CHECKPOINT_MARKERS))


def child_env() -> dict:
    """This process's environment minus a distributed launch's variables (the child is one process)."""
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV and not k.startswith(DIST_ENV_PREFIXES)}
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def provision(cfg: DictConfig, overrides: list[str], what: str) -> Provisioned:
    """The finished run of ``cfg`` (a resolved config), trained now in a child process unless its
    folder already holds one. ``overrides`` are recorded as the run's own in its results.json;
    ``what`` names the run in messages ("KD teacher", "CE starting model")."""
    d = provisioned_dir(cfg)
    if finished_run(d):
        return Provisioned(d, "reused")
    with waiting_lock(d.parent / f".{d.name}.lock", f"waiting for {d} (another process is training this {what})"):
        if finished_run(d):  # trained by the process we waited for
            return Provisioned(d, "reused")
        d.mkdir(parents=True, exist_ok=True)
        atomic_write_text(d / CONFIG_FILE, OmegaConf.to_yaml(cfg, resolve=True))
        atomic_write_json(d / SPEC_FILE, {"hash": d.name, "overrides": list(overrides), "config": hashed_content(cfg)})
        log.info("training the %s (%s/%s on %s) in a separate process into %s", what, cfg.model.name,
                 cfg.objective.name, cfg.task.name, d)
        t0 = time.time()
        proc = subprocess.run([sys.executable, "-m", CHILD_MODULE, str(d)], env=child_env())
        if proc.returncode != 0 or not finished_run(d):
            res = read_results(d) or {}
            why = res.get("error") or f"exit status {proc.returncode}"
            raise CmiexpError(f"training the {what} in {d} failed ({why}); see {d}/cmiexp.log, fix it and re-run")
        elapsed = time.time() - t0
        log.info("%s trained in %.1f s: %s", what, elapsed, d)
        return Provisioned(d, "trained", elapsed)


def read_spec(d: str | os.PathLike) -> dict | None:
    try:
        data = json.loads((Path(d) / SPEC_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
