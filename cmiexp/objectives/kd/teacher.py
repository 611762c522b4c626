"""KD teachers: resolve, validate, provision (train on demand or reuse), load.

A teacher is given to ``objective=kd`` either as a path (``objective.teacher``: a finished run
directory or a ``save_pretrained`` folder) or as a config (``objective.teacher_config``: overrides
of a teacher run on the student's task). A config teacher is provisioned by
``cmiexp.runs.provision``: it lives in ``paths.teachers_dir/<task>/<model>/<objective>/<hash12>``,
where the hash covers the resolved teacher config (minus keys that do not change what is
trained), so every student that asks for the same teacher finds the same directory (a sweep over
student seeds trains each teacher once); it is trained by a separate cmiexp process, under a
file lock that concurrent students wait on.

The student's run directory and results.json name the teacher (``teacher_record``):
``seed<N>-<hash>-from-<teacher objective>-<teacher hash8>`` and ``"teacher": {"objective",
"hash", "run_dir"}``.

Command line (trains, or finds, the teacher of a KD config and prints its folder)::

    python -m cmiexp.objectives.kd experiment=mcmi_kd task=glue/rte objective.teacher_config.objective=mcmi
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from omegaconf import DictConfig, OmegaConf

from cmiexp.errors import CmiexpError, ConfigError
from cmiexp.models.heads import HEAD_CONFIG
from cmiexp.runs.identity import TEACHER_HASH_LEN, teacher_folder_suffix
from cmiexp.runs.provision import (HASH_LEN, finished_run, flatten_items, provision, provision_hash,
                                   provisioned_dir)

log = logging.getLogger("cmiexp")

#: Config groups a ``teacher_config`` key may choose (``objective: mcmi``).
GROUP_KEYS = ("model", "objective", "trainer", "logger", "experiment")
#: Keys a teacher config may not set: the teacher is trained on the student's task and paths.
FORBIDDEN_KEYS = ("task", "paths", "hydra")
#: Trainer keys copied from the student unless the teacher config sets them.
INHERITED_TRAINER_KEYS = ("progress_bar", "num_workers", "log_every", "cpu", "mixed_precision")
#: A prompt-head checkpoint (cmiexp.models.heads): backbone/ + head weights + this description.
PROMPT_HEAD_FILE = HEAD_CONFIG
#: The objective named for a bare checkpoint (no run metadata says how it was trained).
UNKNOWN_OBJECTIVE = "checkpoint"


# ---------------------------------------------------------------------------------------------
# Teacher description and compatibility
# ---------------------------------------------------------------------------------------------
@dataclass
class TeacherInfo:
    """Where a teacher is and what it was trained for."""

    checkpoint_dir: Path  # the save_pretrained folder (model + tokenizer)
    run_dir: Path | None  # its run directory, when it came from one
    task: str | None  # task name it was trained on (None if unknown: a bare checkpoint)
    objective: str | None
    model: str | None
    num_labels: int
    label_names: list[str] | None  # from config.json id2label, None when only generic LABEL_i
    is_regression: bool
    head: str = "pooling"  # pooling | masking | generation (prompt heads append a prompt to each input)
    run_config: dict | None = None  # the teacher run's config.yaml, when known
    target_scale: dict | None = None  # regression target normalisation it trained with (results.json)
    source: str = "path"  # path | trained | reused
    train_time_s: float | None = None
    config_hash: str | None = None

    def describe(self) -> dict[str, Any]:
        return {"dir": str(self.run_dir or self.checkpoint_dir), "checkpoint": str(self.checkpoint_dir),
                "task": self.task, "objective": self.objective, "model": self.model, "source": self.source,
                "config_hash": self.config_hash, "train_time_s": self.train_time_s}


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _read_yaml(path: Path) -> dict | None:
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None
    return data if isinstance(data, dict) else None


def _name(node: Any) -> str | None:
    if isinstance(node, dict):
        node = node.get("name")
    return str(node) if isinstance(node, (str, int)) and not isinstance(node, bool) else None


def load_teacher_info(path: str | os.PathLike, key: str = "objective.teacher") -> TeacherInfo:
    """Describe the teacher at ``path`` (a run directory or a save_pretrained folder).

    Raises ConfigError (naming ``key``) when there is no usable checkpoint there."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ConfigError(f"{key}={path}: no such file or directory; give a finished run directory "
                          "(with checkpoint/best) or a save_pretrained checkpoint folder")
    def is_ckpt(d: Path) -> bool:
        return (d / "config.json").is_file() or (d / PROMPT_HEAD_FILE).is_file()

    if is_ckpt(p / "checkpoint" / "best"):
        ckpt, run_dir = p / "checkpoint" / "best", p
    elif is_ckpt(p):
        ckpt = p
        # checkpoint/best inside a run directory: read the run's metadata too.
        run_dir = p.parents[1] if p.parent.name == "checkpoint" and (p.parents[1] / "config.yaml").is_file() else None
    else:
        hint = " (the run has no checkpoint/best yet: has it finished?)" if (p / "config.yaml").is_file() else ""
        raise ConfigError(f"{key}={path} holds no teacher checkpoint{hint}: expected a finished run directory "
                          "with checkpoint/best, or a save_pretrained folder with config.json")
    if not any(ckpt.glob("*.safetensors")):
        # transformers would fall back to the pickle file, or (with no usable weights) silently
        # initialise a random teacher; cmiexp loads safetensors only.
        pickles = sorted(f.name for f in ckpt.glob("*.bin"))
        found = f"only pickle weights ({', '.join(pickles)})" if pickles else "no weights"
        raise ConfigError(f"{key}={path}: {ckpt} holds {found}; cmiexp loads safetensors weights only: "
                          "re-save the model with save_pretrained(..., safe_serialization=True)")
    task = objective = model = cfg = target_scale = None
    if run_dir is not None:
        from cmiexp.runs import read_results

        res = read_results(run_dir)
        if res is not None and res.get("status") not in (None, "completed"):
            raise ConfigError(f"{key}={path}: the teacher run has status {res.get('status')!r}, not completed; "
                              "finish it first (re-run its command) or point to another teacher")
        cfg = _read_yaml(run_dir / "config.yaml") or {}
        res = res or {}
        target_scale = res.get("target_scale")
        task = res.get("task") or _name(cfg.get("task"))
        objective = res.get("objective") or _name(cfg.get("objective"))
        model = res.get("model") or _name(cfg.get("model"))
    head = "pooling"
    meta_file = ckpt / PROMPT_HEAD_FILE if (ckpt / PROMPT_HEAD_FILE).is_file() else ckpt / "config.json"
    hf = _read_json(meta_file)
    if hf is None:
        raise ConfigError(f"{key}={path}: {meta_file} is not a readable model config")
    if meta_file.name == PROMPT_HEAD_FILE:
        head = str(hf.get("kind", "masking"))
    id2label = hf.get("id2label") or {}
    num_labels = len(id2label) if id2label else int(hf.get("num_labels", 2))
    names = [str(id2label[k]) for k in sorted(id2label, key=lambda x: int(x))] if id2label else None
    if names and all(re.fullmatch(r"LABEL_\d+", n) for n in names):
        names = None  # generic names say nothing about the task
    is_reg = hf.get("problem_type") == "regression"
    if model is None:
        model = hf.get("_name_or_path") or hf.get("model_type")
    if head != "pooling" and not cfg:
        raise ConfigError(f"{key}={path}: a {head}-head teacher needs its run directory (its config.yaml names "
                          "the prompt appended to every input); point to the run, not to its checkpoint")
    return TeacherInfo(checkpoint_dir=ckpt, run_dir=run_dir, task=task, objective=objective, model=model,
                       num_labels=num_labels, label_names=names, is_regression=is_reg, head=head,
                       run_config=cfg or None, target_scale=target_scale)


