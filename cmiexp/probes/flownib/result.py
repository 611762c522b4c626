"""The FlowNIB result: per-layer trajectories, OICs, effective dimensions, test-split estimates,
and the self-check every probe runs on its own numbers (:func:`check_estimates`).

The self-check applies the bounds any correct MI estimate obeys: MI >= 0; I(Z;Y) <= H(Y) for a
discrete Y (so <= log C); and, for the empirical distribution of N distinct inputs, I(X;Z) <=
log N. It also flags a validation trajectory that falls far below its own peak: the critic then
fits its training pairs rather than the joint law, and the rise-then-fall is an estimation
artefact, not "compression". A flagged layer's numbers are estimation failures, not findings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cmiexp.errors import DataError

#: tolerance of the bound checks (nats): sampling noise of a held-out estimate on ~1000 pairs
BOUND_TOL = 0.05


@dataclass
class FlowNIBResult:
    """Per-layer information-plane trajectories, OICs, effective dimensions, test-split MI."""

    layers: list[int]
    steps: np.ndarray  # [T'] recorded training steps
    ix: np.ndarray  # [T', L] I_t(X; Z_l), nats, on the validation monitor batch
    iy: np.ndarray  # [T', L] I_t(Z_l; Y)
    alpha: np.ndarray  # [T'] alpha at the recorded steps
    oic: list[dict]  # per layer {step, x, y, gamma}
    d_eff_pr: np.ndarray  # [L] participation ratio of Z_l
    d_eff_shannon: np.ndarray  # [L]
    d_eff_y_pr: float
    heldout_ixz: np.ndarray  # [L] best-on-validation critics read on the untouched test pairs
    heldout_izy: np.ndarray  # [L]
    config: dict = field(default_factory=dict)
    wall_time_s: float = 0.0
    timings: dict = field(default_factory=dict)  # seconds: d_eff_s, critic_training_s
    selection: list[dict] = field(default_factory=list)  # per layer: best steps, validation peak and final
    flags: list[dict] = field(default_factory=list)  # estimation failures found by check_estimates
    bounds: dict = field(default_factory=dict)  # h_y, log_n used by the checks

    @property
    def ok(self) -> bool:
        return not self.flags

    def to_dict(self) -> dict[str, Any]:
        layers = []
        for k, layer in enumerate(self.layers):
            layers.append({
                "layer": int(layer),
                "trajectory": {"ix": self.ix[:, k].tolist(), "iy": self.iy[:, k].tolist()},
                "oic": dict(self.oic[k]),
                "d_eff_pr": float(self.d_eff_pr[k]),
                "d_eff_shannon": float(self.d_eff_shannon[k]),
                "heldout": {"ixz": float(self.heldout_ixz[k]), "izy": float(self.heldout_izy[k])},
                "selection": dict(self.selection[k]) if k < len(self.selection) else {},
                "flags": [f["kind"] for f in self.flags if f["layer"] == int(layer)],
            })
        return {
            "method": "flownib",
            "units": "nats",
            "config": dict(self.config),
            "num_layers": len(self.layers),
            "steps": self.steps.tolist(),
            "alpha": self.alpha.tolist(),
            "d_eff_y_pr": float(self.d_eff_y_pr),
            "wall_time_s": float(self.wall_time_s),
            "timings": dict(self.timings),
            "ok": self.ok,
            "flags": [dict(f) for f in self.flags],
            "bounds": dict(self.bounds),
            "layers": layers,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "FlowNIBResult":
        try:
            ls = d["layers"]
            return cls(
                layers=[int(e["layer"]) for e in ls],
                steps=np.asarray(d["steps"], dtype=np.int64),
                ix=np.asarray([e["trajectory"]["ix"] for e in ls], dtype=np.float64).T,
                iy=np.asarray([e["trajectory"]["iy"] for e in ls], dtype=np.float64).T,
                alpha=np.asarray(d["alpha"], dtype=np.float64),
                oic=[dict(e["oic"]) for e in ls],
                d_eff_pr=np.asarray([e["d_eff_pr"] for e in ls], dtype=np.float64),
                d_eff_shannon=np.asarray([e["d_eff_shannon"] for e in ls], dtype=np.float64),
                d_eff_y_pr=float(d["d_eff_y_pr"]),
                heldout_ixz=np.asarray([e["heldout"]["ixz"] for e in ls], dtype=np.float64),
                heldout_izy=np.asarray([e["heldout"]["izy"] for e in ls], dtype=np.float64),
                config=dict(d.get("config", {})),
                wall_time_s=float(d.get("wall_time_s", 0.0)),
                timings=dict(d.get("timings", {})),
                selection=[dict(e.get("selection", {})) for e in ls],
                flags=[dict(f) for f in d.get("flags", [])],
                bounds=dict(d.get("bounds", {})),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"not a FlowNIB result (flownib.json): missing or bad field {e}") from None


def as_result_dict(r) -> dict:
    """A FlowNIBResult or its ``to_dict()`` form, as the dict."""
    if isinstance(r, FlowNIBResult):
        return r.to_dict()
    if isinstance(r, dict) and "layers" in r:
        return r
    raise DataError(f"expected a FlowNIBResult or its to_dict() form, got {type(r).__name__}")


def trajectory_collapsed(peak: float, final: float, drop_abs: float = 0.1, drop_rel: float = 0.25) -> bool:
    """True when a validation readout ends far below its own peak: by more than ``drop_abs`` nats
    and more than ``drop_rel`` of the peak (small wiggles of a flat trajectory are not flagged)."""
    if not (math.isfinite(peak) and math.isfinite(final)):
        return True
    drop = peak - final
    return drop > drop_abs and drop > drop_rel * abs(peak)


def check_estimates(layers, heldout_ixz, heldout_izy, selection, h_y: float | None, log_n: float,
                    tol: float = BOUND_TOL) -> list[dict]:
    """Flags for every estimate that violates a bound (see the module docstring).

    ``selection[k]`` holds the validation readouts ``ixz_peak``, ``ixz_final``, ``izy_peak``,
    ``izy_final``; ``h_y`` is H(Y) for a discrete Y (None for a continuous one). Returns a list
    of {layer, quantity, kind, value, bound, message}.
    """
    flags = []

    def add(layer, quantity, kind, value, bound, message):
        flags.append({"layer": int(layer), "quantity": quantity, "kind": kind, "value": float(value),
                      "bound": None if bound is None else float(bound), "message": message})

    for k, layer in enumerate(layers):
        for q, v in (("I(X;Z)", float(heldout_ixz[k])), ("I(Z;Y)", float(heldout_izy[k]))):
            if not math.isfinite(v):
                add(layer, q, "not_finite", v, None, f"layer {layer}: {q} estimate is {v}")
            elif v < -tol:
                add(layer, q, "negative", v, 0.0, f"layer {layer}: test {q} = {v:.3f} < 0 (MI is never negative)")
        iy = float(heldout_izy[k])
        if h_y is not None and math.isfinite(iy) and iy > h_y + tol:
            add(layer, "I(Z;Y)", "above_entropy", iy, h_y,
                f"layer {layer}: test I(Z;Y) = {iy:.3f} > H(Y) = {h_y:.3f} (impossible for a discrete Y)")
        ix = float(heldout_ixz[k])
        if math.isfinite(ix) and ix > log_n + tol:
            add(layer, "I(X;Z)", "above_log_n", ix, log_n,
                f"layer {layer}: test I(X;Z) = {ix:.3f} > log N = {log_n:.3f} (impossible on N samples)")
        sel = selection[k] if k < len(selection) else {}
        for q, key in (("I(X;Z)", "ixz"), ("I(Z;Y)", "izy")):
            peak, final = sel.get(f"{key}_peak"), sel.get(f"{key}_final")
            if peak is not None and final is not None and trajectory_collapsed(peak, final):
                add(layer, q, "trajectory_collapse", final, peak,
                    f"layer {layer}: validation {q} fell from {peak:.3f} to {final:.3f} (the critic overfits its "
                    f"training pairs; the fall is an estimation artefact)")
    return flags


def summary_line(result: FlowNIBResult) -> str:
    """One line per probe: per-layer OIC and the flags, for the console and the log."""
    d = as_result_dict(result)
    parts = [f"L{e['layer']}:({e['oic']['x']:.2f},{e['oic']['y']:.2f})" for e in d["layers"]]
    status = "all estimates within bounds" if d.get("ok", True) else f"{len(d['flags'])} FLAGGED estimate(s)"
    return "FlowNIB OIC (I(X;Z), I(Z;Y)) nats: " + " ".join(parts) + f" | {status}"


__all__ = ["BOUND_TOL", "FlowNIBResult", "as_result_dict", "check_estimates", "summary_line", "trajectory_collapsed"]
