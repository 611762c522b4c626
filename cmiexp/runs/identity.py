"""Run identity: a hash of the resolved training config.

Two commands that train the same thing (``trainer.lr=1e-3`` or ``0.001``, a relative or absolute
``task.data_dir``, an overlay that sets nothing new) resolve to the same config and so share a run
directory; two that train different things never do, whatever overrides or overlays produced them.
Keys that do not change what is trained (where files go, logging, progress, resume/stop flags,
checkpoint cadence and retention) are left out of the hash.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

# Dotted keys (and whole subtrees) that do not change the trained model or its metrics.
IDENTITY_EXCLUDED_KEYS = (
    "hydra",
    "paths",                      # where outputs, caches and teachers live
    "logger",                     # trackers only observe
    "experiment_name",            # already the first readable part of the run directory
    "optimized_metric",           # what a sweeper reads back, not what is trained
    "trainer.resume",
    "trainer.stop_after_steps",
    "trainer.progress_bar",
    "trainer.num_workers",
    "trainer.pin_memory",         # where loader batches live before the copy, not what they hold
    "trainer.log_every",
    "trainer.save_every",         # resume is exact whatever the checkpoint cadence
    "trainer.checkpoint_retention",
    "trainer.collapse_share",     # only the threshold of the collapse warning
)
# Keys whose values are file-system paths: a relative path that exists is made absolute, so the
# same folder spelled two ways is one identity.
PATH_KEYS = ("data_dir", "name_or_path", "teacher", "source", "compare", "init_from")
IDENTITY_VERSION = 1
HASH_LEN = 8
#: Digits of a KD teacher's hash in its students' folder names and results.json ``teacher.hash``.
TEACHER_HASH_LEN = 8


def _excluded(dotted: str) -> bool:
    return any(dotted == k or dotted.startswith(k + ".") for k in IDENTITY_EXCLUDED_KEYS)


def _norm_path(value: Any) -> Any:
    if isinstance(value, str) and value and "://" not in value:
        p = Path(value).expanduser()
        if p.is_absolute() or p.exists():
            return os.path.normpath(str(p.absolute()))
    return value


def _normalise(node: Any, prefix: str = "", key: str = "") -> Any:
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            dotted = f"{prefix}.{k}" if prefix else str(k)
            if not _excluded(dotted):
                out[str(k)] = _normalise(v, dotted, str(k))
        return out
    if isinstance(node, (list, tuple)):
        return [_normalise(v, prefix, key) for v in node]
    if isinstance(node, float) and node.is_integer():
        return int(node)  # 1.0 and 1 train the same
    if key in PATH_KEYS:
        return _norm_path(node)
    return node


def identity_config(cfg: DictConfig | dict) -> dict:
    """The resolved config minus the keys that do not change training, paths made absolute."""
    if isinstance(cfg, DictConfig):
        # Resolve key by key: the excluded subtrees (hydra, paths, logger) are never resolved, so
        # this works inside Hydra's own resolution of hydra.run.dir without recursing into it.
        data = {}
        for k in cfg.keys():
            if _excluded(str(k)):
                continue
            node = cfg[k]
            data[str(k)] = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
    else:
        data = dict(cfg)
    return _normalise(data)


def config_hash(cfg: DictConfig | dict) -> str:
    """A short, stable hash of ``identity_config(cfg)`` (8 hex digits)."""
    return hash_of_identity(identity_config(cfg))


def hash_of_identity(identity: dict) -> str:
    """The hash of an identity dict (as stored in run_config.json)."""
    blob = json.dumps({"v": IDENTITY_VERSION, "config": identity}, sort_keys=True, separators=(",", ":"),
                      default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:HASH_LEN]


def run_id_resolver(*, _root_: DictConfig) -> str:
    """``${cmiexp_run_id:}`` in hydra.run.dir / hydra.sweep.subdir: the hash of the job's config."""
    if "task" not in _root_:
        raise ValueError("cmiexp_run_id needs the whole job config (resolve hydra.run.dir from the job config)")
    return hash_of_identity(identity_config(_root_))


def teacher_folder_suffix(teacher_objective: str, teacher_hash: str) -> str:
    """What a KD student's run directory adds after ``seed<N>-<hash>``: ``-from-<objective>-<hash8>``,
    so the folder names the teacher it was distilled from (``${cmiexp_teacher_tag:}``)."""
    safe = "".join(c if c.isalnum() or c in "_." else "_" for c in str(teacher_objective))
    return f"-from-{safe}-{str(teacher_hash)[:TEACHER_HASH_LEN]}"


def flatten(d: Any, prefix: str = "") -> dict:
    if isinstance(d, dict):
        out = {}
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        if not d and prefix:
            out[prefix] = {}
        return out
    return {prefix: d}


_ABSENT = "<absent>"


def diff_configs(old: dict, new: dict) -> list[tuple[str, Any, Any]]:
    """(dotted key, old value, new value) for every key whose value differs; config-group choices
    (``objective.name``...) first, as they explain the rest, then by key."""
    a, b = flatten(old), flatten(new)
    keys = sorted(set(a) | set(b), key=lambda k: (not k.endswith(".name"), k))
    return [(k, a.get(k, _ABSENT), b.get(k, _ABSENT)) for k in keys
            if a.get(k, _ABSENT) != b.get(k, _ABSENT)]
