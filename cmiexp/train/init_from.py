"""Start a run from a finished run's weights (``trainer.init_from``), and the CE starting model
that ``objective=mcmi`` fine-tunes by default (``objective.start=ce``).

``trainer.init_from=<run dir | checkpoint folder>`` loads the weights of that checkpoint (model and
head) into this run's freshly built model before PEFT is applied, and tokenises with the
checkpoint's own tokenizer (the one its weights were trained with). The checkpoint must fit: the
same task, labels, model, head kind, and a full (``peft=none``) model; every mismatch is a one-line
``ConfigError`` naming ``trainer.init_from``, raised before any training.

``objective.start=ce`` (the MCMI reference recipe: train with CE, compute Q_y from the trained
model, then fine-tune with CE - lam * KL for a short schedule): unless ``trainer.init_from`` is set,
the run first trains, or reuses, a CE model with its own settings (``objective`` replaced by
``ce``, plus ``objective.start_config``) in ``paths.teachers_dir/<task>/<model>/ce/<hash12>``, the
same content-hashed folder a KD teacher with that config gets, so a CE KD teacher and the MCMI
teacher's starting model are one run. It is provisioned by ``cmiexp.runs.provision`` (trained
in a separate process, no shared RNG, Accelerate or Hydra state with this one, under a file lock);
then this run's ``trainer.init_from`` points at it and its length becomes
``objective.finetune_epochs`` / ``objective.finetune_max_steps``.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from cmiexp.errors import CmiexpError, ConfigError

log = logging.getLogger("cmiexp")

KEY = "trainer.init_from"
START_CHOICES = ("ce", "pretrained")
#: Keys ``objective.start_config`` may not set: the CE starting model is trained on this run's task,
#: data, model and paths with objective=ce (anything else could not be fine-tuned by this run).
START_FORBIDDEN = ("task", "paths", "model", "objective", "head", "peft", "hydra")


# ---------------------------------------------------------------------------------------------
# trainer.init_from: resolve, check, load
# ---------------------------------------------------------------------------------------------
def resolve_init(cfg: DictConfig, task, kind: str = "classification"):
    """The checkpoint named by ``trainer.init_from`` (a ``cmiexp.objectives.kd.teacher.TeacherInfo``), checked
    against this run; None when the key is unset."""
    path = (cfg.get("trainer") or {}).get("init_from")
    if path in (None, "", "null"):
        return None
    from cmiexp.objectives.kd.teacher import load_teacher_info

    info = load_teacher_info(str(path), key=KEY)
    check_init_compatible(info, cfg, task, kind)
    return info


def check_init_compatible(info, cfg: DictConfig, task, kind: str = "classification") -> None:
    """Refuse a checkpoint this run cannot start from (one-line ConfigError naming the key)."""
    from cmiexp.models.heads import head_name
    from cmiexp.objectives.kd.teacher import check_output_layout

    where = info.run_dir or info.checkpoint_dir
    fix = "point trainer.init_from at a run of this task and model (or unset it)"
    if info.task and info.task != task.name:
        raise ConfigError(f"{KEY}: {where} was trained on task={info.task}, but this run is task={task.name}; {fix}")
    run_cfg = info.run_config or {}
    if info.run_dir is not None and info.model and info.model != cfg.model.name:
        raise ConfigError(f"{KEY}: {where} was trained with model={info.model}, but this run uses "
                          f"model={cfg.model.name}; {fix}")
    peft = (run_cfg.get("peft") or {}).get("name", "none") if isinstance(run_cfg.get("peft"), Mapping) else "none"
    if peft != "none":
        raise ConfigError(f"{KEY}: {where} was trained with peft={peft}; starting from it needs a fully "
                          "fine-tuned model (peft=none)")
    if kind != "classification":
        return
    mine = head_name(cfg)
    if info.head != mine:
        raise ConfigError(f"{KEY}: {where} has a head={info.head} model, but this run uses head={mine}; {fix}")
    check_output_layout(info, task, KEY, str(where), fix)


def load_init_weights(model, info, load) -> None:
    """Copy every weight of the checkpoint into ``model`` (strict: the same parameter names and
    shapes). ``load(dir)`` builds the checkpoint's model through ``from_pretrained`` (safetensors,
    no pickles); ``model`` keeps its own config (e.g. ``model.dropout``)."""
    try:
        source = load(str(info.checkpoint_dir))
    except (OSError, ValueError, CmiexpError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{KEY}: cannot load {info.checkpoint_dir}: {first}") from e
    try:
        missing, unexpected = model.load_state_dict(source.state_dict(), strict=False)
    except RuntimeError as e:  # shape mismatch
        first = str(e).strip().splitlines()
        detail = next((line.strip() for line in first if "size mismatch" in line), first[0] if first else "")
        raise ConfigError(f"{KEY}: {info.checkpoint_dir} does not fit model={getattr(model, 'name_or_path', '')} "
                          f"({detail[:200]})") from e
    if missing or unexpected:
        names = ", ".join(list(missing)[:3] + list(unexpected)[:3])
        raise ConfigError(f"{KEY}: {info.checkpoint_dir} does not fit this run's model "
                          f"({len(missing)} missing and {len(unexpected)} unexpected weights, e.g. {names})")
    del source
    log.info("starting from the weights of %s", info.run_dir or info.checkpoint_dir)


# ---------------------------------------------------------------------------------------------
# objective.start=ce: the CE starting model of objective=mcmi
# ---------------------------------------------------------------------------------------------
def start_run_config(cfg: DictConfig) -> DictConfig:
    """The resolved config of the CE run that ``cfg`` (with ``objective.start=ce``) starts from:
    this run's config with ``objective`` replaced by ``conf/objective/ce.yaml``, no init_from, and
    ``objective.start_config`` applied."""
    from omegaconf.errors import OmegaConfBaseException

    from cmiexp.config import CONF_DIR
    from cmiexp.runs.provision import flatten_items

    extra = cfg.objective.get("start_config") or {}
    extra = OmegaConf.to_container(extra, resolve=True) if isinstance(extra, DictConfig) else extra
    if not isinstance(extra, Mapping):
        raise ConfigError(f"objective.start_config must be a mapping of overrides, got {extra!r}")
    base = OmegaConf.to_container(cfg, resolve=True)
    base["objective"] = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "objective" / "ce.yaml"))
    base.setdefault("trainer", {})["init_from"] = None
    out = OmegaConf.create(base)
    for key, value in flatten_items("", extra):
        if key.split(".")[0] in START_FORBIDDEN:
            raise ConfigError(f"objective.start_config.{key.split('.')[0]} is not allowed: the CE starting model is trained on "
                              "this run's task, data, model and paths with objective=ce")
        if OmegaConf.select(out, key, default="__missing__") == "__missing__":
            raise ConfigError(f"objective.start_config.{key}: not a key of the run config")
        try:
            OmegaConf.update(out, key, value, merge=True)
        except OmegaConfBaseException as e:
            raise ConfigError(f"objective.start_config.{key}: cannot set it ({type(e).__name__})") from e
    return out


def ensure_start_model(scfg: DictConfig) -> tuple[Path, str]:
    """Train the CE run ``scfg`` into its content-hashed folder unless a completed one is there
    (``cmiexp.runs.provision``: a separate process, under the lock a KD teacher with the same
    config uses too). Returns (folder, "trained" | "reused")."""
    from cmiexp.runs.provision import provision

    try:
        got = provision(scfg, ["objective=ce"], "CE starting model")
    except CmiexpError as e:
        raise CmiexpError(f"objective.start=ce: {e}; or pass trainer.init_from=PATH") from e
    return got.run_dir, got.source


def _positive(cfg: DictConfig, key: str, default, allow_minus_one: bool = False):
    raw = cfg.objective.get(key, default)
    if raw is None:
        return None
    try:
        v = int(raw)
    except (TypeError, ValueError):
        raise ConfigError(f"objective.{key}={raw!r} must be an integer") from None
    if v <= 0 and not (allow_minus_one and v == -1):
        raise ConfigError(f"objective.{key}={raw!r} must be positive{' (or -1 = off)' if allow_minus_one else ''}")
    return v


def prepare_start(cfg: DictConfig, run_dir: Path) -> DictConfig:
    """Apply ``objective.start``: return the config to run (a copy when it changes anything)."""
    start = cfg.objective.get("start")
    if start is None or str(start) == "pretrained":
        return cfg
    if str(start) not in START_CHOICES:
        raise ConfigError(f"objective.start={start!r}; valid choices: {', '.join(START_CHOICES)}")
    if cfg.trainer.get("init_from") not in (None, "", "null"):
        return cfg  # an explicit starting point wins; its schedule is trainer.*
    epochs = _positive(cfg, "finetune_epochs", 1)
    max_steps = _positive(cfg, "finetune_max_steps", -1, allow_minus_one=True)
    from cmiexp.runs import read_results

    prior = read_results(run_dir)
    if prior and prior.get("status") == "completed" and str(cfg.trainer.resume).lower() == "auto":
        return cfg  # the run itself is done: nothing to train (the runner reports it)
    scfg = start_run_config(cfg)
    from cmiexp.runs.provision import finished_run, provisioned_dir

    d = provisioned_dir(scfg)
    if finished_run(d):
        log.info("objective=%s fine-tunes a trained CE model (objective.start=ce): reusing %s", cfg.objective.name, d)
    else:
        log.info("objective=%s fine-tunes a trained CE model (objective.start=ce; trainer.init_from=PATH skips "
                 "this): training it first (objective=ce, this run's settings) into %s", cfg.objective.name, d)
    d, _ = ensure_start_model(scfg)
    out = copy.deepcopy(cfg)
    with open_dict(out):
        out.trainer.init_from = str(d.resolve())
        if epochs is not None:
            out.trainer.epochs = epochs
        if max_steps is not None:
            out.trainer.max_steps = max_steps
    log.info("objective=%s: fine-tuning %s for %s", cfg.objective.name, d,
             f"{out.trainer.max_steps} steps" if int(out.trainer.max_steps) > 0 else f"{out.trainer.epochs} epoch(s)")
    return out
