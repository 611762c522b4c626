"""FlowNIB outputs: flownib.json, flownib.csv and the figures (information plane, d_eff and OIC
by layer, comparisons of several runs). Every figure is titled with the model, the task and the
view (deterministic Z_l or the noisy channel) it shows."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np

from cmiexp.errors import ConfigError
from cmiexp.io import atomic_write_json, atomic_write_text
from cmiexp.probes.flownib.result import as_result_dict

CSV_FIELDS = ["layer", "d_eff_pr", "d_eff_shannon", "oic_step", "oic_x", "oic_y", "oic_gamma",
              "heldout_ixz", "heldout_izy", "final_ix", "final_iy", "flags"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _subsample(n: int, limit: int = 400) -> np.ndarray:
    # thousands of points per layer add nothing visually but slow the PNG down
    return np.unique(np.linspace(0, n - 1, min(n, limit)).round().astype(int))


def describe(d: dict) -> str:
    """'model · task · view' for figure titles (what a reader needs to know what is plotted)."""
    cfg = d.get("config", {})
    probe = cfg.get("probe") or {}
    model = probe.get("model") or cfg.get("model") or "activations"
    task = probe.get("task") or cfg.get("task") or "given data"
    noise = cfg.get("noise_std")
    view = f"noisy view, Z+N(0,{noise:g}²)" if noise else "deterministic Z (capacity view)"
    return f"{model} · {task} · {view}"


def _layer_colors(plt, n: int):
    cmap = plt.get_cmap("viridis" if n > 10 else "tab10")
    return [cmap(i / max(1, n - 1)) if n > 10 else cmap(i % 10) for i in range(n)]


def _integer_layer_axis(ax, layers) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if len(layers) <= 16:
        ax.set_xticks(list(layers))


def plot_information_plane(result, path, title: str | None = None) -> int:
    """One colour per layer (legend), time shown by marker size and opacity growing with the step,
    and the OIC path across layers labelled by layer. Flagged layers are marked in the legend.
    Returns the number of trajectories drawn."""
    d = as_result_dict(result)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 6))
    steps = np.asarray(d["steps"], dtype=float)
    span = max(steps.max() - steps.min(), 1.0) if steps.size else 1.0
    colors = _layer_colors(plt, len(d["layers"]))
    drawn = 0
    for e, c in zip(d["layers"], colors):
        ix, iy = np.asarray(e["trajectory"]["ix"]), np.asarray(e["trajectory"]["iy"])
        sel = _subsample(len(ix))
        frac = (steps[sel] - steps.min()) / span
        ax.plot(ix[sel], iy[sel], color=c, lw=0.7, alpha=0.5, zorder=1)
        rgba = np.tile(np.asarray(c, dtype=float), (len(sel), 1))
        rgba[:, 3] = 0.15 + 0.85 * frac
        flag = " (flagged)" if e.get("flags") else ""
        ax.scatter(ix[sel], iy[sel], s=4 + 26 * frac, color=rgba, zorder=2, label=f"layer {e['layer']}{flag}")
        drawn += 1
    ox = [e["oic"]["x"] for e in d["layers"]]
    oy = [e["oic"]["y"] for e in d["layers"]]
    ax.plot(ox, oy, "-", color="crimson", lw=1.6, zorder=3, label="OIC path")
    ax.scatter(ox, oy, marker="*", s=120, color="crimson", edgecolor="black", lw=0.5, zorder=4)
    for e, xv, yv in zip(d["layers"], ox, oy):
        ax.annotate(f"L{e['layer']}", (xv, yv), textcoords="offset points", xytext=(5, 5), fontsize=8,
                    color="crimson", weight="bold")
    ax.set_xlabel("I(X; Z_l)  [nats]  (validation monitor batch)")
    ax.set_ylabel("I(Z_l; Y)  [nats]")
    ax.set_title(title or f"FlowNIB information plane\n{describe(d)}", fontsize=10)
    leg = ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=7, markerscale=1.5,
                    title="marker size/opacity: step", title_fontsize=7)
    for h in leg.legend_handles:  # legend swatches opaque (the first point of a trajectory is faint)
        h.set_alpha(1.0)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return drawn


def plot_deff(result, path) -> None:
    d = as_result_dict(result)
    plt = _pyplot()
    layers = [e["layer"] for e in d["layers"]]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(layers, [e["d_eff_pr"] for e in d["layers"]], "-o", label="participation ratio")
    ax.plot(layers, [e["d_eff_shannon"] for e in d["layers"]], "-s", label="Shannon effective dim")
    _integer_layer_axis(ax, layers)
    ax.set_xlabel("layer")
    ax.set_ylabel("d_eff(Z_l)")
    ax.set_title(f"Effective dimension by layer\n{describe(d)}", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_oic_by_layer(results: dict, path) -> None:
    """OIC coordinates and test-split estimates vs layer for one or several runs (label -> result)."""
    plt = _pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    subtitle = ""
    for label, r in results.items():
        d = as_result_dict(r)
        subtitle = subtitle or describe(d)
        layers = [e["layer"] for e in d["layers"]]
        line = ax1.plot(layers, [e["oic"]["x"] for e in d["layers"]], "-o", label=f"{label} OIC")[0]
        ax1.plot(layers, [e["heldout"]["ixz"] for e in d["layers"]], ":", color=line.get_color(),
                 label=f"{label} test estimate")
        line = ax2.plot(layers, [e["oic"]["y"] for e in d["layers"]], "-o", label=f"{label} OIC")[0]
        ax2.plot(layers, [e["heldout"]["izy"] for e in d["layers"]], ":", color=line.get_color(),
                 label=f"{label} test estimate")
        h_y = (d.get("bounds") or {}).get("h_y")
        if h_y is not None:
            ax2.axhline(h_y, color="0.4", lw=0.8, ls="--", label="H(Y) (upper bound)")
        for ax in (ax1, ax2):
            _integer_layer_axis(ax, layers)
    ax1.set_title("I(X; Z_l)", fontsize=10)
    ax2.set_title("I(Z_l; Y)", fontsize=10)
    for ax in (ax1, ax2):
        ax.set_xlabel("layer")
        ax.set_ylabel("nats")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle(f"FlowNIB OIC by layer · {subtitle}" if len(results) == 1 else "FlowNIB OIC by layer", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def csv_text(d: dict) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    w.writeheader()
    for e in d["layers"]:
        w.writerow({
            "layer": e["layer"], "d_eff_pr": e["d_eff_pr"], "d_eff_shannon": e["d_eff_shannon"],
            "oic_step": e["oic"]["step"], "oic_x": e["oic"]["x"], "oic_y": e["oic"]["y"],
            "oic_gamma": e["oic"]["gamma"], "heldout_ixz": e["heldout"]["ixz"], "heldout_izy": e["heldout"]["izy"],
            "final_ix": e["trajectory"]["ix"][-1], "final_iy": e["trajectory"]["iy"][-1],
            "flags": ";".join(e.get("flags", [])),
        })
    return buf.getvalue()


def write_outputs(result, out_dir) -> dict[str, Path]:
    """Write flownib.json, flownib.csv (one row per layer) and the PNG plots into ``out_dir``."""
    d = as_result_dict(result)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": out / "flownib.json",
        "csv": out / "flownib.csv",
        "information_plane": out / "flownib_information_plane.png",
        "deff": out / "flownib_deff_by_layer.png",
        "oic": out / "flownib_oic_by_layer.png",
    }
    atomic_write_json(paths["json"], d)
    atomic_write_text(paths["csv"], csv_text(d))
    plot_information_plane(d, paths["information_plane"])
    plot_deff(d, paths["deff"])
    plot_oic_by_layer({"run": d}, paths["oic"])
    return paths


def compare_runs(results: dict, out_dir) -> dict[str, Path]:
    """Overlay several runs (label -> FlowNIBResult or result dict, e.g. bidirectional vs
    unidirectional): one information-plane plot (faint per-layer trajectories and bold OIC path
    per run, labelled by layer), one OIC-by-layer plot, and a JSON summary of the OICs."""
    if not results:
        raise ConfigError("compare_runs needs at least one run")
    ds = {str(label): as_result_dict(r) for label, r in results.items()}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plt = _pyplot()
    paths = {"information_plane": out / "compare_information_plane.png",
             "oic": out / "compare_oic_by_layer.png", "json": out / "compare_flownib.json"}
    fig, ax = plt.subplots(figsize=(8, 6))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, d) in enumerate(ds.items()):
        c = colors[i % len(colors)]
        for e in d["layers"]:
            ix, iy = np.asarray(e["trajectory"]["ix"]), np.asarray(e["trajectory"]["iy"])
            sel = _subsample(len(ix), 300)
            ax.plot(ix[sel], iy[sel], color=c, alpha=0.2, lw=0.7)
        ox, oy = [e["oic"]["x"] for e in d["layers"]], [e["oic"]["y"] for e in d["layers"]]
        ax.plot(ox, oy, "-o", color=c, lw=2, ms=5, label=f"{label} (OIC path)")
        for e, xv, yv in zip(d["layers"], ox, oy):
            ax.annotate(f"L{e['layer']}", (xv, yv), textcoords="offset points", xytext=(4, 4), fontsize=7, color=c)
    ax.set_xlabel("I(X; Z_l)  [nats]")
    ax.set_ylabel("I(Z_l; Y)  [nats]")
    views = sorted({describe(d).split(" · ")[-1] for d in ds.values()})
    tasks = sorted({describe(d).split(" · ")[1] for d in ds.values()})
    ax.set_title(f"FlowNIB information plane: {', '.join(ds)}\n{', '.join(tasks)} · {', '.join(views)}", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(paths["information_plane"], dpi=120)
    plt.close(fig)
    plot_oic_by_layer(ds, paths["oic"])
    summary = {label: [{"layer": e["layer"], **e["oic"], "d_eff_pr": e["d_eff_pr"], "flags": e.get("flags", [])}
                       for e in d["layers"]] for label, d in ds.items()}
    atomic_write_json(paths["json"], summary)
    return paths


__all__ = ["CSV_FIELDS", "compare_runs", "csv_text", "describe", "plot_deff", "plot_information_plane",
           "plot_oic_by_layer", "write_outputs"]