def check_compatible(info: TeacherInfo, task, key: str = "objective.teacher") -> None:
    """Refuse a teacher trained for another task or with another output layout (one-line ConfigError)."""
    where = info.run_dir or info.checkpoint_dir
    if info.task and info.task != task.name:
        raise ConfigError(f"{key}: teacher {where} was trained on task={info.task}, but the student runs "
                          f"task={task.name}; use a teacher trained on {task.name}")
    check_output_layout(info, task, key, f"teacher {where}", f"use a teacher trained on {task.name}")
    if info.is_regression:
        # The MSE distillation term compares raw outputs: both must predict targets on the same scale.
        mine = (getattr(task, "extra", None) or {}).get("target_scale")
        if info.run_dir is not None and not _same_scale(info.target_scale, mine):
            raise ConfigError(f"{key}: teacher {where} was trained on regression targets scaled {info.target_scale}, "
                              f"the student on {mine}; set the same task.normalize_targets (and data) for both")
        if info.run_dir is None and mine:
            log.warning("KD teacher %s is a bare checkpoint: cannot check that it predicts targets normalised as %s",
                        where, mine)


def check_output_layout(info: TeacherInfo, task, key: str, subject: str, fix: str) -> None:
    """Refuse a checkpoint whose outputs do not fit ``task`` (regression vs classification, label
    count, label names): one ConfigError naming ``key``, ``subject`` and ``fix``. Shared by KD teachers
    and ``trainer.init_from``."""
    if info.is_regression != bool(task.is_regression):
        kind = "regression" if info.is_regression else "classification"
        raise ConfigError(f"{key}: {subject} is a {kind} model, but task={task.name} is not; {fix}")
    if info.num_labels != task.num_labels:
        raise ConfigError(f"{key}: {subject} has {info.num_labels} output labels, but task={task.name} "
                          f"has {task.num_labels}; {fix}")
    if info.label_names and not info.is_regression and list(task.label_names) != info.label_names:
        raise ConfigError(f"{key}: {subject} predicts labels {info.label_names}, but task={task.name} "
                          f"has labels {list(task.label_names)}; {fix}")


