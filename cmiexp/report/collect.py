"""Finding runs: every results.json under the given paths, read through ``cmiexp.runs``.

The report never parses the directory layout: a folder holding a results.json is a run, a folder
with only a run config (``config.yaml`` or ``.hydra/config.yaml``) is a missing (crashed or
unfinished) run, and a results.json that cannot be read becomes a ``corrupt`` record, so one bad
file never hides a sweep.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import yaml

from cmiexp.errors import DataError
from cmiexp.report.specs import one_line, opt_int, opt_str
from cmiexp.runs import RESULTS, SCHEMA, STATUSES, ResultsUnreadable, collapse_text, load_results, read_run_config
from cmiexp.runs.identity import flatten

# The splits a report can show: ``dev`` (best.metrics / final.metrics, the split that selects the
# model) and ``test`` (results.json ``test``: the selected model evaluated once on the test split,
# recorded by tasks that have a labelled one, e.g. the chain-of-thought tasks).
SPLITS = ("dev", "test")


class ReportInputError(DataError):
    """A path given to the report does not exist (the CLI exits with code 2)."""


@dataclass
class RunRecord:
    """One run as found on disk.

    ``status`` is the run's own status (completed/failed/running), ``missing`` for a run
    directory with a config but no results.json, or ``corrupt`` for an unreadable
    results.json (identity then comes from the run's config when one is readable).
    """

    path: Path
    root: Path
    status: str
    error: str | None = None
    experiment: str | None = None
    task: str | None = None
    task_type: str | None = None
    model: str | None = None
    objective: str | None = None
    teacher_objective: str | None = None
    teacher_model: str | None = None
    seed: int | None = None
    primary_metric: str | None = None
    best: dict | None = None
    final: dict | None = None
    overrides: tuple[str, ...] = ()
    # dotted key -> value of what the run trained with: the hashed config of run_config.json, or,
    # for runs written before it existed, the key=value overrides (see run_settings)
    settings: dict = field(default_factory=dict)
    # True when ``settings`` is the whole hashed config (run_config.json): a key it lacks was not in the
    # config the run trained with (a key added since, such as model.tiny.build), not merely unknown
    settings_complete: bool = False
    collapsed: bool = False  # the run's dev predictions were (nearly) all one class (results.json)
    collapse_note: str | None = None
    # results.json ``test``: metrics of the selected model on the test split (absent without one)
    test: dict | None = None
    # results.json ``teacher`` of a KD student: {"objective", "hash", "run_dir"} (absent otherwise)
    teacher: dict | None = None

    @property
    def teacher_hash(self) -> str | None:
        return opt_str((self.teacher or {}).get("hash"))

    @property
    def run_dir(self) -> Path:
        p = self.path.parent
        return p.parent if p.name == ".hydra" else p

    @property
    def identified(self) -> bool:
        """True when the run can be placed in a table cell."""
        return bool(self.task and self.model and self.objective)

    def metrics(self, which: str = "best", split: str = "dev") -> dict | None:
        """Dev metrics of the ``best`` or ``final`` evaluation, or (``split="test"``) the test metrics
        (one evaluation of the selected model, so ``which`` does not apply)."""
        if split == "test":
            return self.test
        block = self.best if which == "best" else self.final
        if isinstance(block, dict) and isinstance(block.get("metrics"), dict):
            return block["metrics"]
        return None

    @property
    def display_path(self) -> str:
        try:
            return self.path.relative_to(self.root).as_posix()
        except ValueError:
            return self.path.as_posix()


def _config_select(cfg: Any, dotted: str) -> Any:
    """Look a dotted key up in a plain dict (yaml.safe_load output)."""
    node = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _name_of(node: Any) -> str | None:
    # Config groups are mappings with a ``name``; some keys may hold the name directly.
    if isinstance(node, dict):
        return opt_str(node.get("name"))
    if isinstance(node, (str, int, float)) and not isinstance(node, bool):
        s = opt_str(node)
        # An unresolved interpolation says nothing about the run.
        return None if s is None or "${" in s else s
    return None


# Where a run config may name the teacher's objective (first hit wins).
_TEACHER_OBJECTIVE_KEYS = (
    "teacher_objective",
    "teacher.objective",
    "objective.teacher_objective",
    "objective.teacher.objective",
    "distill.teacher_objective",
)
_TEACHER_MODEL_KEYS = ("teacher_model", "teacher.model", "objective.teacher_model", "objective.teacher.model")


def _read_config_identity(config_path: Path) -> dict | None:
    """Identity of a run from its config.yaml; None when the file is not a run config.

    Raises DataError when the file cannot be read or parsed.
    """
    try:
        cfg = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise DataError(f"cannot parse {config_path}: {one_line(e, 200)}") from e
    if not isinstance(cfg, dict):
        return None
    task = _name_of(cfg.get("task"))
    model = _name_of(cfg.get("model"))
    objective = _name_of(cfg.get("objective"))
    if not (task and model and objective):
        return None
    teacher_obj = next(
        (n for n in (_name_of(_config_select(cfg, k)) for k in _TEACHER_OBJECTIVE_KEYS) if n), None
    )
    teacher_model = next(
        (n for n in (_name_of(_config_select(cfg, k)) for k in _TEACHER_MODEL_KEYS) if n), None
    )
    task_node = cfg.get("task") if isinstance(cfg.get("task"), dict) else {}
    return {
        "experiment": _name_of(cfg.get("experiment_name")),
        "task": task,
        "task_type": opt_str(task_node.get("task_type") or task_node.get("type")),
        "model": model,
        "objective": objective,
        "teacher_objective": teacher_obj,
        "teacher_model": teacher_model,
        "seed": opt_int(cfg.get("seed")),
    }


def _config_paths(run_dir: Path) -> list[Path]:
    # The runner's resolved config first, Hydra's (unresolved) copy second.
    return [p for p in (run_dir / "config.yaml", run_dir / ".hydra" / "config.yaml") if p.is_file()]


def _read_overrides(run_dir: Path) -> tuple[str, ...]:
    p = run_dir / ".hydra" / "overrides.yaml"
    if not p.is_file():
        return ()
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return ()
    return tuple(str(x) for x in data) if isinstance(data, list) else ()


def _corrupt(path: Path, root: Path, msg: str) -> RunRecord:
    rec = RunRecord(path=path, root=root, status="corrupt", error=msg)
    # Place the broken run in its cell when its config still says what it was.
    for cfg in _config_paths(path.parent):
        try:
            ident = _read_config_identity(cfg)
        except DataError:
            continue
        if ident:
            for k, v in ident.items():
                setattr(rec, k, v)
            rec.overrides = _read_overrides(path.parent)
            break
    return rec


def _read_results(path: Path, root: Path) -> RunRecord:
    try:
        data = load_results(path)
    except (OSError, ResultsUnreadable) as e:
        msg = str(e) if isinstance(e, ResultsUnreadable) else f"cannot read {RESULTS}: {one_line(e, 200)}"
        return _corrupt(path, root, msg)
    schema = data.get("schema")
    if schema != SCHEMA:
        return _corrupt(path, root, f"results.json has schema {schema!r}, expected {SCHEMA}")
    for key in ("task", "model", "objective"):
        if not opt_str(data.get(key)):
            return _corrupt(path, root, f"results.json lacks key {key!r}")
    status = data.get("status")
    if status not in STATUSES:
        return _corrupt(path, root, f"results.json has unknown status {status!r}")
    overrides = data.get("overrides")
    settings, complete = run_settings_record(path.parent, overrides if isinstance(overrides, list) else ())
    err = data.get("error")
    teacher = data.get("teacher") if isinstance(data.get("teacher"), dict) else None
    return RunRecord(
        path=path,
        root=root,
        status=status,
        error=one_line(err) if err not in (None, "") else None,
        experiment=opt_str(data.get("experiment")),
        task=opt_str(data.get("task")),
        task_type=opt_str(data.get("task_type")),
        model=opt_str(data.get("model")),
        objective=opt_str(data.get("objective")),
        teacher_objective=opt_str(data.get("teacher_objective")) or opt_str((teacher or {}).get("objective")),
        teacher_model=opt_str(data.get("teacher_model")),
        seed=opt_int(data.get("seed")),
        primary_metric=opt_str(data.get("primary_metric")),
        best=data.get("best") if isinstance(data.get("best"), dict) else None,
        final=data.get("final") if isinstance(data.get("final"), dict) else None,
        overrides=tuple(str(o) for o in overrides) if isinstance(overrides, list) else (),
        collapsed=data.get("collapsed") is True,
        collapse_note=collapse_text(data),
        settings=settings,
        settings_complete=complete,
        test=_numbers(data.get("test")),
        teacher=teacher,
    )


def _numbers(block: Any) -> dict | None:
    """The numeric entries of a metrics block (``test`` also names its model and step)."""
    if not isinstance(block, dict):
        return None
    return {k: v for k, v in block.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def run_settings(run_dir: Path, overrides: Iterable[str]) -> dict:
    """What a run trained with, as dotted key -> value: its run_config.json (the resolved config the
    run directory's hash was taken over), else the key=value overrides it was started with."""
    return run_settings_record(run_dir, overrides)[0]


def run_settings_record(run_dir: Path, overrides: Iterable[str]) -> tuple[dict, bool]:
    """``run_settings`` and whether they are the whole hashed config (True: from run_config.json)."""
    record = read_run_config(run_dir)
    if record is not None:
        # every leaf, lists and empty mappings included: a key missing here is missing from the config
        return flatten(record["config"]), True
    out = {}
    for o in overrides:
        if "=" in o:
            out[override_key(o)] = o.split("=", 1)[1].strip()
    return out, False


def override_key(o: str) -> str:
    """The dotted key of an override as typed (``+a.b=1`` -> ``a.b``)."""
    return o.lstrip("+~").split("=", 1)[0].strip()


def _read_missing(run_dir: Path, root: Path) -> RunRecord | None:
    """A directory with a run config but no results.json: a crashed or unfinished run."""
    for cfg in _config_paths(run_dir):
        try:
            ident = _read_config_identity(cfg)
        except DataError as e:
            return RunRecord(path=cfg, root=root, status="corrupt", error=str(e))
        if ident:
            rec = RunRecord(
                path=cfg, root=root, status="missing", error="no results.json (crashed or not finished)"
            )
            for k, v in ident.items():
                setattr(rec, k, v)
            rec.overrides = _read_overrides(run_dir)
            rec.settings, rec.settings_complete = run_settings_record(run_dir, rec.overrides)
            return rec
    return None


def _scan(directory: Path, root: Path, seen: set[Path]) -> list[RunRecord]:
    """Runs at or below ``directory``.

    A folder with results.json is a run and is not descended into (its checkpoints may hold
    config copies). A folder with only a run config is a missing run unless runs lie below it
    (then the config belongs to a sweep, not a run).
    """
    results = directory / RESULTS
    if results.is_file():
        key = results.resolve()
        if key in seen:
            return []
        seen.add(key)
        return [_read_results(results, root)]
    try:
        # Hidden folders (.hydra, .git, caches) hold no runs; sorted for deterministic output.
        subdirs = sorted(
            e.path for e in os.scandir(directory)
            if e.is_dir(follow_symlinks=False) and not e.name.startswith(".")
        )  # fmt: skip
    except OSError as e:
        return [RunRecord(path=directory, root=root, status="corrupt", error=f"cannot list directory: {one_line(e, 200)}")]
    found: list[RunRecord] = []
    for sub in subdirs:
        found.extend(_scan(Path(sub), root, seen))
    if found:
        return found
    rec = _read_missing(directory, root)
    if rec is None:
        return []
    key = rec.path.resolve()
    if key in seen:
        return []
    seen.add(key)
    return [rec]


def collect_runs(paths: Iterable[str | os.PathLike]) -> list[RunRecord]:
    """Find every run under ``paths`` (run dirs, sweep dirs, ``outputs/`` or results.json files).

    Raises ReportInputError (a DataError) when a path does not exist. Unreadable results files
    become ``corrupt`` records instead of errors, so one bad file never hides a sweep; a run
    folder with a config but no results.json becomes a ``missing`` record.
    """
    paths = [Path(p) for p in paths]
    for p in paths:
        if not p.exists():
            raise ReportInputError(f"no such directory: {p}")
        if p.is_file() and p.name != RESULTS:
            raise ReportInputError(f"{p} is not a directory or a {RESULTS} file")
    records: list[RunRecord] = []
    seen: set[Path] = set()
    for p in paths:
        records.extend(_scan(p.parent if p.is_file() else p, p.parent if p.is_file() else p, seen))
    return records

