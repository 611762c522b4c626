"""``cmiexp-report --html OUT.html``: one self-contained page (opens offline, nothing fetched).

The page holds the same tables as report.md (same cell texts, from ``render``), then per task the
training curves of every method (train loss, dev primary metric, dev CMI against step; the mean
over seeds with a ± one-std band, from each run's logs), then every FlowNIB probe's
information-plane figure as the probe wrote it. Styles are inline CSS; every image is an embedded
base64 PNG; there are no scripts and no links to anything outside the page.
"""

from __future__ import annotations

import base64
import html
import os
from collections import Counter
from pathlib import Path
from typing import Sequence

from cmiexp.io import atomic_write_text
from cmiexp.report.collect import RunRecord
from cmiexp.report.curves import method_curves_png
from cmiexp.report.render import (as_tables, average_legend, avg_digits, avg_text, fmt_delta, metric_legend,
                                  result_row_texts, results_header, split_by_line)
from cmiexp.report.specs import DASH, task_key
from cmiexp.report.tables import Table

# A probe writes its information plane as flownib_information_plane.png (and, with objective.compare,
# compare_information_plane.png); matched by suffix so both are shown.
PLANE_SUFFIX = "information_plane.png"

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1200px;
       padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ccc; }
h3 { font-size: 1em; }
table { border-collapse: collapse; margin: 0.5em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #f2f2f2; }
tr.reference td { color: #555; font-style: italic; }
p.legend, p.meta { font-size: 0.85em; color: #555; }
figure { margin: 1em 0; } figcaption { font-size: 0.85em; color: #555; }
img { max-width: 100%; border: 1px solid #eee; }
code { font-size: 0.9em; }
"""


def _e(text) -> str:
    return html.escape(str(text), quote=True)


def png_img(data: bytes, alt: str) -> str:
    return f'<img src="data:image/png;base64,{base64.b64encode(data).decode("ascii")}" alt="{_e(alt)}">'


def _html_table(header: list[str], body: list[tuple[str, list[str]]]) -> list[str]:
    out = ["<table>", "<tr>" + "".join(f"<th>{_e(h)}</th>" for h in header) + "</tr>"]
    for cls, cells in body:
        attr = f' class="{cls}"' if cls else ""
        out.append(f"<tr{attr}>" + "".join(f"<td>{_e(c)}</td>" for c in cells) + "</tr>")
    out.append("</table>")
    return out


def _items(title: str, lines: Sequence[str]) -> list[str]:
    return [f"<h3>{_e(title)}</h3>", "<ul>"] + [f"<li>{_e(x)}</li>" for x in lines] + ["</ul>"]


def table_html(t: Table) -> list[str]:
    out = [f"<h2>{_e(t.title)}</h2>"]
    if split_by_line(t):
        out.append(f'<p class="meta">{_e(split_by_line(t))}</p>')
    if not t.columns:
        return out + ["<p>No runs.</p>"]
    ad = avg_digits(t)
    out += _html_table(results_header(t), [(row.kind, result_row_texts(t, row, ad)) for row in t.rows])
    out.append(f'<p class="legend">{_e(metric_legend(t))}. Cells: mean ± sample std (ddof=1) over seeds, '
               f"n = completed runs; {DASH} = no completed run."
               + _e(average_legend(t) if t.show_average else "") + "</p>")
    if t.deltas:
        out.append("<h3>Δ vs baseline</h3>")
        header = ["Method", "Baseline", *[c.header for c in t.columns]] + (["Average"] if t.show_average else [])
        body = []
        for d in t.deltas:
            cells = [d.label, d.baseline] + [DASH if d.deltas.get(c.key) is None else fmt_delta(d.deltas[c.key], c.digits)
                                             for c in t.columns]
            if t.show_average:
                cells.append(avg_text(d.average, d.average_count, t.average_of, ad, DASH, fmt_delta))
            body.append(("", cells))
        out += _html_table(header, body)
    if t.references and any(r.kind == "reference" for r in t.rows):
        out += _items("References", [f"{ref.short_cite}: {ref.citation()}." for ref in t.references])
    if t.notes:
        out += _items("Notes", t.notes)
    if t.show_problems and t.problems:
        lines = []
        for p in t.problems:
            where = ", ".join(x for x in (p.label, p.task, None if p.seed is None else f"seed {p.seed}") if x)
            lines.append(f"{p.kind}: {where + ': ' if where else ''}{p.message} ({p.path})")
        out += _items(f"Failed, missing and unreadable runs ({len(t.problems)})", lines)
    return out


def _curve_metric(column_metric_parts: tuple[str, ...], records: Sequence[RunRecord], key: str) -> str | None:
    """The dev metric drawn for a task: the column's metric when it is one logged metric, else the
    runs' primary metric."""
    if len(column_metric_parts) == 1:
        return column_metric_parts[0]
    primaries = Counter(r.primary_metric for r in records if r.identified and task_key(r.task) == key and r.primary_metric)
    return primaries.most_common(1)[0][0] if primaries else None


def curves_html(t: Table, records: Sequence[RunRecord]) -> tuple[list[str], int]:
    """Per task of the main table, the methods' training curves; returns (html lines, images)."""
    out = ["<h2>Training curves</h2>",
           '<p class="meta">Per task, one line per method: the mean over its completed runs (seeds) of train '
           "loss, the dev metric and dev CMI against the optimizer step, read from each run's "
           "train_log.jsonl and metrics.jsonl; the band is ± one sample std where two or more seeds logged "
           "the step.</p>"]
    images = 0
    for c in t.columns:
        runs = {row.label: row.cells[c.key].run_dirs for row in t.rows
                if row.kind == "run" and c.key in row.cells and row.cells[c.key].run_dirs}
        png = method_curves_png(runs, _curve_metric(c.metric.parts, records, c.key)) if runs else None
        out.append(f"<h3>{_e(c.header)}</h3>")
        if png is None:
            out.append("<p>No training logs (train_log.jsonl, metrics.jsonl) in these runs.</p>")
            continue
        out.append(f"<figure>{png_img(png, f'training curves, {c.header}')}</figure>")
        images += 1
    return out, images


def probe_figures(records: Sequence[RunRecord]) -> list[tuple[RunRecord, Path]]:
    """(record, PNG) of every information-plane figure in the collected runs' directories."""
    found, seen = [], set()
    for r in records:
        d = r.run_dir
        if d in seen or not d.is_dir():
            continue
        seen.add(d)
        found += [(r, p) for p in sorted(d.glob(f"*{PLANE_SUFFIX}")) if p.is_file()]
    return found


def probes_html(records: Sequence[RunRecord]) -> tuple[list[str], int]:
    figures = probe_figures(records)
    if not figures:
        return [], 0
    out = ["<h2>Information planes (FlowNIB probes)</h2>"]
    for r, png in figures:
        who = " · ".join(x for x in (r.task, f"{r.model} / {r.objective}",
                                     f"probed: {r.teacher_objective}" if r.teacher_objective else None,
                                     None if r.seed is None else f"seed {r.seed}") if x)
        out.append(f"<figure>{png_img(png.read_bytes(), f'information plane, {who}')}"
                   f"<figcaption>{_e(who)} — <code>{_e(png.name)}</code> in <code>{_e(r.display_path)}</code>"
                   "</figcaption></figure>")
    return out, len(figures)


def render_html(tables: Table | Sequence[Table], records: Sequence[RunRecord], sources: Sequence[str] = ()) -> str:
    """The whole page as a string."""
    tables = as_tables(tables)
    body = ["<h1>cmiexp report</h1>"]
    if sources:
        body.append(f'<p class="meta">{len(records)} runs found under '
                    + ", ".join(f"<code>{_e(s)}</code>" for s in sources) + ".</p>")
    for t in tables:
        body += table_html(t)
    if tables and tables[0].columns:
        body += curves_html(tables[0], records)[0]
    body += probes_html(records)[0]
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>cmiexp report</title>\n"
            f"<style>{CSS}</style>\n</head>\n<body>\n" + "\n".join(body) + "\n</body>\n</html>\n")


def write_html(tables: Table | Sequence[Table], records: Sequence[RunRecord], path: str | os.PathLike,
               sources: Sequence[str] = ()) -> Path:
    """Write the page atomically to ``path``."""
    path = Path(path)
    atomic_write_text(path, render_html(tables, records, sources))
    return path
