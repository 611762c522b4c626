"""``cmiexp-report``: turn run/sweep directories into the papers' result tables.

Every run writes a ``results.json`` (schema 1). The report finds them recursively under the
given directories (it never parses the directory layout), groups rows by method
(experiment, model, objective, teacher objective) and columns by task, and prints per cell
the mean and sample standard deviation over seeds of each task's report metric. Failed,
missing (a run directory with a config but no results.json) and unreadable runs are counted
in their cells and listed under the table; nothing is dropped silently.

Python API::

    records = collect_runs(["outputs/"])
    table = build_table(records, references=default_references())
    print(render_markdown(table))

Outputs of the CLI: ``report.md`` (also printed), ``report.csv`` (tidy: one row per
method x task) and ``report.tex`` (booktabs tabular), written atomically.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import yaml

from cmiexp.errors import CmiexpError, ConfigError, DataError
from cmiexp.io import atomic_write_text
from cmiexp.runs.results import RESULTS, SCHEMA

__all__ = [
    "RunRecord",
    "MetricSpec",
    "MethodKey",
    "Cell",
    "Column",
    "Row",
    "DeltaRow",
    "Problem",
    "Table",
    "ReferenceSet",
    "ReferenceRow",
    "collect_runs",
    "build_table",
    "render_markdown",
    "render_csv",
    "render_latex",
    "write_report",
    "load_reference",
    "default_reference_path",
    "default_references",
    "mean_std",
    "parse_metric_spec",
    "task_key",
    "main",
]

# The run-directory contract (file name, schema version) is defined once, in cmiexp.runs.
SCHEMA_VERSION = SCHEMA
RESULTS_FILE = RESULTS
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
STATUSES = ("completed", "failed", "running")
BASELINE_OBJECTIVE = "ce"


class ReportInputError(DataError):
    """A path given to the report does not exist (the CLI exits with code 2)."""


# ----------------------------------------------------------------------------------------
# Pure statistics
# ----------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------
# Metric specs and task names
# ----------------------------------------------------------------------------------------

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


def _task_sort_key(key: str) -> tuple[int, int, str]:
    if key in GLUE_ORDER:
        return (0, GLUE_ORDER.index(key), "")
    return (1, 0, key)


# ----------------------------------------------------------------------------------------
# Collecting runs
# ----------------------------------------------------------------------------------------


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
    collapsed: bool = False  # the run's dev predictions were (nearly) all one class (results.json)
    collapse_note: str | None = None

    @property
    def run_dir(self) -> Path:
        p = self.path.parent
        return p.parent if p.name == ".hydra" else p

    @property
    def identified(self) -> bool:
        """True when the run can be placed in a table cell."""
        return bool(self.task and self.model and self.objective)

    def metrics(self, which: str = "best") -> dict | None:
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


def _one_line(msg: Any, limit: int = 300) -> str:
    text = " ".join(str(msg).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _opt_str(v: Any) -> str | None:
    if v is None:
        return None
    s = str(v).strip()
    return s or None


def _opt_int(v: Any) -> int | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    if isinstance(v, float) and v.is_integer():
        return int(v)
    if isinstance(v, str) and re.fullmatch(r"-?\d+", v.strip()):
        return int(v)
    return None


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
        return _opt_str(node.get("name"))
    if isinstance(node, (str, int, float)) and not isinstance(node, bool):
        s = _opt_str(node)
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
        raise DataError(f"cannot parse {config_path}: {_one_line(e, 200)}") from e
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
        "task_type": _opt_str(task_node.get("task_type") or task_node.get("type")),
        "model": model,
        "objective": objective,
        "teacher_objective": teacher_obj,
        "teacher_model": teacher_model,
        "seed": _opt_int(cfg.get("seed")),
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
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        return _corrupt(path, root, f"cannot read results.json: {_one_line(e, 200)}")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        return _corrupt(path, root, f"results.json is not valid JSON ({e.msg}, line {e.lineno})")
    if not isinstance(data, dict):
        return _corrupt(path, root, "results.json does not hold a JSON object")
    schema = data.get("schema")
    if schema != SCHEMA_VERSION:
        return _corrupt(path, root, f"results.json has schema {schema!r}, expected {SCHEMA_VERSION}")
    for key in ("task", "model", "objective"):
        if not _opt_str(data.get(key)):
            return _corrupt(path, root, f"results.json lacks key {key!r}")
    status = data.get("status")
    if status not in STATUSES:
        return _corrupt(path, root, f"results.json has unknown status {status!r}")
    overrides = data.get("overrides")
    err = data.get("error")
    return RunRecord(
        path=path,
        root=root,
        status=status,
        error=_one_line(err) if err not in (None, "") else None,
        experiment=_opt_str(data.get("experiment")),
        task=_opt_str(data.get("task")),
        task_type=_opt_str(data.get("task_type")),
        model=_opt_str(data.get("model")),
        objective=_opt_str(data.get("objective")),
        teacher_objective=_opt_str(data.get("teacher_objective")),
        teacher_model=_opt_str(data.get("teacher_model")),
        seed=_opt_int(data.get("seed")),
        primary_metric=_opt_str(data.get("primary_metric")),
        best=data.get("best") if isinstance(data.get("best"), dict) else None,
        final=data.get("final") if isinstance(data.get("final"), dict) else None,
        overrides=tuple(str(o) for o in overrides) if isinstance(overrides, list) else (),
        collapsed=data.get("collapsed") is True,
        collapse_note=_collapse_note(data),
        settings=run_settings(path.parent, overrides if isinstance(overrides, list) else ()),
    )


def run_settings(run_dir: Path, overrides: Iterable[str]) -> dict:
    """What a run trained with, as dotted key -> value: its run_config.json (the resolved config the
    run directory's hash was taken over), else the key=value overrides it was started with."""
    from cmiexp.runs import read_run_config
    from cmiexp.runs.identity import flatten

    record = read_run_config(run_dir)
    if record is not None:
        return {k: v for k, v in flatten(record["config"]).items() if isinstance(v, (str, int, float, bool, type(None)))}
    out = {}
    for o in overrides:
        if "=" in o:
            out[_override_key(o)] = o.split("=", 1)[1].strip()
    return out


def _collapse_note(data: dict) -> str | None:
    if data.get("collapsed") is not True:
        return None
    at = data.get("collapsed_at") or []
    hist = (data.get("predicted_class_histogram") or {}).get(at[0] if at else "best")
    return f"{' and '.join(map(str, at)) or 'dev'} predictions: {hist}" if hist else None


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
            rec.settings = run_settings(run_dir, rec.overrides)
            return rec
    return None


def _scan(directory: Path, root: Path, seen: set[Path]) -> list[RunRecord]:
    """Runs at or below ``directory``.

    A folder with results.json is a run and is not descended into (its checkpoints may hold
    config copies). A folder with only a run config is a missing run unless runs lie below it
    (then the config belongs to a sweep, not a run).
    """
    results = directory / RESULTS_FILE
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
        return [RunRecord(path=directory, root=root, status="corrupt", error=f"cannot list directory: {_one_line(e, 200)}")]
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
        if p.is_file() and p.name != RESULTS_FILE:
            raise ReportInputError(f"{p} is not a directory or a {RESULTS_FILE} file")
    records: list[RunRecord] = []
    seen: set[Path] = set()
    for p in paths:
        records.extend(_scan(p.parent if p.is_file() else p, p.parent if p.is_file() else p, seen))
    return records


# ----------------------------------------------------------------------------------------
# References
# ----------------------------------------------------------------------------------------


@dataclass
class ReferenceRow:
    label: str
    model: str | None
    values: dict[str, float]
    score: float | None


@dataclass
class ReferenceSet:
    """Published numbers from one reference file."""

    path: str
    short_cite: str
    source: dict
    note: str | None
    columns: dict[str, MetricSpec]
    rows: list[ReferenceRow]

    def citation(self) -> str:
        s = self.source
        parts = []
        authors = s.get("authors")
        if isinstance(authors, list) and authors:
            parts.append(", ".join(str(a) for a in authors))
        if s.get("title"):
            parts.append(f"\"{s['title']}\"")
        if s.get("year"):
            parts.append(str(s["year"]))
        if s.get("arxiv"):
            parts.append(f"arXiv:{s['arxiv']}")
        if s.get("table"):
            parts.append(" ".join(str(s["table"]).split()))
        if s.get("split"):
            parts.append(str(s["split"]))
        return ". ".join(p.rstrip(". ") for p in parts) if parts else self.short_cite


def default_reference_path() -> Path:
    """The shipped reference file (BERT-base and DistilBERT, Sanh et al. 2019, Table 1)."""
    from importlib import resources

    return Path(str(resources.files("cmiexp.resources") / "reference_results.yaml"))


def load_reference(path: str | os.PathLike) -> ReferenceSet:
    """Load and validate a reference file; raise ConfigError naming the file and key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"reference file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"cannot parse reference file {path}: {_one_line(e, 200)}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"reference file {path}: top level must be a mapping")
    cols = data.get("columns")
    if not isinstance(cols, dict) or not cols:
        raise ConfigError(f"reference file {path}: 'columns' must be a non-empty mapping")
    columns: dict[str, MetricSpec] = {}
    for key, spec in cols.items():
        metric = spec.get("metric") if isinstance(spec, dict) else spec
        if not metric:
            raise ConfigError(f"reference file {path}: columns.{key} needs a 'metric'")
        try:
            columns[str(key) if str(key) == "score" else task_key(str(key))] = parse_metric_spec(metric)
        except ConfigError as e:
            raise ConfigError(f"reference file {path}: columns.{key}: {e}") from None
    models = data.get("models")
    if not isinstance(models, list) or not models:
        raise ConfigError(f"reference file {path}: 'models' must be a non-empty list")
    rows = []
    for i, m in enumerate(models):
        if not isinstance(m, dict) or not _opt_str(m.get("label")):
            raise ConfigError(f"reference file {path}: models[{i}] needs a 'label'")
        vals = m.get("values")
        if not isinstance(vals, dict):
            raise ConfigError(f"reference file {path}: models[{i}].values must be a mapping")
        values: dict[str, float] = {}
        score = None
        for k, v in vals.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ConfigError(f"reference file {path}: models[{i}].values.{k} must be a number, got {v!r}")
            ck = "score" if str(k) == "score" else task_key(str(k))
            if ck not in columns:
                raise ConfigError(f"reference file {path}: models[{i}].values.{k} has no entry in 'columns'")
            if ck == "score":
                score = float(v)
            else:
                values[ck] = float(v)
        rows.append(ReferenceRow(label=str(m["label"]), model=_opt_str(m.get("model")), values=values, score=score))
    source = data.get("source") if isinstance(data.get("source"), dict) else {}
    note = data.get("note")
    return ReferenceSet(
        path=str(path),
        short_cite=_opt_str(data.get("short_cite")) or path.stem,
        source=source,
        note=" ".join(str(note).split()) if note else None,
        columns=columns,
        rows=rows,
    )


def default_references() -> list[ReferenceSet]:
    return [load_reference(default_reference_path())]


# ----------------------------------------------------------------------------------------
# Building tables
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MethodKey:
    experiment: str
    model: str
    objective: str
    teacher_objective: str | None
    variant: tuple[str, ...] = ()

    def sort_key(self) -> tuple:
        t = self.teacher_objective
        teacher_rank = (0, "") if t is None else (1, "") if t == BASELINE_OBJECTIVE else (2, t)
        obj_rank = (0, "") if self.objective == BASELINE_OBJECTIVE else (1, self.objective)
        return (self.experiment, self.model, teacher_rank, obj_rank, self.variant)

    def label(self, with_experiment: bool = False) -> str:
        s = f"{self.model} / {self.objective}"
        if self.teacher_objective:
            s += f" (teacher: {self.teacher_objective})"
        if self.variant:
            s += " [" + ", ".join(self.variant) + "]"
        if with_experiment and self.experiment:
            s = f"{self.experiment}: {s}"
        return s


@dataclass
class Cell:
    """Values (already in report units) of one method x task, plus counts of unusable runs."""

    values: list[float] = field(default_factory=list)
    seeds: list[int | None] = field(default_factory=list)
    failed: int = 0
    missing: int = 0
    running: int = 0
    no_metric: int = 0
    collapsed: int = 0  # completed runs among ``values`` whose dev predictions were one class
    reference: bool = False

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float | None:
        return mean_std(self.values)[0]

    @property
    def std(self) -> float | None:
        return mean_std(self.values)[1]

    @property
    def empty(self) -> bool:
        return self.n == 0 and not (self.failed or self.missing or self.running or self.no_metric)


@dataclass
class Column:
    key: str
    header: str
    metric: MetricSpec
    digits: int

    @property
    def scale(self) -> int:
        return 100 if self.metric.scaled else 1


@dataclass
class Row:
    label: str
    kind: str  # "reference" | "run"
    cells: dict[str, Cell]
    method: MethodKey | None = None
    average: float | None = None
    average_count: int = 0


@dataclass
class DeltaRow:
    label: str
    baseline: str
    method: MethodKey
    deltas: dict[str, float | None]
    average: float | None
    average_count: int


@dataclass
class Problem:
    kind: str  # failed | corrupt | missing | running | no metric
    label: str | None
    task: str | None
    seed: int | None
    path: str
    message: str


@dataclass
class Table:
    title: str
    name: str  # "main" or the extra metric's name (the CSV's `table` column)
    which: str
    columns: list[Column]
    rows: list[Row]
    deltas: list[DeltaRow] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    references: list[ReferenceSet] = field(default_factory=list)
    show_average: bool = True
    show_problems: bool = True

    @property
    def averaged_columns(self) -> list[Column]:
        return _averaged_columns(self.columns)

    @property
    def average_of(self) -> int:
        return len(self.averaged_columns)


def _override_key(o: str) -> str:
    return o.lstrip("+~").split("=", 1)[0].strip()


def _variant(rec: RunRecord, group_by: Sequence[str]) -> tuple[str, ...]:
    if not group_by:
        return ()
    found = {}
    for o in rec.overrides:
        k = _override_key(o)
        if k in group_by and "=" in o:
            found[k] = f"{k}={o.split('=', 1)[1].strip()}"
    for k in group_by:  # the value the run trained with wins over how it was spelled
        if k in rec.settings:
            found[k] = f"{k}={rec.settings[k]}"
    return tuple(found[k] for k in group_by if k in found)


# Keys that place a run in a cell already (its column and row) or are the replicate index.
_CELL_KEYS = ("seed", "task.name", "model.name", "objective.name")


def varying_keys(records: Sequence[RunRecord]) -> tuple[list[str], list[str]]:
    """Config keys whose values differ between runs that would share a table cell (same task,
    experiment, model, objective and teacher), other than the seed: averaging over them would mix
    different trainings as if they were seeds. Returns (keys to group by, keys that vary only
    with the seed, one value per seed, such as a per-seed teacher or starting checkpoint: those
    are replicates and are not split, but named).

    Only keys known for at least two runs of a cell are compared (a run written before
    run_config.json existed knows only its overrides)."""
    cells: dict[tuple, list[RunRecord]] = {}
    for r in records:
        if r.identified and r.status == "completed":
            cells.setdefault((task_key(r.task), _method_of(r, ())), []).append(r)
    group, per_seed = set(), set()
    for runs in cells.values():
        if len(runs) < 2:
            continue
        keys = {k for r in runs for k in r.settings} - set(_CELL_KEYS)
        for k in keys:
            have = [r for r in runs if k in r.settings]
            if len(have) < 2 or len({json.dumps(r.settings[k], sort_keys=True) for r in have}) < 2:
                continue
            by_seed: dict = {}
            for r in have:
                by_seed.setdefault(r.seed, set()).add(json.dumps(r.settings[k], sort_keys=True))
            values = {v for vs in by_seed.values() for v in vs}
            one_per_seed = all(len(vs) == 1 for vs in by_seed.values()) and len(values) == len(by_seed)
            (per_seed if one_per_seed else group).add(k)
    return sorted(group), sorted(per_seed - group)


def _method_of(rec: RunRecord, group_by: Sequence[str]) -> MethodKey:
    return MethodKey(
        experiment=rec.experiment or "",
        model=rec.model or "",
        objective=rec.objective or "",
        teacher_objective=rec.teacher_objective,
        variant=_variant(rec, group_by),
    )


def _resolve_task_metric(
    key: str,
    recs: list[RunRecord],
    overrides: Mapping[str, MetricSpec],
    use_primary: bool,
    fixed: MetricSpec | None,
    which: str,
    notes: list[str],
) -> MetricSpec:
    if fixed is not None:
        return fixed
    full_names = {r.task for r in recs if r.task}
    for name in [key, *sorted(full_names)]:
        if name in overrides:
            return overrides[name]
    primaries = Counter(r.primary_metric for r in recs if r.primary_metric)

    def most_common_primary() -> MetricSpec | None:
        if not primaries:
            return None
        if len(primaries) > 1:
            notes.append(
                f"{task_header(key)}: runs disagree on primary_metric "
                f"({', '.join(sorted(primaries))}); using the most common"
            )
        return parse_metric_spec(primaries.most_common(1)[0][0])

    if use_primary:
        spec = most_common_primary()
        if spec is not None:
            return spec
    if key in GLUE_HEADERS:
        return parse_metric_spec(GLUE_DEFAULT_METRICS.get(key, "accuracy"))
    # Outside GLUE: regression tasks report their primary metric; classification accuracy
    # when the runs record it, else whatever they declared primary.
    if any(r.task_type == "regression" for r in recs):
        spec = most_common_primary()
        if spec is not None:
            return spec
    if any("accuracy" in (r.metrics(which) or {}) for r in recs):
        return MetricSpec(("accuracy",))
    return most_common_primary() or MetricSpec(("accuracy",))


def _baseline_candidates(m: MethodKey) -> list[MethodKey]:
    """Baselines in order of preference.

    A student taught by a non-CE teacher (kd, teacher mcmi) is compared with the same
    student taught by a CE teacher; any other non-CE objective with plain CE fine-tuning of
    the same model in the same experiment.
    """
    out = []
    if m.teacher_objective not in (None, BASELINE_OBJECTIVE):
        out.append(MethodKey(m.experiment, m.model, m.objective, BASELINE_OBJECTIVE, m.variant))
    if m.objective != BASELINE_OBJECTIVE:
        out.append(MethodKey(m.experiment, m.model, BASELINE_OBJECTIVE, m.teacher_objective, m.variant))
    return out


def _averaged_columns(columns: Sequence[Column]) -> list[Column]:
    """Columns the Average spans: the x100 scores when there are any.

    Averaging an error (mse) or a CMI value with accuracies gives a meaningless number, so
    unscaled columns join the average only in a table that has no scores at all.
    """
    scores = [c for c in columns if c.metric.scaled]
    return scores if scores else list(columns)


def _row_average(cells: Mapping[str, Cell], columns: Sequence[Column]) -> tuple[float | None, int]:
    columns = _averaged_columns(columns)
    means = [cells[c.key].mean for c in columns if c.key in cells and cells[c.key].n > 0]
    if not means:
        return None, 0
    return math.fsum(means) / len(means), len(means)


def build_table(
    records: Sequence[RunRecord],
    *,
    metric_overrides: Mapping[str, str | MetricSpec] | None = None,
    use_primary: bool = False,
    metric: str | MetricSpec | None = None,
    which: str = "best",
    references: Sequence[ReferenceSet] = (),
    experiments: Sequence[str] | None = None,
    tasks: Sequence[str] | None = None,
    group_by: Sequence[str] | None = None,
    average_over: Sequence[str] = (),
    deltas: bool = True,
    average: bool = True,
    digits: int | None = None,
    show_problems: bool = True,
    title: str | None = None,
) -> Table:
    """Aggregate runs into a method x task table.

    ``metric`` fixes one metric for every task (diagnostics tables such as ``cmi``); without it
    each task uses its report metric: ``metric_overrides`` (task -> metric), else the runs'
    ``primary_metric`` when ``use_primary``, else the DistilBERT-paper defaults.
    ``which`` picks ``best`` or ``final`` metrics. Values are x100 for GLUE-style scores.

    Rows never average different trainings: by default (``group_by=None``) methods are split by
    every config key that varies across the runs of a cell other than the seed
    (:func:`varying_keys`), minus ``average_over``, and a note names them; an explicit
    ``group_by`` (possibly empty) replaces that choice.
    """
    if which not in ("best", "final"):
        raise ConfigError(f"which must be 'best' or 'final', got {which!r}")
    overrides: dict[str, MetricSpec] = {}
    for t, m in (metric_overrides or {}).items():
        spec = m if isinstance(m, MetricSpec) else parse_metric_spec(m)
        overrides[task_key(t)] = spec
        overrides[str(t)] = spec
    fixed = None if metric is None else (metric if isinstance(metric, MetricSpec) else parse_metric_spec(metric))

    # Filters. Unidentified (corrupt, no config) records cannot be filtered; they are kept so
    # a broken file is always reported.
    wanted_exp = set(experiments) if experiments else None
    wanted_tasks = {task_key(t) for t in tasks} | set(tasks) if tasks else None
    kept = []
    for r in records:
        if r.identified:
            if wanted_exp is not None and (r.experiment or "") not in wanted_exp:
                continue
            if wanted_tasks is not None and task_key(r.task) not in wanted_tasks and r.task not in wanted_tasks:
                continue
        kept.append(r)
    placed = [r for r in kept if r.identified]

    notes: list[str] = []
    by_task: dict[str, list[RunRecord]] = {}
    for r in placed:
        by_task.setdefault(task_key(r.task), []).append(r)
    columns = []
    for key in sorted(by_task, key=_task_sort_key):
        spec = _resolve_task_metric(key, by_task[key], overrides, use_primary, fixed, which, notes)
        d = digits if digits is not None else (1 if spec.scaled else 3)
        columns.append(Column(key=key, header=task_header(key), metric=spec, digits=d))
    col_by_key = {c.key: c for c in columns}

    if group_by is None:
        auto, per_seed = varying_keys(placed)
        group_by = tuple(k for k in auto if k not in set(average_over))
        if group_by:
            notes.append(f"rows split by {', '.join(group_by)}: these keys vary across runs other than the seed "
                         "(--average-over KEY to pool them, --group-by KEY to choose)")
        elif not average_over:
            notes.append("each cell pools runs whose configs differ only in the seed")
        pooled = [k for k in auto if k in set(average_over)]
        if pooled:
            notes.append(f"pooled as replicates on request (--average-over): {', '.join(pooled)}")
        if per_seed:
            notes.append(f"one value per seed, pooled as replicates: {', '.join(per_seed)}")
    group_by = tuple(group_by)
    experiments_present = {r.experiment or "" for r in placed}
    multi_exp = len(experiments_present) > 1
    methods: dict[MethodKey, dict[str, Cell]] = {}
    problems: list[Problem] = []
    collapsed_notes: list[str] = []
    for r in placed:
        mk = _method_of(r, group_by)
        col = col_by_key[task_key(r.task)]
        cell = methods.setdefault(mk, {}).setdefault(col.key, Cell())
        label = mk.label(multi_exp)
        if r.status == "completed":
            v = col.metric.value(r.metrics(which))
            if v is None:
                cell.no_metric += 1
                have = ", ".join(sorted((r.metrics(which) or {}).keys())) or "none"
                problems.append(
                    Problem("no metric", label, col.header, r.seed, r.display_path,
                            f"{which}.metrics lacks a finite {col.metric.name} (has: {have})")
                )
            else:
                cell.values.append(v * col.scale)
                cell.seeds.append(r.seed)
                if r.collapsed:
                    # Counted in the mean (it is a result), but marked: it is the majority-class rate.
                    cell.collapsed += 1
                    collapsed_notes.append(f"{label}, {col.header}, seed {r.seed}: collapsed, the dev predictions "
                                           f"are (nearly) all one class ({r.collapse_note or 'see results.json'})")
        elif r.status in ("failed", "corrupt"):
            cell.failed += 1
            problems.append(Problem(r.status, label, col.header, r.seed, r.display_path, r.error or "no error message"))
        elif r.status == "missing":
            cell.missing += 1
            problems.append(Problem("missing", label, col.header, r.seed, r.display_path, r.error or ""))
        elif r.status == "running":
            cell.running += 1
            problems.append(Problem("running", label, col.header, r.seed, r.display_path, "status is still 'running'"))
    for r in kept:
        if not r.identified:
            problems.append(Problem(r.status, None, None, r.seed, r.display_path, r.error or ""))

    notes.extend(sorted(collapsed_notes))
    # Several completed runs with the same seed in one cell usually mean different
    # hyperparameters were mixed (see --group-by); say so instead of averaging silently.
    for mk, cells in methods.items():
        for key, cell in cells.items():
            dup = sorted(s for s, c in Counter(cell.seeds).items() if c > 1 and s is not None)
            if dup:
                notes.append(
                    f"{mk.label(multi_exp)}, {col_by_key[key].header}: several completed runs with seed "
                    f"{', '.join(map(str, dup))} were averaged (use --group-by KEY to split them by a config key)"
                )

    rows: list[Row] = []
    if fixed is None:
        for ref in references:
            for rr in ref.rows:
                cells = {}
                for c in columns:
                    # Only next to the same metric: a number for another metric would mislead.
                    if c.key in rr.values and ref.columns.get(c.key) == c.metric:
                        cells[c.key] = Cell(values=[rr.values[c.key]], reference=True)
                if cells:
                    row = Row(label=f"{rr.label} ({ref.short_cite})", kind="reference", cells=cells)
                    row.average, row.average_count = _row_average(cells, columns)
                    rows.append(row)
    method_rows: dict[MethodKey, Row] = {}
    for mk in sorted(methods, key=MethodKey.sort_key):
        row = Row(label=mk.label(multi_exp), kind="run", cells=methods[mk], method=mk)
        row.average, row.average_count = _row_average(row.cells, columns)
        rows.append(row)
        method_rows[mk] = row

    delta_rows: list[DeltaRow] = []
    if deltas:
        for mk, row in method_rows.items():
            base = next((method_rows[b] for b in _baseline_candidates(mk) if b in method_rows), None)
            if base is None:
                continue
            ds: dict[str, float | None] = {}
            for c in columns:
                a, b = row.cells.get(c.key), base.cells.get(c.key)
                ds[c.key] = a.mean - b.mean if a and b and a.n and b.n else None
            present = [ds[c.key] for c in _averaged_columns(columns) if ds[c.key] is not None]
            avg = math.fsum(present) / len(present) if present else None
            delta_rows.append(DeltaRow(row.label, base.label, mk, ds, avg, len(present)))

    problems.sort(key=lambda p: (p.label or "~", p.task or "", p.seed if p.seed is not None else -1, p.path))
    if title is None:
        title = (
            f"Diagnostics: {fixed.name} ({which}.metrics), mean ± std over seeds"
            if fixed is not None
            else f"Results ({which}.metrics), mean ± std over seeds"
        )
    return Table(
        title=title,
        name="main" if fixed is None else fixed.name,
        which=which,
        columns=columns,
        rows=rows,
        deltas=delta_rows,
        problems=problems,
        notes=notes,
        references=[r for r in references if fixed is None],
        show_average=average,
        show_problems=show_problems,
    )


# ----------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------


def _fmt(x: float, digits: int) -> str:
    s = f"{x:.{digits}f}"
    # "-0.0" is just rounding noise around zero.
    return s[1:] if s.startswith("-") and float(s) == 0 else s


def _fmt_delta(x: float, digits: int) -> str:
    s = _fmt(x, digits)
    return s if s.startswith("-") else "+" + s


def _counts(cell: Cell) -> list[str]:
    out = []
    for n, word in (
        (cell.failed, "failed"),
        (cell.missing, "missing"),
        (cell.running, "running"),
        (cell.no_metric, "without metric"),
        (cell.collapsed, "collapsed"),
    ):
        if n:
            out.append(f"{n} {word}")
    return out


def _cell_text(cell: Cell | None, digits: int, pm: str, dash: str) -> str:
    if cell is None or cell.empty:
        return dash
    if cell.reference:
        return _fmt(cell.mean, digits)
    extras = _counts(cell)
    if cell.n == 0:
        return f"{dash} ({', '.join(extras)})"
    text = _fmt(cell.mean, digits)
    if cell.n >= 2:
        text += f" {pm} {_fmt(cell.std, digits)}"
    return text + " (" + ", ".join([f"n={cell.n}", *extras]) + ")"


def _avg_text(value: float | None, count: int, total: int, digits: int, dash: str, fmt=_fmt) -> str:
    if value is None:
        return dash
    s = fmt(value, digits)
    return s if count >= total else f"{s} ({count}/{total} tasks)"


def _avg_digits(table: Table) -> int:
    return max((c.digits for c in table.averaged_columns), default=1)


def _md_escape(s: str) -> str:
    return s.replace("|", "\\|")


def _md_table(header: list[str], body: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(_md_escape(h) for h in header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(_md_escape(c) for c in row) + " |" for row in body]
    return lines


def _metric_legend(table: Table) -> str:
    if len(table.columns) > 1 and len({c.metric for c in table.columns}) == 1:
        c = table.columns[0]
        return f"Metric: {c.metric.name}" + (" ×100" if c.scale == 100 else "")
    parts = []
    for c in table.columns:
        parts.append(f"{c.header} = {c.metric.name}" + (" ×100" if c.scale == 100 else ""))
    return "Metric per task: " + "; ".join(parts)


def _average_legend(table: Table) -> str:
    text = " Average: mean of the row's task means (k/N tasks when some are missing)"
    left_out = [c.header for c in table.columns if c not in table.averaged_columns]
    if left_out:
        text += f"; {', '.join(left_out)} not averaged (not ×100 scores)"
    return text + "."


def _render_md_one(table: Table) -> str:
    out = [f"## {table.title}", ""]
    if not table.columns:
        out += ["No runs.", ""]
        return "\n".join(out)
    ad = _avg_digits(table)
    header = ["Method", *[c.header for c in table.columns]] + (["Average"] if table.show_average else [])
    body = []
    for row in table.rows:
        line = [row.label] + [_cell_text(row.cells.get(c.key), c.digits, "±", DASH) for c in table.columns]
        if table.show_average:
            line.append(_avg_text(row.average, row.average_count, table.average_of, ad, DASH))
        body.append(line)
    out += _md_table(header, body)
    out += [
        "",
        f"{_metric_legend(table)}. Cells: mean ± sample std (ddof=1) over seeds, "
        f"n = completed runs; {DASH} = no completed run; failed, missing (no results.json) and "
        f"running runs are counted in parentheses."
        + (_average_legend(table) if table.show_average else ""),
    ]
    if table.deltas:
        out += ["", "### Δ vs baseline", ""]
        header = ["Method", "Baseline", *[c.header for c in table.columns]] + (["Average"] if table.show_average else [])
        body = []
        for d in table.deltas:
            line = [d.label, d.baseline] + [
                DASH if d.deltas.get(c.key) is None else _fmt_delta(d.deltas[c.key], c.digits) for c in table.columns
            ]
            if table.show_average:
                line.append(_avg_text(d.average, d.average_count, table.average_of, ad, DASH, _fmt_delta))
            body.append(line)
        out += _md_table(header, body)
    if table.references and any(r.kind == "reference" for r in table.rows):
        out += ["", "### References", ""]
        for ref in table.references:
            scores = ", ".join(f"{r.label} {r.score!r}" for r in ref.rows if r.score is not None)
            line = f"- {ref.short_cite}: {ref.citation()}."
            if scores:
                line += f" Published score: {scores}."
            out.append(line)
    if table.notes:
        out += ["", "### Notes", ""] + [f"- {n}" for n in table.notes]
    if table.show_problems and table.problems:
        out += ["", f"### Failed, missing and unreadable runs ({len(table.problems)})", ""]
        for p in table.problems:
            where = ", ".join(x for x in (p.label, p.task, None if p.seed is None else f"seed {p.seed}") if x)
            where = f" {where}:" if where else ""
            out.append(f"- {p.kind}:{where} {p.message} (`{p.path}`)")
    out.append("")
    return "\n".join(out)


def _as_tables(tables: Table | Sequence[Table]) -> list[Table]:
    return [tables] if isinstance(tables, Table) else list(tables)


def render_markdown(tables: Table | Sequence[Table]) -> str:
    """Markdown for one table or several (main table first, diagnostics after)."""
    return "\n".join(_render_md_one(t) for t in _as_tables(tables))


CSV_FIELDS = (
    "table", "kind", "method", "experiment", "model", "objective", "teacher_objective", "variant",
    "task", "metric", "scale", "mean", "std", "n", "failed", "missing", "running", "no_metric",
    "seeds", "baseline", "delta",
)  # fmt: skip


def _num(x: float | None) -> str:
    return "" if x is None else repr(round(x, 6) + 0.0)


def render_csv(tables: Table | Sequence[Table]) -> str:
    """Tidy CSV: one row per table x method x task (task ``average`` for the Average column)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    w.writeheader()
    for t in _as_tables(tables):
        deltas = {d.method: d for d in t.deltas}
        for row in t.rows:
            m = row.method
            d = deltas.get(m) if m else None
            base = {
                "table": t.name,
                "kind": row.kind,
                "method": row.label,
                "experiment": m.experiment if m else "",
                "model": m.model if m else "",
                "objective": m.objective if m else "",
                "teacher_objective": (m.teacher_objective or "") if m else "",
                "variant": " ".join(m.variant) if m else "",
                "baseline": d.baseline if d else "",
            }
            for c in t.columns:
                cell = row.cells.get(c.key) or Cell()
                rec = dict(base)
                rec.update(
                    task=c.key, metric=c.metric.name, scale=c.scale, mean=_num(cell.mean), std=_num(cell.std),
                    n=cell.n, failed=cell.failed, missing=cell.missing, running=cell.running,
                    no_metric=cell.no_metric, seeds=" ".join(str(s) for s in cell.seeds if s is not None),
                    delta=_num(d.deltas.get(c.key)) if d else "",
                )  # fmt: skip
                w.writerow(rec)
            if t.show_average:
                rec = dict(base)
                rec.update(
                    task="average", metric="", scale="", mean=_num(row.average), std="", n=row.average_count,
                    failed="", missing="", running="", no_metric="", seeds="", delta=_num(d.average) if d else "",
                )  # fmt: skip
                w.writerow(rec)
    return buf.getvalue()


_TEX_SPECIAL = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    DASH: "--",
    "±": r"$\pm$",
    "×": r"$\times$",
    "Δ": r"$\Delta$",
}


