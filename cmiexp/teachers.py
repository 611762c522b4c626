"""KD teachers: resolve, validate, train on demand (or reuse), and cache their training-set logits.

A teacher is given to ``objective=kd`` either as a path (``objective.teacher``: a finished run
directory or a ``save_pretrained`` folder) or as a config (``objective.teacher_config``: overrides
of a teacher run on the student's task). A config teacher lives in
``paths.teachers_dir/<task>/<model>/<objective>/<hash12>``, where the hash covers the resolved
teacher config (minus keys that do not change what is trained), so every student that asks for
the same teacher finds the same directory: a sweep over student seeds trains each teacher once.
A lock file serialises concurrent sweeps asking for the same teacher.

The teacher always reads the raw text of the training examples through its *own* tokenizer (the
one saved in its checkpoint), so teacher and student may use different tokenizers; the student's
batches contribute only the example ids (``idx``); a prompt-head teacher (``head=masking`` or
``generation``) also gets the prompt its run config names. Its logits for the training set are computed
once and stored as safetensors in the teacher's directory (``kd_cache/``), keyed by the training
data's content, the teacher tokenizer, ``task.max_length`` and the teacher weights.

Command line (pre-trains the teacher of a KD config, e.g. before a multi-process student run)::

    python -m cmiexp.teachers experiment=mcmi_kd task=glue/rte objective.teacher_config.objective=mcmi
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import inspect
import json
import logging
import math
import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from omegaconf import DictConfig, OmegaConf

from cmiexp.errors import CmiexpError, ConfigError, DataError

log = logging.getLogger("cmiexp")

#: Config groups a ``teacher_config`` key may choose (``objective: mcmi``).
GROUP_KEYS = ("model", "objective", "trainer", "logger", "experiment")
#: Keys a teacher config may not set: the teacher is trained on the student's task and paths.
FORBIDDEN_KEYS = ("task", "paths", "hydra")
#: Trainer keys copied from the student unless the teacher config sets them.
INHERITED_TRAINER_KEYS = ("progress_bar", "num_workers", "log_every", "cpu", "mixed_precision")
#: Keys left out of the teacher hash: they name or report a run but do not change what is trained.
HASH_EXCLUDED = ("experiment_name", "paths", "logger")
HASH_EXCLUDED_TRAINER = ("resume", "stop_after_steps", "progress_bar", "num_workers", "log_every", "collapse_share")
MODEL_INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")
#: A prompt-head checkpoint (cmiexp.models.heads): backbone/ + head weights + this description.
PROMPT_HEAD_FILE = "cmiexp_head.json"
CACHE_DIRNAME = "kd_cache"
SPEC_FILE = "teacher_spec.json"


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
    if info.is_regression != bool(task.is_regression):
        kind = "regression" if info.is_regression else "classification"
        raise ConfigError(f"{key}: teacher {where} is a {kind} model, but task={task.name} is not; "
                          f"use a teacher trained on {task.name}")
    if info.num_labels != task.num_labels:
        raise ConfigError(f"{key}: teacher {where} has {info.num_labels} output labels, but task={task.name} "
                          f"has {task.num_labels}; use a teacher trained on {task.name}")
    if info.label_names and not info.is_regression and list(task.label_names) != info.label_names:
        raise ConfigError(f"{key}: teacher {where} predicts labels {info.label_names}, but task={task.name} "
                          f"has labels {list(task.label_names)}; use a teacher trained on {task.name}")
    if info.is_regression:
        # The MSE distillation term compares raw outputs: both must predict targets on the same scale.
        mine = (getattr(task, "extra", None) or {}).get("target_scale")
        if info.run_dir is not None and not _same_scale(info.target_scale, mine):
            raise ConfigError(f"{key}: teacher {where} was trained on regression targets scaled {info.target_scale}, "
                              f"the student on {mine}; set the same task.normalize_targets (and data) for both")
        if info.run_dir is None and mine:
            log.warning("KD teacher %s is a bare checkpoint: cannot check that it predicts targets normalised as %s",
                        where, mine)


def _same_scale(a: dict | None, b: dict | None) -> bool:
    if not a or not b:
        return not a and not b
    return a.get("method") == b.get("method") and all(
        math.isclose(float(a.get(k, 0)), float(b.get(k, 0)), rel_tol=1e-9, abs_tol=1e-12) for k in ("shift", "scale"))


# ---------------------------------------------------------------------------------------------
# Teacher configs: compose, hash, train or reuse
# ---------------------------------------------------------------------------------------------
def flatten_items(prefix: str, value: Any) -> list[tuple[str, Any]]:
    """Nested mappings as (dotted key, leaf value) pairs, in order (an empty mapping gives none)."""
    if isinstance(value, Mapping):
        out: list[tuple[str, Any]] = []
        for k, v in value.items():
            out += flatten_items(f"{prefix}.{k}" if prefix else str(k), v)
        return out
    return [(prefix, value)]


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
def _initialized_hydra() -> Iterator[None]:
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.singleton import Singleton

    from cmiexp.config import CONF_DIR, register_resolvers

    register_resolvers()
    # Inside a cmiexp job Hydra is already initialised (and refuses a second initialisation): set the
    # running instance aside, compose with a fresh one, and put the running one back.
    running = Singleton._instances.pop(GlobalHydra, None)
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            yield
    finally:
        if running is not None:
            Singleton._instances[GlobalHydra] = running


def compose_teacher_config(student_cfg: DictConfig, teacher_config: Mapping) -> DictConfig:
    """The full config of the teacher run that ``teacher_config`` describes, on the student's task."""
    from hydra import compose
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    groups, values = split_teacher_config(teacher_config)
    try:
        with _initialized_hydra():
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


