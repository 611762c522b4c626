"""The end-of-run summary: a rich table of the best and final dev metrics, cost, the run directory
and, for W&B offline runs, the exact ``wandb sync`` command.

On a terminal the table is drawn with box characters; on a redirected stream rich writes plain
text (no ANSI escapes) and long lines (paths, the sync command) are never wrapped, so they stay
copy-pasteable. ``summary_text`` is the same summary as plain text (for cmiexp.log).
"""

from __future__ import annotations

import io
import math
import shlex

from cmiexp.runs import collapse_text

# Per-class counts and sizes are not metrics (they are in results.json).
_SKIP = {"num_samples", "pred_counts"}


def format_metric(v) -> str:
    """Four significant digits: 0.9451, 12.35, 8e-06 (never a misleading 0.0000); integers stay
    integers, NaN/inf as themselves."""
    if isinstance(v, bool) or isinstance(v, int):
        return str(v)
    v = float(v)
    if not math.isfinite(v):
        return str(v)
    if v == 0:
        return "0"
    if 1e-4 <= abs(v) < 1e6:
        # fixed notation with 4 significant digits (no exponent for ordinary values)
        digits = max(0, 3 - math.floor(math.log10(abs(v))))
        text = f"{v:.{digits}f}"
        return text.rstrip("0").rstrip(".") if "." in text else text
    return f"{v:.4g}"


def metric_rows(results: dict) -> list[tuple[str, str, str]]:
    """(metric, best, final) for every numeric dev metric, best's order first."""
    best = (results.get("best") or {}).get("metrics") or {}
    final = (results.get("final") or {}).get("metrics") or {}

    def cell(v) -> str:
        return format_metric(v) if isinstance(v, (int, float)) else "-"

    names = [k for k in best if k not in _SKIP] + [k for k in final if k not in best and k not in _SKIP]
    return [(k, cell(best.get(k)), cell(final.get(k))) for k in names
            if isinstance(best.get(k), (int, float)) or isinstance(final.get(k), (int, float))]


def wandb_sync_command(results: dict) -> str | None:
    """``wandb sync <offline run folder>`` for a run logged to W&B offline, else None."""
    info = results.get("wandb") or {}
    if info.get("mode") == "offline" and info.get("sync_dir"):
        return f"wandb sync {shlex.quote(str(info['sync_dir']))}"
    return None


def footer_lines(results: dict) -> list[str]:
    lines = []
    if results.get("primary_metric") and results.get("best"):
        lines.append(f"* primary metric: best = the step where {results['primary_metric']} was best")
    if results.get("wall_time_s") is not None:
        sps = results.get("train_samples_per_s")
        lines.append(f"train time {format_metric(float(results['wall_time_s']))} s"
                     + (f", {format_metric(float(sps))} samples/s" if sps else "")
                     + (f", peak memory {results['peak_memory_mb']:.0f} MB" if results.get("peak_memory_mb") else ""))
    collapsed = collapse_text(results)
    if collapsed:
        lines.append(f"COLLAPSED: {collapsed}")
    lines.append(f"run dir: {results.get('run_dir')}")
    sync = wandb_sync_command(results)
    if sync:
        lines.append(f"W&B offline run; upload it with: {sync}")
    elif (results.get("wandb") or {}).get("url"):
        lines.append(f"W&B run: {results['wandb']['url']}")
    return lines


def title(results: dict) -> str:
    return (f"{results.get('task')} | {results.get('model')} | {results.get('objective')} | "
            f"seed {results.get('seed')} | status {results.get('status')}")


def build_table(results: dict, terminal: bool = True):
    """Box characters on a terminal; a Markdown table (plain ASCII, pasteable into notes) otherwise."""
    from rich import box
    from rich.table import Table

    best_step = (results.get("best") or {}).get("step")
    final_step = (results.get("final") or {}).get("step")
    primary = results.get("primary_metric")
    table = Table(box=box.SIMPLE_HEAD if terminal else box.MARKDOWN)
    table.add_column("metric")
    table.add_column(f"best (step {best_step})" if best_step is not None else "best", justify="right")
    table.add_column(f"final (step {final_step})" if final_step is not None else "final", justify="right")
    for name, b, f in metric_rows(results):
        table.add_row(f"{name} *" if name == primary else name, b, f)
    return table


def render_summary(results: dict, file=None, width: int | None = None) -> None:
    """Print the summary to ``file`` (stdout by default); plain text unless it is a terminal."""
    from rich.console import Console

    console = Console(file=file, width=width, highlight=False)
    console.print(title(results), soft_wrap=True, markup=False, style="bold")
    table = build_table(results, terminal=console.is_terminal)
    if console.is_terminal:
        console.print(table)
    else:
        # the Markdown box pads the table with lines of spaces: leave those out of logs and pipes
        with console.capture() as cap:
            console.print(table)
        lines = [ln.rstrip() for ln in cap.get().splitlines() if ln.strip()]
        console.file.write("\n".join(lines) + "\n")
    for line in footer_lines(results):
        # soft_wrap: a path or command longer than the console is printed whole, never broken
        console.print(line, soft_wrap=True, markup=False, highlight=False)


def summary_text(results: dict, width: int = 100) -> str:
    """The summary as plain text (no escapes), as a redirected console shows it."""
    buf = io.StringIO()
    render_summary(results, file=buf, width=width)
    return buf.getvalue()


__all__ = ["build_table", "footer_lines", "format_metric", "metric_rows", "render_summary", "summary_text",
           "title", "wandb_sync_command"]