def latex_escape(s: str) -> str:
    return "".join(_TEX_SPECIAL.get(ch, ch) for ch in str(s))


def _tex_cell(cell: Cell | None, digits: int) -> str:
    text = _cell_text(cell, digits, "±", DASH)
    return latex_escape(text)


def _render_tex_one(t: Table) -> list[str]:
    out = [f"% {latex_escape(t.title)}"]
    if not t.columns:
        return out + ["% no runs"]
    ad = _avg_digits(t)
    ncols = len(t.columns) + (1 if t.show_average else 0)
    out += [r"\begin{tabular}{l" + "r" * ncols + "}", r"\toprule"]
    header = ["Method", *[c.header for c in t.columns]] + (["Average"] if t.show_average else [])
    out.append(" & ".join(latex_escape(h) for h in header) + r" \\")
    out.append(r"\midrule")
    prev_kind = None
    for row in t.rows:
        if prev_kind == "reference" and row.kind != "reference":
            out.append(r"\midrule")
        prev_kind = row.kind
        cells = [latex_escape(row.label)] + [_tex_cell(row.cells.get(c.key), c.digits) for c in t.columns]
        if t.show_average:
            cells.append(latex_escape(_avg_text(row.average, row.average_count, t.average_of, ad, DASH)))
        out.append(" & ".join(cells) + r" \\")
    out += [r"\bottomrule", r"\end{tabular}"]
    if t.deltas:
        out += ["", f"% {latex_escape('Δ vs baseline')}", r"\begin{tabular}{ll" + "r" * ncols + "}", r"\toprule"]
        header = ["Method", "Baseline", *[c.header for c in t.columns]] + (["Average"] if t.show_average else [])
        out.append(" & ".join(latex_escape(h) for h in header) + r" \\")
        out.append(r"\midrule")
        for d in t.deltas:
            cells = [latex_escape(d.label), latex_escape(d.baseline)] + [
                "--" if d.deltas.get(c.key) is None else _fmt_delta(d.deltas[c.key], c.digits) for c in t.columns
            ]
            if t.show_average:
                cells.append(latex_escape(_avg_text(d.average, d.average_count, t.average_of, ad, DASH, _fmt_delta)))
            out.append(" & ".join(cells) + r" \\")
        out += [r"\bottomrule", r"\end{tabular}"]
    if t.notes:
        out.append("")
        out += [f"% note: {n}" for n in t.notes]
    if t.show_problems and t.problems:
        out.append("")
        for p in t.problems:
            where = ", ".join(x for x in (p.label, p.task, None if p.seed is None else f"seed {p.seed}") if x)
            where = f" {where}:" if where else ""
            out.append(f"% {p.kind}:{where} {p.message} ({p.path})")
    return out