def hashed_content(teacher_cfg: DictConfig) -> dict:
    """The part of a resolved teacher config that decides what is trained (what the hash covers)."""
    c = OmegaConf.to_container(teacher_cfg, resolve=True)
    for k in HASH_EXCLUDED:
        c.pop(k, None)
    c.pop("hydra", None)
    for k in HASH_EXCLUDED_TRAINER:
        c.get("trainer", {}).pop(k, None)
    return c


def _drop_none(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _drop_none(v) for k, v in node.items() if v is not None}
    if isinstance(node, list):
        return [_drop_none(v) for v in node]
    return node


def teacher_config_hash(teacher_cfg: DictConfig) -> str:
    """12 hex digits of the hashed content. Null-valued keys are left out, so a release that adds a
    new option defaulting to null (= off) does not orphan the teachers trained before it."""
    blob = json.dumps(_drop_none(hashed_content(teacher_cfg)), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def teacher_dir(teacher_cfg: DictConfig) -> Path:
    """``<teachers_dir>/<task>/<model>/<objective>/<hash12>``."""
    root = Path(str(teacher_cfg.paths.teachers_dir)).expanduser()
    return root / str(teacher_cfg.task.name) / str(teacher_cfg.model.name) / str(teacher_cfg.objective.name) / \
        teacher_config_hash(teacher_cfg)


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock (fcntl.flock) held for the block; other processes wait."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for %s (another process is training this teacher)", path)
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


@contextlib.contextmanager
def isolated_run_state() -> Iterator[None]:
    """Run a nested training run without disturbing the enclosing one: RNG streams (torch, CUDA,
    numpy, random) and Accelerate's shared gradient-accumulation state are restored afterwards."""
    import random

    import numpy as np
    from accelerate.state import GradientState

    py_state, np_state = random.getstate(), np.random.get_state()
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    gs = dict(GradientState._shared_state)
    with torch.random.fork_rng(devices=list(range(torch.cuda.device_count())) if cuda else []):
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
            GradientState._shared_state.clear()
            GradientState._shared_state.update(gs)


def _completed(d: Path) -> bool:
    from cmiexp.runs import read_results

    res = read_results(d)
    return bool(res and res.get("status") == "completed" and (d / "checkpoint" / "best" / "config.json").is_file())


def _mark_failed(d: Path, msg: str) -> None:
    from cmiexp.runs import read_results, write_results

    res = read_results(d)
    if res is not None and res.get("status") != "completed":
        res.update(status="failed", error=msg)
        write_results(d, res)


def teacher_overrides_list(teacher_config: Mapping) -> list[str]:
    groups, values = split_teacher_config(teacher_config)
    return groups + [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in values]


