"""Rendering tables as Markdown (printed and ``report.md``), tidy CSV and LaTeX (booktabs).

The cell and number formatting here (``cell_text``, ``fmt_number``...) is shared with the HTML page.
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Sequence

from cmiexp.io import atomic_write_text
from cmiexp.report.specs import DASH
from cmiexp.report.tables import Cell, Table


def fmt_number(x: float, digits: int) -> str:
    s = f"{x:.{digits}f}"
    # "-0.0" is just rounding noise around zero.
    return s[1:] if s.startswith("-") and float(s) == 0 else s


def fmt_delta(x: float, digits: int) -> str:
    s = fmt_number(x, digits)
    return s if s.startswith("-") else "+" + s


def _counts(cell: Cell) -> list[str]:
    out = []
    for n, word in (
        (cell.failed, "failed"),
        (cell.missing, "missing"),
        (cell.running, "running"),
        (cell.interrupted, "interrupted"),
        (cell.no_metric, "without metric"),
        (cell.collapsed, "collapsed"),
    ):
        if n:
            out.append(f"{n} {word}")
    return out


def cell_text(cell: Cell | None, digits: int, pm: str, dash: str) -> str:
    if cell is None or cell.empty:
        return dash
    if cell.reference:
        return fmt_number(cell.mean, digits)
    extras = _counts(cell)
    if cell.n == 0:
        return f"{dash} ({', '.join(extras)})"
    text = fmt_number(cell.mean, digits)
    if cell.n >= 2:
        text += f" {pm} {fmt_number(cell.std, digits)}"
    return text + " (" + ", ".join([f"n={cell.n}", *extras]) + ")"


def avg_text(value: float | None, count: int, total: int, digits: int, dash: str, fmt=fmt_number) -> str:
    if value is None:
        return dash
    s = fmt(value, digits)
    return s if count >= total else f"{s} ({count}/{total} tasks)"


def avg_digits(table: Table) -> int:
    return max((c.digits for c in table.averaged_columns), default=1)


def _md_escape(s: str) -> str:
    return s.replace("|", "\\|")


def _md_table(header: list[str], body: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(_md_escape(h) for h in header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(_md_escape(c) for c in row) + " |" for row in body]
    return lines


def metric_legend(table: Table) -> str:
    if len(table.columns) > 1 and len({c.metric for c in table.columns}) == 1:
        c = table.columns[0]
        return f"Metric: {c.metric.name}" + (" ×100" if c.scale == 100 else "")
    parts = []
    for c in table.columns:
        parts.append(f"{c.header} = {c.metric.name}" + (" ×100" if c.scale == 100 else ""))
    return "Metric per task: " + "; ".join(parts)


def average_legend(table: Table) -> str:
    text = " Average: mean of the row's task means (k/N tasks when some are missing)"
    left_out = [c.header for c in table.columns if c not in table.averaged_columns]
    if left_out:
        text += f"; {', '.join(left_out)} not averaged (not ×100 scores)"
    return text + "."


def split_by_line(table: Table) -> str | None:
    """The sentence under a title naming the config keys the rows are split by, if any."""
    if not table.split_by:
        return None
    return (f"Rows split by {', '.join(table.split_by)} (configs differ in these keys, not only in the seed; "
            "the row label shows each value).")


def _render_md_one(table: Table) -> str:
    out = [f"## {table.title}", ""]
    if split_by_line(table):
        out += [split_by_line(table), ""]
    if not table.columns:
        out += ["No runs.", ""]
        return "\n".join(out)
    ad = avg_digits(table)
    out += _md_table(results_header(table), [result_row_texts(table, row, ad) for row in table.rows])
    out += [
        "",
        f"{metric_legend(table)}. Cells: mean ± sample std (ddof=1) over seeds, "
        f"n = completed runs; {DASH} = no completed run; failed, missing (no results.json) and "
        f"running runs are counted in parentheses."
        + (average_legend(table) if table.show_average else ""),
    ]
    if table.deltas:
        out += ["", "### Δ vs baseline", ""]
        header = ["Method", "Baseline", *[c.header for c in table.columns]] + (["Average"] if table.show_average else [])
        body = []
        for d in table.deltas:
            line = [d.label, d.baseline] + [
                DASH if d.deltas.get(c.key) is None else fmt_delta(d.deltas[c.key], c.digits) for c in table.columns
            ]
            if table.show_average:
                line.append(avg_text(d.average, d.average_count, table.average_of, ad, DASH, fmt_delta))
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


def as_tables(tables: Table | Sequence[Table]) -> list[Table]:
    return [tables] if isinstance(tables, Table) else list(tables)


def results_header(t: Table) -> list[str]:
    """The header of a results table, the same in every format."""
    return ["Method", *[c.header for c in t.columns]] + (["Average"] if t.show_average else [])


def result_row_texts(t: Table, row, ad: int) -> list[str]:
    """One results row as plain text (label, mean ± std cells, average), the same in every format:
    Markdown uses it as is, LaTeX and HTML escape it. ``ad``: ``avg_digits(t)``."""
    cells = [row.label] + [cell_text(row.cells.get(c.key), c.digits, "±", DASH) for c in t.columns]
    if t.show_average:
        cells.append(avg_text(row.average, row.average_count, t.average_of, ad, DASH))
    return cells


def render_markdown(tables: Table | Sequence[Table]) -> str:
    """Markdown for one table or several (main table first, diagnostics after)."""
    return "\n".join(_render_md_one(t) for t in as_tables(tables))


CSV_FIELDS = (
    "table", "kind", "method", "experiment", "model", "objective", "teacher_objective", "variant",
    "task", "metric", "scale", "mean", "std", "n", "failed", "missing", "running", "no_metric",
    "seeds", "baseline", "delta", "split", "interrupted", "teacher",
)  # fmt: skip


def _num(x: float | None) -> str:
    return "" if x is None else repr(round(x, 6) + 0.0)


def render_csv(tables: Table | Sequence[Table]) -> str:
    """Tidy CSV: one row per table x method x task (task ``average`` for the Average column)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    w.writeheader()
    for t in as_tables(tables):
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
                "split": t.split,
                "teacher": " ".join(h.split(" ", 1)[-1] for h in row.teachers),
            }
            for c in t.columns:
                cell = row.cells.get(c.key) or Cell()
                rec = dict(base)
                rec.update(
                    task=c.key, metric=c.metric.name, scale=c.scale, mean=_num(cell.mean), std=_num(cell.std),
                    n=cell.n, failed=cell.failed, missing=cell.missing, running=cell.running,
                    no_metric=cell.no_metric, seeds=" ".join(str(s) for s in cell.seeds if s is not None),
                    interrupted=cell.interrupted,
                    delta=_num(d.deltas.get(c.key)) if d else "",
                )  # fmt: skip
                w.writerow(rec)
            if t.show_average:
                rec = dict(base)
                rec.update(
                    task="average", metric="", scale="", mean=_num(row.average), std="", n=row.average_count,
                    failed="", missing="", running="", no_metric="", seeds="", delta=_num(d.average) if d else "",
                    interrupted="",
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


def _render_tex_one(t: Table) -> list[str]:
    out = [f"% {latex_escape(t.title)}"]
    if split_by_line(t):
        out.append(f"% {latex_escape(split_by_line(t))}")
    if not t.columns:
        return out + ["% no runs"]
    ad = avg_digits(t)
    ncols = len(t.columns) + (1 if t.show_average else 0)
    out += [r"\begin{tabular}{l" + "r" * ncols + "}", r"\toprule"]
    out.append(" & ".join(latex_escape(h) for h in results_header(t)) + r" \\")
    out.append(r"\midrule")
    prev_kind = None
    for row in t.rows:
        if prev_kind == "reference" and row.kind != "reference":
            out.append(r"\midrule")
        prev_kind = row.kind
        cells = [latex_escape(x) for x in result_row_texts(t, row, ad)]
        out.append(" & ".join(cells) + r" \\")
    out += [r"\bottomrule", r"\end{tabular}"]
    if t.deltas:
        out += ["", f"% {latex_escape('Δ vs baseline')}", r"\begin{tabular}{ll" + "r" * ncols + "}", r"\toprule"]
        header = ["Method", "Baseline", *[c.header for c in t.columns]] + (["Average"] if t.show_average else [])
        out.append(" & ".join(latex_escape(h) for h in header) + r" \\")
        out.append(r"\midrule")
        for d in t.deltas:
            cells = [latex_escape(d.label), latex_escape(d.baseline)] + [
                "--" if d.deltas.get(c.key) is None else fmt_delta(d.deltas[c.key], c.digits) for c in t.columns
            ]
            if t.show_average:
                cells.append(latex_escape(avg_text(d.average, d.average_count, t.average_of, ad, DASH, fmt_delta)))
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
    for t in as_tables(tables):
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

