"""Training curves from the runs' logs: train loss, the dev primary metric and dev CMI against step.

Used twice: each training run draws its own ``curves.png`` once at the end (:func:`write_run_curves`,
called by the runner), and the HTML report draws one figure per task with a line per method, the
mean over its seeds with a band of ± one sample standard deviation (:func:`method_curves_png`).

Figures are drawn on ``matplotlib.figure.Figure`` with the Agg canvas: no pyplot state, no GUI
backend, nothing shared between calls.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from cmiexp.io import atomic_write_bytes
from cmiexp.report.specs import mean_std
from cmiexp.runs import CURVES, read_curve, read_results

log = logging.getLogger("cmiexp")


def panel_keys(primary: str | None) -> list[tuple[str, str]]:
    """(log key, panel title) of the three panels; the primary metric's panel only when it is known
    (and not the CMI itself)."""
    keys = [("train/loss", "train loss")]
    if primary and primary != "cmi":
        keys.append((f"dev/{primary}", f"dev {primary}"))
    keys.append(("dev/cmi", "dev CMI"))
    return keys


@dataclass
class Band:
    """Mean over runs at each step, with the sample std (ddof=1) where two or more runs have the step."""

    steps: list[int]
    mean: list[float]
    std: list[float | None]
    n: list[int]


def band(curves: Sequence[Sequence[tuple[int, float]]]) -> Band:
    """Pool several runs' (step, value) curves step by step (a step some runs lack is averaged over
    those that have it; ``n`` says how many)."""
    at: dict[int, list[float]] = {}
    for curve in curves:
        for step, v in curve:
            at.setdefault(step, []).append(v)
    steps = sorted(at)
    stats = [mean_std(at[s]) for s in steps]
    return Band(steps=steps, mean=[m for m, _ in stats], std=[s for _, s in stats], n=[len(at[s]) for s in steps])


def _figure(ncols: int):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(3.6 * ncols, 2.8), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def method_curves_png(runs_by_method: Mapping[str, Sequence[str | Path]], primary: str | None,
                      title: str | None = None) -> bytes | None:
    """One figure (a panel per curve) with a line per method: the mean over its runs, shaded ± one
    sample std where two or more runs have the step. None when no run has any logged point."""
    panels = []
    for key, name in panel_keys(primary):
        bands = {label: band([read_curve(d, key) for d in dirs]) for label, dirs in runs_by_method.items()}
        bands = {label: b for label, b in bands.items() if b.steps}
        if bands:
            panels.append((name, bands))
    if not panels:
        return None
    from matplotlib.ticker import MaxNLocator

    fig, axes = _figure(len(panels))
    for ax, (name, bands) in zip(axes, panels):
        for label, b in bands.items():
            line, = ax.plot(b.steps, b.mean, marker="o" if len(b.steps) < 8 else None, markersize=3, label=label)
            lo = [m - s if s is not None else m for m, s in zip(b.mean, b.std)]
            hi = [m + s if s is not None else m for m, s in zip(b.mean, b.std)]
            if any(s is not None for s in b.std):
                ax.fill_between(b.steps, lo, hi, color=line.get_color(), alpha=0.2, linewidth=0)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    return _png(fig)


def write_run_curves(run_dir: str | Path, primary: str | None = None) -> Path | None:
    """Draw ``<run_dir>/curves.png`` (atomically) from the run's logs; the one call the runner makes
    at the end of a completed run. Returns the path, or None when the run logged nothing. A failure
    to draw is a warning, never a failed run: the results are already written."""
    run_dir = Path(run_dir)
    try:
        if primary is None:
            primary = (read_results(run_dir) or {}).get("primary_metric")
        png = method_curves_png({run_dir.name: [run_dir]}, primary, title=None)
        if png is None:
            return None
        atomic_write_bytes(run_dir / CURVES, png)
        return run_dir / CURVES
    except Exception as e:  # noqa: BLE001  (plotting must not turn a completed run into a failure)
        log.warning("could not draw %s: %s", run_dir / CURVES, " ".join(str(e).split())[:200])
        return None