def render_latex(tables: Table | Sequence[Table]) -> str:
    """LaTeX tabulars (booktabs); labels and headers are escaped."""
    out = [r"% Generated by cmiexp-report; needs \usepackage{booktabs}."]
    for t in _as_tables(tables):
        out += [""] + _render_tex_one(t)
    return "\n".join(out) + "\n"


def write_report(tables: Table | Sequence[Table], out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write report.md, report.csv and report.tex atomically into ``out_dir``."""
    out_dir = Path(out_dir)
    files = {
        "md": (out_dir / "report.md", render_markdown(tables)),
        "csv": (out_dir / "report.csv", render_csv(tables)),
        "tex": (out_dir / "report.tex", render_latex(tables)),
    }
    for path, text in files.values():
        atomic_write_text(path, text)
    return {k: v[0] for k, v in files.items()}


# ----------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------


def _metric_override_arg(text: str) -> tuple[str, MetricSpec]:
    task, sep, metric = text.partition("=")
    if not sep or not task.strip() or not metric.strip():
        raise argparse.ArgumentTypeError(f"expected TASK=METRIC, got {text!r}")
    try:
        return task.strip(), parse_metric_spec(metric)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _metric_arg(text: str) -> MetricSpec:
    try:
        return parse_metric_spec(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _digits_arg(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = -1
    if not 0 <= n <= 10:
        raise argparse.ArgumentTypeError(f"expected an integer 0..10, got {text!r}")
    return n


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cmiexp-report",
        description="Aggregate cmiexp runs (every results.json under the given directories) into "
        "mean ± std tables; writes report.md, report.csv and report.tex.",
        epilog="examples:\n"
        "  cmiexp-report outputs/runs/cmi_glue                       # rows split by every key that varies\n"
        "  cmiexp-report outputs/runs/cmi_glue --group-by trainer.lr # split by exactly this key\n"
        "  cmiexp-report outputs/runs/cmi_glue --average-over trainer.lr  # pool two lrs as replicates\n"
        "  cmiexp-report outputs/runs/cmi_glue --extra-metric cmi --metric mrpc=f1",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("paths", nargs="+", metavar="DIR", help="run directory, sweep directory or outputs/")
    p.add_argument("--out", metavar="DIR", help="where to write the report files (default: the first DIR)")
    p.add_argument(
        "--metric", action="append", default=[], type=_metric_override_arg, metavar="TASK=METRIC",
        help="report metric of a task, e.g. mrpc=f1 or stsb='mean(pearson,spearman)' (repeatable)",
    )  # fmt: skip
    p.add_argument("--primary", action="store_true", help="use each task's primary_metric instead of the paper defaults")
    p.add_argument("--final", action="store_true", help="use final.metrics instead of best.metrics")
    p.add_argument("--experiment", action="append", metavar="NAME", help="only this experiment (repeatable)")
    p.add_argument("--task", action="append", metavar="TASK", help="only this task, e.g. glue/rte or rte (repeatable)")
    p.add_argument(
        "--extra-metric", action="append", default=[], type=_metric_arg, metavar="METRIC",
        help="add a diagnostics table of this metric, unscaled unless a GLUE score (e.g. cmi)",
    )  # fmt: skip
    p.add_argument(
        "--group-by", action="append", default=None, metavar="KEY",
        help="split rows by exactly these config keys, e.g. --group-by trainer.lr (repeatable; default: every key "
        "that varies across the runs of a cell other than the seed)",
    )  # fmt: skip
    p.add_argument(
        "--average-over", action="append", default=[], metavar="KEY",
        help="pool runs that differ in this key as if they were seeds, e.g. --average-over trainer.lr (repeatable)",
    )  # fmt: skip
    p.add_argument("--reference", action="append", default=[], metavar="FILE", help="extra reference YAML (repeatable)")
    p.add_argument("--no-reference", action="store_true", help="omit all reference rows")
    p.add_argument("--digits", type=_digits_arg, metavar="N", help="decimals (default 1 for x100 scores, 3 otherwise)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse already printed the usage error
        return e.code if isinstance(e.code, int) else 0
    try:
        records = collect_runs(args.paths)
        if not records:
            raise DataError(f"no results.json or run configs found under {', '.join(args.paths)}")
        refs: list[ReferenceSet] = []
        if not args.no_reference:
            refs = default_references() + [load_reference(f) for f in args.reference]
        common = dict(
            which="final" if args.final else "best",
            experiments=args.experiment,
            tasks=args.task,
            group_by=None if args.group_by is None else tuple(args.group_by),
            average_over=tuple(args.average_over),
            digits=args.digits,
        )
        main_table = build_table(
            records,
            metric_overrides=dict(args.metric),
            use_primary=args.primary,
            references=refs,
            **common,
        )
        if not main_table.columns:
            found = sorted({r.experiment or "" for r in records if r.identified})
            raise DataError(
                "no runs match the filters"
                + (f" (experiments found: {', '.join(found)})" if found else " (no readable runs found)")
            )
        tables = [main_table] + [
            build_table(records, metric=m, deltas=False, average=False, show_problems=False, **common)
            for m in args.extra_metric
        ]
        first = Path(args.paths[0])
        out_dir = Path(args.out) if args.out else (first.parent if first.is_file() else first)
        md = render_markdown(tables)
        try:
            write_report(tables, out_dir)
        except OSError as e:
            raise DataError(f"cannot write the report to {out_dir}: {_one_line(e, 200)}") from e
    except ReportInputError as e:
        print(f"cmiexp-report: error: {e}", file=sys.stderr)
        return 2
    except CmiexpError as e:
        print(f"cmiexp-report: error: {e}", file=sys.stderr)
        return 1
    sys.stdout.write(md)
    print(f"cmiexp-report: wrote report.md, report.csv, report.tex to {out_dir}", file=sys.stderr)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