def ensure_teacher(student_cfg: DictConfig, teacher_config: Mapping, *, num_processes: int = 1,
                   mixed_precision: str | None = None) -> TeacherInfo:
    """Return the teacher described by ``teacher_config``, training it now unless a completed run
    with the identical resolved config exists. Training happens in this process (isolated RNG)."""
    from cmiexp.io import atomic_write_json
    from cmiexp.runs import write_results
    from cmiexp.train.runner import resolve_mixed_precision, run_experiment

    tcfg = compose_teacher_config(student_cfg, teacher_config)
    d = teacher_dir(tcfg)
    source, train_s = "reused", None
    if not _completed(d):
        if num_processes > 1:
            raise ConfigError(f"objective.teacher_config: teacher {d} is not trained yet, and it is trained on "
                              f"demand only in single-process runs; train it first with: python -m cmiexp.teachers "
                              "<the same overrides>, then relaunch")
        with file_lock(d.parent / f".{d.name}.lock"):
            if _completed(d):  # another process trained it while we waited
                pass
            else:
                tmp = resolve_mixed_precision(str(tcfg.trainer.mixed_precision))
                if mixed_precision is not None and tmp != mixed_precision:
                    raise ConfigError(
                        f"objective.teacher_config: the teacher's trainer.mixed_precision ({tmp}) differs from the "
                        f"student's ({mixed_precision}); an on-demand teacher trains in the student's process and "
                        "must share it: train it separately and pass objective.teacher=PATH")
                log.info("training KD teacher %s/%s on %s into %s", tcfg.model.name, tcfg.objective.name,
                         tcfg.task.name, d)
                d.mkdir(parents=True, exist_ok=True)
                atomic_write_json(d / SPEC_FILE, {"hash": d.name, "overrides": teacher_overrides_list(teacher_config),
                                                  "config": hashed_content(tcfg)})
                t0 = time.time()
                try:
                    with isolated_run_state():
                        res = run_experiment(tcfg, d)
                except CmiexpError as e:
                    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
                    _mark_failed(d, msg)
                    raise CmiexpError(f"training the KD teacher in {d} failed: {msg}") from e
                if res.get("status") != "completed":
                    raise CmiexpError(f"training the KD teacher in {d} stopped with status {res.get('status')!r}; "
                                      "re-run to resume it")
                # A nested run sees the student's Hydra overrides; record the teacher's own instead.
                res["overrides"] = teacher_overrides_list(teacher_config)
                write_results(d, res)
                source, train_s = "trained", time.time() - t0
    else:
        log.info("reusing KD teacher %s", d)
    info = load_teacher_info(d, key="objective.teacher_config")
    info.source, info.train_time_s, info.config_hash = source, train_s, d.name
    return info


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


def model_input_keys(model) -> set[str]:
    return set(inspect.signature(model.forward).parameters) & set(MODEL_INPUT_KEYS)


def weights_stamp(checkpoint_dir: Path) -> str:
    """Names, sizes and mtimes of the weight files: a retrained teacher gets a new cache key."""
    parts = []
    for f in sorted(Path(checkpoint_dir).iterdir()):
        if f.suffix in (".safetensors", ".bin") and f.is_file():
            st = f.stat()
            parts.append(f"{f.name}:{st.st_size}:{st.st_mtime_ns}")
    return "|".join(parts)


def cache_key(task, teacher_tokenizer, max_length: int, info: TeacherInfo, suffix=None) -> str:
    from cmiexp.data.tokenize import dataset_fingerprint, tokenizer_fingerprint

    stamp = weights_stamp(info.checkpoint_dir)
    if (info.checkpoint_dir / "backbone").is_dir():
        stamp += "|" + weights_stamp(info.checkpoint_dir / "backbone")
    parts = [task.name, dataset_fingerprint(task.train, list(task.text_fields) + ["idx"]),
             tokenizer_fingerprint(teacher_tokenizer), str(int(max_length)), stamp,
             *([suffix.cache_key()] if suffix is not None else [])]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def cache_path(info: TeacherInfo, task, key: str, fallback_root: Path | None = None) -> Path:
    root = info.run_dir or info.checkpoint_dir
    d = Path(root) / CACHE_DIRNAME
    if not os.access(root, os.W_OK) and fallback_root is not None:
        # A read-only teacher folder: keep its cache in our cache dir, keyed by the teacher's path.
        d = Path(fallback_root) / CACHE_DIRNAME / hashlib.sha1(str(Path(root).resolve()).encode()).hexdigest()[:12]
    return d / f"{task.name.replace('/', '_')}-train-{key}.safetensors"


