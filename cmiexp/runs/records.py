"""What a run records about its config, and the resume compatibility check.

* ``run_config.json`` (in the run directory and in ``checkpoint/latest``): ``{"hash", "config"}``,
  the identity config (``identity.identity_config``) the run was trained with.
* ``<runs root>/index.jsonl``: one line per run directory claimed, mapping its hash to the
  directory and the overrides as typed.
* ``.hydra/``: Hydra's three files, written by cmiexp only once a run claims the directory (Hydra's
  own writing is switched off with ``hydra.output_subdir: null``) so a refused run changes nothing.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from cmiexp.errors import RunRefused
from cmiexp.io import append_jsonl, atomic_write_json, atomic_write_text, read_jsonl
from cmiexp.runs.identity import diff_configs, hash_of_identity, identity_config

RUN_CONFIG = "run_config.json"
INDEX = "index.jsonl"


def run_config_record(cfg: DictConfig | dict) -> dict:
    """``{"hash", "config", "num_processes"}``. The process count is not in the config (it comes
    from the launcher) but changes the global batch, so a resume checks it too."""
    ident = identity_config(cfg)
    return {"hash": hash_of_identity(ident), "config": ident,
            "num_processes": int(os.environ.get("WORLD_SIZE", "1") or 1)}


def read_run_config(path: str | Path) -> dict | None:
    """A run_config.json (or the folder holding one), or None."""
    p = Path(path)
    p = p / RUN_CONFIG if p.is_dir() else p
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("config"), dict) else None


def write_run_config(folder: str | Path, record: dict) -> None:
    atomic_write_json(Path(folder) / RUN_CONFIG, record)


def _fmt(v) -> str:
    s = json.dumps(v, default=str) if not isinstance(v, str) else v
    return s if len(s) <= 60 else s[:57] + "..."


def check_resume_compatible(run_dir: str | Path, record: dict, checkpoint_dir: str | Path | None = None) -> None:
    """Refuse (``RunRefused``) to continue a run directory trained with another config.

    Compares with the directory's run_config.json, else the checkpoint's; a legacy directory with
    neither is not checked here (the checkpoint's own task/model check still applies)."""
    run_dir = Path(run_dir)
    old = read_run_config(run_dir)
    where = run_dir / RUN_CONFIG
    if old is None and checkpoint_dir is not None:
        old = read_run_config(checkpoint_dir)
        where = Path(checkpoint_dir) / RUN_CONFIG
    if old is None:
        return
    procs_new = record["num_processes"]
    procs_old = old.get("num_processes", procs_new)  # records written before it was stored: not checked
    if old.get("hash") == record["hash"] and old["config"] == record["config"] and procs_old == procs_new:
        return
    diffs = diff_configs(old["config"], record["config"])
    if procs_old != procs_new:
        diffs.append(("num_processes (launcher)", procs_old, procs_new))
    if not diffs:
        return
    shown = "; ".join(f"{k}: {_fmt(a)} -> {_fmt(b)}" for k, a, b in diffs[:8])
    more = f"; and {len(diffs) - 8} more" if len(diffs) > 8 else ""
    raise RunRefused(f"resume refused: {run_dir} was trained with a different config ({where.name} hash "
                     f"{old.get('hash')}, now {record['hash']}): {shown}{more}; nothing was changed, "
                     "use another run directory")


def append_index(root: str | Path, record: dict, run_dir: str | Path, overrides: list[str]) -> None:
    """Add ``run_dir`` to ``<root>/index.jsonl`` unless it is already listed with this hash."""
    root, run_dir = Path(root), Path(run_dir)
    index = root / INDEX
    try:
        rel = str(run_dir.resolve().relative_to(root.resolve()))
    except ValueError:
        rel = str(run_dir.resolve())
    if any(r.get("hash") == record["hash"] and r.get("run_dir") == rel for r in read_jsonl(index)):
        return
    append_jsonl(index, {"hash": record["hash"], "run_dir": rel, "overrides": list(overrides),
                         "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})


def write_hydra_files(run_dir: str | Path, task_cfg: DictConfig, hydra_cfg: DictConfig, overrides) -> None:
    """The files Hydra writes to ``<run_dir>/.hydra`` (same content), written when the run claims it."""
    out = Path(run_dir) / ".hydra"
    atomic_write_text(out / "config.yaml", OmegaConf.to_yaml(task_cfg))
    atomic_write_text(out / "hydra.yaml", OmegaConf.to_yaml(hydra_cfg))
    atomic_write_text(out / "overrides.yaml", OmegaConf.to_yaml(overrides))
