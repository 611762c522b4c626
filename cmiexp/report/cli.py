"""The ``cmiexp-report`` command: arguments, then collect -> tables -> render (and the HTML page)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from cmiexp.errors import CmiexpError, ConfigError, DataError
from cmiexp.report.collect import SPLITS, ReportInputError, collect_runs
from cmiexp.report.references import ReferenceSet, default_references, load_reference
from cmiexp.report.render import render_markdown, write_report
from cmiexp.report.specs import MetricSpec, one_line, parse_metric_spec
from cmiexp.report.tables import build_table, select_records


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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cmiexp-report",
        description="Aggregate cmiexp runs (every results.json under the given directories) into "
        "mean ± std tables; writes report.md, report.csv and report.tex.",
        epilog="examples:\n"
        "  cmiexp-report outputs/runs/cmi_glue                       # rows split by every key that varies\n"
        "  cmiexp-report outputs/runs/cmi_glue --group-by trainer.lr # split by exactly this key\n"
        "  cmiexp-report outputs/runs/cmi_glue --average-over trainer.lr  # pool two lrs as replicates\n"
        "  cmiexp-report outputs/runs/cmi_glue --extra-metric cmi --metric mrpc=f1\n"
        "  cmiexp-report outputs/runs/cot_mi --split test            # test accuracy of the selected checkpoint\n"
        "  cmiexp-report outputs/runs/cmi_glue --html report.html     # one offline page: tables, curves, probes",
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
    p.add_argument(
        "--split", choices=SPLITS, default="dev",
        help="dev: the dev metrics of each run (best or --final); test: the test metrics of the selected model "
        "(results.json test, recorded by tasks with a labelled test split, e.g. the chain-of-thought tasks)",
    )  # fmt: skip
    p.add_argument(
        "--html", metavar="OUT.html",
        help="also write one self-contained HTML page: the tables, training curves per task and method, and "
        "every probe's information plane (opens offline)",
    )  # fmt: skip
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
    parser = build_parser()
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
            split=args.split,
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
            raise DataError(f"cannot write the report to {out_dir}: {one_line(e, 200)}") from e
        if args.html:
            from cmiexp.report.html import write_html

            try:
                # the same runs as the tables: the --experiment / --task filters apply to the figures too
                write_html(tables, select_records(records, args.experiment, args.task), args.html,
                           sources=args.paths)
            except OSError as e:
                raise DataError(f"cannot write --html {args.html}: {one_line(e, 200)}") from e
    except ReportInputError as e:
        print(f"cmiexp-report: error: {e}", file=sys.stderr)
        return 2
    except CmiexpError as e:
        print(f"cmiexp-report: error: {e}", file=sys.stderr)
        return 1
    sys.stdout.write(md)
    print(f"cmiexp-report: wrote report.md, report.csv, report.tex to {out_dir}"
          + (f" and {args.html}" if args.html else ""), file=sys.stderr)
    return 0