class TeacherInputs:
    """The teacher's own tokenisation of the training set, addressable by example ``idx``."""

    def __init__(self, tokenized, tokenizer, input_keys: set[str]):
        from transformers import DataCollatorWithPadding

        self.keys = [k for k in MODEL_INPUT_KEYS if k in input_keys and k in tokenized.column_names]
        self.columns = {k: tokenized[k][:] for k in self.keys}
        self.idx = torch.as_tensor(tokenized["idx"][:], dtype=torch.long)
        self.position = index_map(self.idx)
        self.collate = DataCollatorWithPadding(tokenizer)

    def __len__(self) -> int:
        return len(self.idx)

    def batch(self, positions) -> dict[str, torch.Tensor]:
        feats = [{k: self.columns[k][int(p)] for k in self.keys} for p in positions]
        return dict(self.collate(feats))

    def positions_of(self, idx: torch.Tensor) -> torch.Tensor:
        return lookup_positions(self.position, idx)


def index_map(idx: torch.Tensor) -> torch.Tensor:
    """A dense map from example id to row position (-1 where absent)."""
    idx = idx.long().cpu()
    if idx.numel() == 0:
        return torch.full((0,), -1, dtype=torch.long)
    if int(idx.min()) < 0:
        raise DataError("training examples have negative idx values; KD caches key on idx >= 0")
    pos = torch.full((int(idx.max()) + 1,), -1, dtype=torch.long)
    pos[idx] = torch.arange(len(idx))
    if int((pos >= 0).sum()) != len(idx):
        raise DataError("training examples have duplicate idx values; KD caches need a unique idx per example")
    return pos


def lookup_positions(position: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    i = idx.long().to(position.device)
    ok = (i >= 0) & (i < len(position))
    pos = torch.where(ok, position[i.clamp(0, max(len(position) - 1, 0))], torch.full_like(i, -1))
    if bool((pos < 0).any()):
        missing = i[pos < 0][:5].tolist()
        raise DataError(f"the KD teacher logits have no entry for training example idx {missing}; delete the "
                        "teacher's kd_cache folder to rebuild it")
    return pos


@torch.no_grad()
def compute_teacher_logits(model, inputs: TeacherInputs, batch_size: int, device, autocast=None) -> torch.Tensor:
    """Teacher logits (fp32, CPU) for every row of ``inputs``, in row order."""
    out = []
    ctx = autocast if autocast is not None else contextlib.nullcontext
    for start in range(0, len(inputs), batch_size):
        b = inputs.batch(range(start, min(start + batch_size, len(inputs))))
        with ctx():
            logits = model(**{k: v.to(device) for k, v in b.items()}).logits
        out.append(logits.float().cpu())
    return torch.cat(out) if out else torch.zeros(0, 1)


def save_logit_cache(path: Path, idx: torch.Tensor, logits: torch.Tensor, meta: dict[str, str]) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file({"idx": idx.long().contiguous(), "logits": logits.float().contiguous()}, str(tmp),
              metadata={k: str(v) for k, v in meta.items()})
    os.replace(tmp, path)


def load_logit_cache(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        t = load_file(str(path))
        return t["idx"], t["logits"]
    except Exception as e:  # noqa: BLE001 - a corrupt cache file is a user-fixable problem
        raise DataError(f"cannot read the KD teacher cache {path} ({type(e).__name__}); delete it to rebuild") from e


@dataclass
class LogitCache:
    """Teacher logits of the training set, looked up by example idx on the training device."""

    idx: torch.Tensor
    logits: torch.Tensor
    position: torch.Tensor = field(init=False)

    def __post_init__(self):
        self.position = index_map(self.idx)

    def to(self, device) -> "LogitCache":
        self.logits = self.logits.to(device)
        self.position = self.position.to(device)
        return self

    def __call__(self, idx: torch.Tensor) -> torch.Tensor:
        return self.logits[lookup_positions(self.position, idx)]


# ---------------------------------------------------------------------------------------------
# python -m cmiexp.teachers OVERRIDES: train (or find) the teacher of a KD config
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
            with _initialized_hydra():
                cfg = compose(config_name="config", overrides=argv)
        except (HydraException, OmegaConfBaseException) as e:
            raise ConfigError(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__) from e
        tc = cfg.objective.get("teacher_config")
        if cfg.objective.name != "kd" or tc is None:
            raise ConfigError("python -m cmiexp.teachers needs a KD config with objective.teacher_config set "
                              "(e.g. experiment=mcmi_kd task=glue/rte)")
        info = ensure_teacher(cfg, OmegaConf.to_container(tc, resolve=True))
    except CmiexpError as e:
        print(f"cmiexp.teachers: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 1
    print(info.run_dir or info.checkpoint_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