def _same_scale(a: dict | None, b: dict | None) -> bool:
    if not a or not b:
        return not a and not b
    return a.get("method") == b.get("method") and all(
        math.isclose(float(a.get(k, 0)), float(b.get(k, 0)), rel_tol=1e-9, abs_tol=1e-12) for k in ("shift", "scale"))


# ---------------------------------------------------------------------------------------------
# Teacher configs: compose, hash, train or reuse
# ---------------------------------------------------------------------------------------------
def split_teacher_config(teacher_config: Mapping) -> tuple[list[str], list[tuple[str, Any]]]:
    """Turn a teacher config into (group choices as Hydra overrides, dotted value updates)."""
    if not isinstance(teacher_config, Mapping):
        raise ConfigError(f"objective.teacher_config must be a mapping of overrides, got {teacher_config!r}")
    groups: list[str] = []
    values: list[tuple[str, Any]] = []
    for key, val in teacher_config.items():
        key = str(key)
        if key.split(".")[0] in FORBIDDEN_KEYS:
            raise ConfigError(f"objective.teacher_config.{key} is not allowed: the teacher is always trained on "
                              "the student's task and paths")
        if key in GROUP_KEYS and isinstance(val, str):
            groups.append(f"{key}={val}")
        elif key in GROUP_KEYS and isinstance(val, Mapping):
            rest = dict(val)
            name = rest.pop("name", None)
            if name is not None:
                groups.append(f"{key}={name}")
            values += flatten_items(key, rest)
        elif key in GROUP_KEYS and val is None:
            continue  # keep the default choice
        else:
            values += flatten_items(key, val)
    return groups, values


