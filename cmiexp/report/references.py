"""Published reference numbers (``cmiexp/resources/reference_results.yaml`` and user files) shown
as rows next to the runs, only in columns of the same metric."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import yaml

from cmiexp.errors import ConfigError
from cmiexp.report.specs import MetricSpec, one_line, opt_str, parse_metric_spec, task_key


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
        raise ConfigError(f"cannot parse reference file {path}: {one_line(e, 200)}") from e
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
        if not isinstance(m, dict) or not opt_str(m.get("label")):
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
        rows.append(ReferenceRow(label=str(m["label"]), model=opt_str(m.get("model")), values=values, score=score))
    source = data.get("source") if isinstance(data.get("source"), dict) else {}
    note = data.get("note")
    return ReferenceSet(
        path=str(path),
        short_cite=opt_str(data.get("short_cite")) or path.stem,
        source=source,
        note=" ".join(str(note).split()) if note else None,
        columns=columns,
        rows=rows,
    )


def default_references() -> list[ReferenceSet]:
    return [load_reference(default_reference_path())]

