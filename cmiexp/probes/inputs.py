"""What a FlowNIB probe job reads before it loads anything: its settings (``objective.*``), the
run it probes (``objective.source``) and the probe runs it is compared with (``objective.compare``).

Everything here reads config values and files only (no torch, no model), so ``cmiexp.jobs.run_job``
checks a probe's inputs in about a second and a wrong path or value fails before the libraries of
the probe itself are imported; ``cmiexp.probes.run_probe`` uses the same functions.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from cmiexp.checks import FRACTION, NON_NEGATIVE, POSITIVE, POSITIVE_INT, SEED, Number, check_number, check_settings
from cmiexp.config import CONF_DIR
from cmiexp.errors import ConfigError
from cmiexp.runs.results import ResultsUnreadable, load_results, read_results, results_path

POOLING_CHOICES = ("mean", "cls", "last", "head")
# The probe's settings are the keys of conf/objective/flownib.yaml, their one home (defaults included).
SETTINGS: tuple[str, ...] = tuple(k for k in OmegaConf.load(CONF_DIR / "objective" / "flownib.yaml")
                                  if k not in ("name", "probe"))
COMPAT_CHOICES = ("ours", "reference")
# Types and ranges of the probe's numeric settings (cmiexp.checks' one rule and message format).
PROBE_SCHEMA: dict[str, Number] = {
    "steps": POSITIVE_INT, "batch_size": Number("int", 2), "hidden": POSITIVE_INT, "record_every": POSITIVE_INT,
    "select_every": POSITIVE_INT, "max_samples": Number("int", 4, nullable=True, null_means="the whole split"),
    "subsample_seed": SEED, "heldout_fraction": FRACTION, "test_fraction": FRACTION,
    "noise_std": Number("float", 0, nullable=True, null_means="no added noise"), "lr": POSITIVE,
    "delta": NON_NEGATIVE, "tau": POSITIVE, "weight_decay": NON_NEGATIVE,
}


def probe_settings(objective_cfg) -> dict[str, Any]:
    """The probe's knobs from ``cfg.objective`` (every one of ``SETTINGS``), checked one by one."""
    # A plain dict may still hold OmegaConf nodes (e.g. a ListConfig compare list): convert it all.
    raw = OmegaConf.to_container(OmegaConf.create(dict(objective_cfg or {})), resolve=True)
    missing = [k for k in SETTINGS if k not in raw]
    if missing:
        raise ConfigError(f"objective.{missing[0]} is not set (objective=flownib; conf/objective/flownib.yaml sets it)")
    s = {k: raw[k] for k in SETTINGS}
    if s["pooling"] not in POOLING_CHOICES:
        raise ConfigError(f"objective.pooling={s['pooling']!r}; valid choices: {', '.join(POOLING_CHOICES)}")
    for key, spec in PROBE_SCHEMA.items():
        s[key] = check_number(f"objective.{key}", s[key], spec)
    if s["heldout_fraction"] + s["test_fraction"] >= 1.0:
        raise ConfigError(f"objective.heldout_fraction + objective.test_fraction must be < 1, got "
                          f"{s['heldout_fraction']} + {s['test_fraction']}")
    if s["compat"] not in COMPAT_CHOICES:
        raise ConfigError(f"objective.compat={s['compat']!r}; valid choices: {', '.join(COMPAT_CHOICES)}")
    compare = s["compare"]
    if compare is None:
        compare = []
    if isinstance(compare, str):
        compare = [compare]
    if not isinstance(compare, (list, tuple)):
        raise ConfigError(f"objective.compare={compare!r} must be a list of probe run directories or flownib.json files")
    s["compare"] = [str(c) for c in compare]
    s["split"] = str(s["split"])
    return s


@dataclass
class ProbeSource:
    """What is probed: a finished run's ``checkpoint/best`` (``run_dir`` set) or the baseline."""

    run_dir: Path | None = None
    checkpoint: Path | None = None
    config: dict | None = None  # the source run's resolved config.yaml
    results: dict | None = None

    @property
    def untrained(self) -> bool:
        return self.run_dir is None

    def describe(self) -> dict[str, Any]:
        if self.untrained:
            return {"kind": "untrained"}
        c, r = self.config or {}, self.results or {}
        return {"kind": "run", "run_dir": str(self.run_dir.resolve()), "checkpoint": str(self.checkpoint.resolve()),
                "task": r.get("task") or group_name(c, "task"), "model": r.get("model") or group_name(c, "model"),
                "objective": r.get("objective") or group_name(c, "objective"),
                "head": group_name(c, "head") or "pooling", "peft": group_name(c, "peft") or "none",
                "seed": r.get("seed", c.get("seed")), "experiment": r.get("experiment") or c.get("experiment_name"),
                "best": (r.get("best") or {}).get("metrics")}


def group_name(cfg: dict, group: str) -> str | None:
    node = (cfg or {}).get(group)
    if isinstance(node, dict):
        node = node.get("name")
    return None if node is None else str(node)


