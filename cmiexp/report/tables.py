"""Building tables: runs grouped into method x task cells, with reference rows and deltas.

Rows never average different trainings: a row is a method (experiment, model, objective, teacher
objective) split further by every config key that varies within a cell other than the seed
(:func:`varying_keys`). Columns are tasks, each with its report metric.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

from cmiexp.errors import ConfigError
from cmiexp.report.collect import SPLITS, RunRecord, override_key
from cmiexp.report.references import ReferenceSet
from cmiexp.report.specs import (BASELINE_OBJECTIVE, GLUE_DEFAULT_METRICS, GLUE_HEADERS, MetricSpec, mean_std,
                                 parse_metric_spec, task_header, task_key, task_sort_key)


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

    def label(self, with_experiment: bool = False, teacher_hashes: Sequence[str] = ()) -> str:
        """``model / objective (teacher: objective hash...) [key=value...]``; ``teacher_hashes`` are the
        run hashes of the teachers of the row's runs (results.json ``teacher``), when recorded."""
        s = f"{self.model} / {self.objective}"
        if self.teacher_objective or teacher_hashes:
            s += " (teacher: " + " ".join([self.teacher_objective or "?", ", ".join(teacher_hashes)]).strip() + ")"
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
    run_dirs: list[Path] = field(default_factory=list)  # the run behind each value (for its curves)
    failed: int = 0
    missing: int = 0
    running: int = 0
    interrupted: int = 0  # stopped before the end (signal or trainer.stop_after_steps); resumable
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
        return self.n == 0 and not (self.failed or self.missing or self.running or self.interrupted or self.no_metric)


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
    teachers: tuple[str, ...] = ()  # "objective hash" of each distinct teacher of the row's runs
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
    split: str = "dev"  # "dev" (best/final dev metrics) or "test" (results.json test)
    split_by: tuple[str, ...] = ()  # config keys the rows are split by (named under the title)

    @property
    def averaged_columns(self) -> list[Column]:
        return _averaged_columns(self.columns)

    @property
    def average_of(self) -> int:
        return len(self.averaged_columns)


def _variant(rec: RunRecord, group_by: Sequence[str]) -> tuple[str, ...]:
    if not group_by:
        return ()
    found = {}
    for o in rec.overrides:
        k = override_key(o)
        if k in group_by and "=" in o:
            found[k] = f"{k}={o.split('=', 1)[1].strip()}"
    for k in group_by:  # the value the run trained with wins over how it was spelled
        if k in rec.settings:
            found[k] = f"{k}={rec.settings[k]}"
        elif k not in found and setting_of(rec, k) == UNSET:
            found[k] = f"{k}={UNSET}"
    return tuple(found[k] for k in group_by if k in found)


#: How a key absent from a run's whole hashed config is shown (and compared): the run trained before
#: the key existed, so it is not the same training as a run that has it.
UNSET = "(unset)"
#: How a key is compared in a run where it holds keys of its own (a mapping against another run's null).
MAPPING = "(a mapping)"


def setting_of(rec: RunRecord, key: str) -> str | None:
    """``key``'s value in ``rec`` as compared between runs (JSON); ``UNSET`` when the run's whole config
    lacks it; ``MAPPING`` when it holds keys of its own in this run (``objective.teacher_config`` set
    here, null in another run); None when it cannot be compared: unknown (a run known only by its
    overrides), or a key below one the run has as a leaf (``objective.teacher_config.model`` where
    ``objective.teacher_config`` is null), whose difference that leaf already carries."""
    if key in rec.settings:
        return json.dumps(rec.settings[key], sort_keys=True, default=str)
    if not rec.settings_complete:
        return None
    parts = key.split(".")
    if any(".".join(parts[:i]) in rec.settings for i in range(1, len(parts))):
        return None
    if any(k.startswith(key + ".") for k in rec.settings):
        return MAPPING
    return UNSET


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
            have = [(r, v) for r in runs if (v := setting_of(r, k)) is not None]
            if len(have) < 2 or len({v for _, v in have}) < 2:
                continue
            if any(v in (MAPPING, UNSET) for _, v in have) and not all(r.settings_complete for r, _ in have):
                # an override of a run known only by its overrides (`task=glue/rte`, `experiment=x`) against
                # a whole config where the key is a group or no key at all: not comparable
                continue
            by_seed: dict = {}
            for r, v in have:
                by_seed.setdefault(r.seed, set()).add(v)
            values = {v for vs in by_seed.values() for v in vs}
            # a key some runs lack is a change of config layout (an older cmiexp), never a per-seed replicate
            one_per_seed = (all(len(vs) == 1 for vs in by_seed.values()) and len(values) == len(by_seed)
                            and UNSET not in values)
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
    split: str,
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
    if any("accuracy" in (r.metrics(which, split) or {}) for r in recs):
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