@contextlib.contextmanager
def _hydra_for_compose() -> Iterator[None]:
    """Hydra ready for ``compose``: inside a cmiexp job the running instance (same config
    directory) composes the teacher too; elsewhere (tests, the teacher CLI) a fresh one is
    initialised for the block."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from cmiexp.config import CONF_DIR

    # The teacher config is composed without its hydra node (no run directory to resolve), so it
    # needs none of the resolvers the entry points register.
    if GlobalHydra.instance().is_initialized():
        yield
        return
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        yield


def compose_teacher_config(student_cfg: DictConfig, teacher_config: Mapping) -> DictConfig:
    """The full config of the teacher run that ``teacher_config`` describes, on the student's task."""
    from hydra import compose
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    groups, values = split_teacher_config(teacher_config)
    try:
        with _hydra_for_compose():
            cfg = compose(config_name="config", overrides=groups)
    except (HydraException, OmegaConfBaseException) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"objective.teacher_config {groups}: {first}") from e
    # Same task (data, subsets, max_length) and output locations as the student, resolved now.
    cfg.task = OmegaConf.create(OmegaConf.to_container(student_cfg.task, resolve=True))
    cfg.paths = OmegaConf.create(OmegaConf.to_container(student_cfg.paths, resolve=True))
    given = {k for k, _ in values}
    for k in INHERITED_TRAINER_KEYS:
        if f"trainer.{k}" not in given and k in student_cfg.trainer:
            cfg.trainer[k] = student_cfg.trainer[k]
    for k, v in values:
        try:
            OmegaConf.update(cfg, k, v, merge=True)
        except OmegaConfBaseException as e:
            raise ConfigError(f"objective.teacher_config.{k}: not a key of the teacher config "
                              f"({type(e).__name__})") from e
    try:
        OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as e:
        raise ConfigError(f"objective.teacher_config: the teacher config does not resolve: "
                          f"{str(e).splitlines()[0]}") from e
    return cfg


def teacher_dir(teacher_cfg: DictConfig) -> Path:
    """``<teachers_dir>/<task>/<model>/<objective>/<hash12>`` (``cmiexp.runs.provision``)."""
    return provisioned_dir(teacher_cfg)


def teacher_overrides_list(teacher_config: Mapping) -> list[str]:
    groups, values = split_teacher_config(teacher_config)
    return groups + [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in values]


def ensure_teacher(student_cfg: DictConfig, teacher_config: Mapping) -> TeacherInfo:
    """Return the teacher described by ``teacher_config``: a completed run with the identical
    resolved config is reused; otherwise it is trained now, by a separate cmiexp process, under
    a lock (``cmiexp.runs.provision``). Every rank of a multi-process student may call this: one
    process trains, the others wait on the lock."""
    tcfg = compose_teacher_config(student_cfg, teacher_config)
    if finished_run(provisioned_dir(tcfg)):
        log.info("reusing KD teacher %s", provisioned_dir(tcfg))
    got = provision(tcfg, teacher_overrides_list(teacher_config), "KD teacher")
    info = load_teacher_info(got.run_dir, key="objective.teacher_config")
    info.source, info.train_time_s, info.config_hash = got.source, got.train_time_s, got.run_dir.name
    return info


# ---------------------------------------------------------------------------------------------
# The teacher's identity, as the student's folder and results.json name it
# ---------------------------------------------------------------------------------------------
def path_teacher_hash(info: TeacherInfo) -> str:
    """The hash that identifies a teacher given as a path: the provisioned hash of a teachers-folder
    run, else the run's config hash (run_config.json), else a hash of the checkpoint's location."""
    from cmiexp.runs import read_run_config
    from cmiexp.runs.provision import read_spec

    if info.run_dir is not None:
        spec, record = read_spec(info.run_dir), read_run_config(info.run_dir)
        if spec and spec.get("hash"):
            return str(spec["hash"])
        if record and record.get("hash"):
            return str(record["hash"])
    return hashlib.sha256(str(Path(info.checkpoint_dir).resolve()).encode()).hexdigest()[:HASH_LEN]


def teacher_record(info: TeacherInfo) -> dict[str, Any]:
    """``{"objective", "hash", "run_dir"}``: the student's results.json ``teacher`` field. ``hash`` is
    the 8-digit prefix the student's folder shows (``-from-<objective>-<hash>``)."""
    full = info.config_hash or path_teacher_hash(info)
    return {"objective": info.objective or UNKNOWN_OBJECTIVE, "hash": full[:TEACHER_HASH_LEN],
            "run_dir": str(Path(info.run_dir or info.checkpoint_dir).resolve())}