def resolve_source(source, cfg) -> ProbeSource:
    """Check ``objective.source`` against the probe's config; one-line ConfigError on any mismatch.

    Reads files only (no model is loaded), so a wrong path fails fast."""
    if source in (None, "", "null"):
        return ProbeSource()
    import yaml

    given = str(source)
    p = Path(given).expanduser()
    key = f"objective.source={given}"
    if not p.exists():
        raise ConfigError(f"{key}: no such run directory; give a finished cmiexp run directory "
                          "(with checkpoint/best), or objective.source=null to probe the untrained model")
    if not p.is_dir():
        raise ConfigError(f"{key} is not a directory; give a finished cmiexp run directory (with checkpoint/best)")
    # Also accept the run's checkpoint/best folder itself.
    if p.name == "best" and p.parent.name == "checkpoint" and (p.parents[1] / "config.yaml").is_file():
        p = p.parents[1]
    cfg_file = p / "config.yaml"
    if not cfg_file.is_file():
        raise ConfigError(f"{key} has no config.yaml: not a cmiexp run directory")
    try:
        src_cfg = yaml.safe_load(cfg_file.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{key}: cannot read {cfg_file}: {str(e).splitlines()[0]}") from None
    if not isinstance(src_cfg, dict):
        raise ConfigError(f"{key}: {cfg_file} is not a run config")
    try:
        results = load_results(p)
    except FileNotFoundError:
        results = None
    except (OSError, ResultsUnreadable) as e:
        raise ConfigError(f"{key}: {results_path(p)}: {e}") from None
    if (src_cfg.get("objective") or {}).get("probe"):
        raise ConfigError(f"{key} is itself a probe run; point to the run that trained the model")
    if results is not None and results.get("status") != "completed":
        raise ConfigError(f"{key}: the source run has status {results.get('status')!r}, not completed; "
                          "finish it first (re-run its command)")
    if (src_cfg.get("task") or {}).get("max_length") is None:  # the probe tokenizes as the run did
        raise ConfigError(f"{key}: {cfg_file} has no task.max_length (not a classification or regression run)")
    ckpt = p / "checkpoint" / "best"
    if not ((ckpt / "config.json").is_file() or (ckpt / "cmiexp_head.json").is_file()):
        raise ConfigError(f"{key} has no checkpoint/best (trained with trainer.save_best=false, or not finished)")
    # The probe's run directory and report row are named by task, model and head: they must be the source's.
    checks = (("task", group_name(src_cfg, "task"), cfg.task.get("name")),
              ("model", group_name(src_cfg, "model"), cfg.model.get("name")),
              ("head", group_name(src_cfg, "head") or "pooling", cfg.head.name))
    for group, theirs, ours in checks:
        if theirs is not None and str(theirs) != str(ours):
            what = "trained on" if group == "task" else "trained with"
            raise ConfigError(f"{key} was {what} {group}={theirs}, but this probe has {group}={ours}; "
                              f"use {group}={theirs} (it names the probe's run directory and report row)")
    return ProbeSource(run_dir=p, checkpoint=ckpt, config=src_cfg, results=results)


def compare_label(results: dict | None, fallback: str) -> str:
    r = results or {}
    src = r.get("source") or {}
    what = src.get("objective") if src.get("kind") == "run" else ("untrained" if src else None)
    model = r.get("model")
    if not model:
        return fallback
    return f"{model} ({what})" if what else str(model)


def load_compare_entries(entries: list[str]) -> list[tuple[str, dict, dict | None]]:
    """(label, flownib dict, results.json or None) for every ``objective.compare`` entry: a probe
    run directory or a flownib.json file."""
    out = []
    for given in entries:
        p = Path(given).expanduser()
        f = p / "flownib.json" if p.is_dir() else p
        if not f.is_file():
            raise ConfigError(f"objective.compare entry {given}: no flownib.json there (give a finished probe run "
                              "directory or a flownib.json file)")
        try:
            d = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"objective.compare entry {given}: cannot read {f}: {e}") from None
        if not isinstance(d, dict) or "layers" not in d:
            raise ConfigError(f"objective.compare entry {given}: {f} is not a FlowNIB result")
        res = read_results(f.parent)
        out.append((compare_label(res, f.parent.name), d, res))
    return out


def refuse_distributed() -> None:
    """A probe runs in one process (it caches one model's activations and fits its critics)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("objective=flownib runs in one process; start it without torchrun/accelerate launch")


def check_probe_inputs(cfg: DictConfig) -> tuple[dict[str, Any], ProbeSource, list]:
    """(settings, source, compare entries) of a probe job, each checked; ConfigError naming the key
    or file on the first problem. Also checks the task/model/head/peft numbers (``cmiexp.checks``),
    the task's local files and that the task is one a probe reads (classification or regression)."""
    from cmiexp.data import check_task_files
    from cmiexp.train.adapters import has_own_adapter  # a registry of names: no training code

    refuse_distributed()
    if has_own_adapter(cfg.task.get("loader")):  # tasks with their own adapter (cot: generation)
        raise ConfigError(f"objective=flownib probes classification and regression tasks; task={cfg.task.name} "
                          "is not one")
    check_settings(cfg)
    check_task_files(cfg.task)
    settings = probe_settings(cfg.objective)
    source = resolve_source(settings["source"], cfg)
    return settings, source, load_compare_entries(settings["compare"])


__all__ = ["COMPAT_CHOICES", "POOLING_CHOICES", "PROBE_SCHEMA", "SETTINGS", "ProbeSource", "check_probe_inputs",
           "compare_label", "group_name", "load_compare_entries", "probe_settings", "refuse_distributed",
           "resolve_source"]