def select_records(records: Sequence[RunRecord], experiments: Sequence[str] | None = None,
                   tasks: Sequence[str] | None = None) -> list[RunRecord]:
    """The records that pass the ``--experiment`` / ``--task`` filters. Unidentified (corrupt, no
    config) records cannot be filtered; they are kept so a broken file is always reported."""
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
    return kept


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
    split: str = "dev",
) -> Table:
    """Aggregate runs into a method x task table.

    ``metric`` fixes one metric for every task (diagnostics tables such as ``cmi``); without it
    each task uses its report metric: ``metric_overrides`` (task -> metric), else the runs'
    ``primary_metric`` when ``use_primary``, else the DistilBERT-paper defaults.
    ``which`` picks ``best`` or ``final`` metrics. Values are x100 for GLUE-style scores.
    ``split="test"`` shows the test metrics instead (results.json ``test``: the selected model
    evaluated once on the test split, for tasks that have a labelled one); runs without them count
    as "without metric", and reference rows are kept only when their source is a test split.

    Rows never average different trainings: by default (``group_by=None``) methods are split by
    every config key that varies across the runs of a cell other than the seed
    (:func:`varying_keys`), minus ``average_over``, and a note names them; an explicit
    ``group_by`` (possibly empty) replaces that choice.
    """
    if which not in ("best", "final"):
        raise ConfigError(f"which must be 'best' or 'final', got {which!r}")
    if split not in SPLITS:
        raise ConfigError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    overrides: dict[str, MetricSpec] = {}
    for t, m in (metric_overrides or {}).items():
        spec = m if isinstance(m, MetricSpec) else parse_metric_spec(m)
        overrides[task_key(t)] = spec
        overrides[str(t)] = spec
    fixed = None if metric is None else (metric if isinstance(metric, MetricSpec) else parse_metric_spec(metric))

    kept = select_records(records, experiments, tasks)
    placed = [r for r in kept if r.identified]

    notes: list[str] = []
    by_task: dict[str, list[RunRecord]] = {}
    for r in placed:
        by_task.setdefault(task_key(r.task), []).append(r)
    columns = []
    for key in sorted(by_task, key=task_sort_key):
        spec = _resolve_task_metric(key, by_task[key], overrides, use_primary, fixed, which, split, notes)
        d = digits if digits is not None else (1 if spec.scaled else 3)
        columns.append(Column(key=key, header=task_header(key), metric=spec, digits=d))
    col_by_key = {c.key: c for c in columns}

    auto, per_seed = varying_keys(placed)
    if group_by is not None:
        unsplit = [k for k in auto if k not in set(group_by) | set(average_over)]
        if unsplit:
            notes.append(f"runs of one row also differ in {', '.join(unsplit)} (not split: --group-by chose the "
                         "keys; add them to split, or --average-over to pool them knowingly)")
    if group_by is None:
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
    # The teachers of each row's runs (results.json ``teacher``), named in the row label: a row of
    # per-seed teachers lists each; the hash is not a grouping key (one teacher per seed is a replicate).
    teachers: dict[MethodKey, set[str]] = {}
    for r in placed:
        if r.teacher_hash:
            teachers.setdefault(_method_of(r, group_by), set()).add(r.teacher_hash)
    teacher_hashes = {mk: tuple(sorted(hs)) for mk, hs in teachers.items()}

    def label_of(mk: MethodKey) -> str:
        return mk.label(multi_exp, teacher_hashes.get(mk, ()))

    source = "test metrics (results.json test)" if split == "test" else f"{which}.metrics"
    for r in placed:
        mk = _method_of(r, group_by)
        col = col_by_key[task_key(r.task)]
        cell = methods.setdefault(mk, {}).setdefault(col.key, Cell())
        label = label_of(mk)
        if r.status == "completed":
            v = col.metric.value(r.metrics(which, split))
            if v is None:
                cell.no_metric += 1
                if split == "test" and r.test is None:
                    msg = "results.json has no test metrics (the task has no labelled test split)"
                else:
                    have = ", ".join(sorted((r.metrics(which, split) or {}).keys())) or "none"
                    msg = f"{source} lacks a finite {col.metric.name} (has: {have})"
                problems.append(Problem("no metric", label, col.header, r.seed, r.display_path, msg))
            else:
                cell.values.append(v * col.scale)
                cell.seeds.append(r.seed)
                cell.run_dirs.append(r.run_dir)
                if r.collapsed:
                    # Counted in the mean (it is a result), but marked: it is the majority-class rate.
                    cell.collapsed += 1
                    collapsed_notes.append(f"{label}, {col.header}, seed {r.seed}: collapsed, "
                                           f"{r.collapse_note or 'see results.json'}")
        elif r.status in ("failed", "corrupt"):
            cell.failed += 1
            problems.append(Problem(r.status, label, col.header, r.seed, r.display_path, r.error or "no error message"))
        elif r.status == "missing":
            cell.missing += 1
            problems.append(Problem("missing", label, col.header, r.seed, r.display_path, r.error or ""))
        elif r.status == "running":
            cell.running += 1
            problems.append(Problem("running", label, col.header, r.seed, r.display_path, "status is still 'running'"))
        elif r.status == "interrupted":
            cell.interrupted += 1
            problems.append(Problem("interrupted", label, col.header, r.seed, r.display_path,
                                    "stopped before the end; re-run the same command to resume"))
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
                    f"{label_of(mk)}, {col_by_key[key].header}: several completed runs with seed "
                    f"{', '.join(map(str, dup))} were averaged (use --group-by KEY to split them by a config key)"
                )

    rows: list[Row] = []
    if split == "test":
        dev_refs = [r for r in references if "test" not in str(r.source.get("split", "")).lower()]
        # named only when one of them had a number for a column shown here
        shown = [r for r in dev_refs if any(c.key in rr.values and r.columns.get(c.key) == c.metric
                                           for rr in r.rows for c in columns)]
        if shown and fixed is None:
            notes.append("reference rows left out: their published numbers are not on the test split ("
                         + ", ".join(r.short_cite for r in shown) + ")")
        references = [r for r in references if r not in dev_refs]
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
        row = Row(label=label_of(mk), kind="run", cells=methods[mk], method=mk,
                  teachers=tuple(f"{mk.teacher_objective or '?'} {h}" for h in teacher_hashes.get(mk, ())))
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
        shown = "test split, results.json test" if split == "test" else f"dev split, {which}.metrics"
        title = (
            f"Diagnostics: {fixed.name} ({shown}), mean ± std over seeds"
            if fixed is not None
            else f"Results ({shown}), mean ± std over seeds"
        )
    return Table(
        title=title,
        name="main" if fixed is None else fixed.name,
        which=which,
        split=split,
        split_by=group_by,
        columns=columns,
        rows=rows,
        deltas=delta_rows,
        problems=problems,
        notes=notes,
        references=[r for r in references if fixed is None],
        show_average=average,
        show_problems=show_problems,
    )