def student_teacher_record(cfg: DictConfig) -> dict[str, Any] | None:
    """The teacher record of a KD config before anything is trained (for the run directory's name).
    None when the config names no usable teacher yet (the run then fails with the precise error)."""
    objective = cfg.get("objective") or {}
    if objective.get("name") != "kd":
        return None
    path, tc = objective.get("teacher"), objective.get("teacher_config")
    if path not in (None, "") and tc is None:
        info = load_teacher_info(str(path))
        return teacher_record(info)
    if tc is not None and path in (None, ""):
        tcfg = compose_teacher_config(cfg, OmegaConf.to_container(tc, resolve=True))
        return {"objective": str(tcfg.objective.name), "hash": provision_hash(tcfg)[:TEACHER_HASH_LEN],
                "run_dir": str(provisioned_dir(tcfg).resolve())}
    return None


def student_teacher_tag(student: DictConfig) -> str:
    """The run-directory suffix of a KD student (``-from-<teacher objective>-<hash8>``), for the
    ``${cmiexp_teacher_tag:}`` resolver (``cmiexp.resolvers``, which decides whether a run is a KD
    student); empty when its teacher cannot be resolved yet (the run then reports that in one line)."""
    parts = {k: OmegaConf.to_container(student[k], resolve=True) for k in ("objective", "task", "paths", "trainer")
             if k in student}
    key = json.dumps(parts, sort_keys=True, default=str)
    if student.objective.get("teacher_config") is None:
        return _teacher_tag.__wrapped__(key)  # a path teacher: read from disk each time (it may change)
    return _teacher_tag(key)


@functools.lru_cache(maxsize=64)
def _teacher_tag(parts_json: str) -> str:
    # Keyed by the config parts that decide the teacher: composing a teacher config takes a moment,
    # and Hydra resolves the run directory more than once per job.
    try:
        rec = student_teacher_record(OmegaConf.create(json.loads(parts_json)))
    except Exception:  # noqa: BLE001 - naming a folder must not fail; the run reports a bad teacher in one line
        rec = None
    return teacher_folder_suffix(rec["objective"], rec["hash"]) if rec else ""


# ---------------------------------------------------------------------------------------------
# Teacher model and logits
# ---------------------------------------------------------------------------------------------
def load_teacher_tokenizer(info: TeacherInfo):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(info.checkpoint_dir))
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"teacher checkpoint {info.checkpoint_dir} has no loadable tokenizer ({first}); "
                          "KD needs the teacher's tokenizer next to its weights") from e
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def teacher_input_suffix(info: TeacherInfo, tokenizer):
    """The prompt a prompt-head teacher was trained with (None for the standard pooling head)."""
    if info.head == "pooling":
        return None
    from cmiexp.models.heads import input_suffix

    return input_suffix(OmegaConf.create(info.run_config or {}), tokenizer)


def load_teacher_model(info: TeacherInfo, device):
    """The teacher, frozen: eval mode (no dropout, so no RNG use) and no gradients."""
    try:
        from cmiexp.models.heads import load_classifier
    except ImportError:  # pragma: no cover - older trees without prompt heads
        from transformers import AutoModelForSequenceClassification

        load_classifier = AutoModelForSequenceClassification.from_pretrained
    try:
        model = load_classifier(str(info.checkpoint_dir))
    except (OSError, ValueError, CmiexpError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"cannot load the teacher from {info.checkpoint_dir}: {first}") from e
    model.eval()
    model.requires_grad_(False)
    return model.to(device)


# ---------------------------------------------------------------------------------------------
# python -m cmiexp.objectives.kd OVERRIDES: train (or find) the teacher of a KD config
# ---------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    import sys

    from hydra import compose

    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    try:
        try:
            with _hydra_for_compose():
                cfg = compose(config_name="config", overrides=argv)
        except (HydraException, OmegaConfBaseException) as e:
            raise ConfigError(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__) from e
        tc = cfg.objective.get("teacher_config")
        if cfg.objective.name != "kd" or tc is None:
            raise ConfigError("python -m cmiexp.objectives.kd needs a KD config with objective.teacher_config set "
                              "(e.g. experiment=mcmi_kd task=glue/rte)")
        info = ensure_teacher(cfg, OmegaConf.to_container(tc, resolve=True))
    except CmiexpError as e:
        print(f"cmiexp.objectives.kd: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 1
    print(info.run_dir or info.checkpoint_dir)
    return 0

