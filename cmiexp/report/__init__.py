"""``cmiexp-report``: turn run/sweep directories into the papers' result tables.

Every run writes a ``results.json`` (schema 1, ``cmiexp.runs``). The report finds them
recursively under the given directories (it never parses the directory layout), groups rows by
method (experiment, model, objective, teacher objective, and every config key that varies within
a cell other than the seed) and columns by task, and prints per cell the mean and sample standard
deviation over seeds of each task's report metric, on the dev split (``best``/``final``) or the
test split. Failed, missing, interrupted and unreadable runs are counted in their cells and listed
under the table; nothing is dropped silently.

Modules: ``collect`` (runs on disk, through ``cmiexp.runs``), ``references`` (published numbers),
``tables`` (aggregation), ``render`` (Markdown, CSV, LaTeX), ``curves`` (training curves from the
runs' logs, each run's ``curves.png``), ``html`` (the self-contained page), ``cli``.

Python API::

    records = collect_runs(["outputs/"])
    table = build_table(records, references=default_references())
    print(render_markdown(table))
"""

from cmiexp.report.cli import build_parser, main
from cmiexp.report.collect import SPLITS, ReportInputError, RunRecord, collect_runs, run_settings
from cmiexp.report.references import ReferenceRow, ReferenceSet, default_reference_path, default_references, load_reference
from cmiexp.report.render import latex_escape, render_csv, render_latex, render_markdown, write_report
from cmiexp.report.specs import MetricSpec, mean_std, parse_metric_spec, task_key
from cmiexp.report.tables import Cell, Column, DeltaRow, MethodKey, Problem, Row, Table, build_table, varying_keys

__all__ = [
    "RunRecord", "MetricSpec", "MethodKey", "Cell", "Column", "Row", "DeltaRow", "Problem", "Table",
    "ReferenceSet", "ReferenceRow", "ReportInputError", "SPLITS", "collect_runs", "run_settings", "build_table",
    "varying_keys", "render_markdown", "render_csv", "render_latex", "latex_escape", "write_report",
    "load_reference", "default_reference_path", "default_references", "mean_std", "parse_metric_spec",
    "task_key", "build_parser", "main",
]
