"""FlowNIB information-plane probe: the computational core, on cached activations.

FlowNIB (Kowsher et al., "An Information Bottleneck Analysis of Bidirectional vs.
Unidirectional Language Models") caches, for a fine-tuned model, X (pooled embedding-layer
output), Z_l (pooled hidden state of layer l) and Y (label), then trains per layer two critics
under

    L_l(t) = -( alpha(t) * I(X;Z_l) / d_eff(Z_l)^2 + (1 - alpha(t)) * I(Z_l;Y) / d_eff(Y)^2 ),
    alpha(0) = 1, alpha(t+1) = max(0, alpha(t) - delta),

and reads one information-plane point (I_t(X;Z_l), I_t(Z_l;Y)) per step. Each layer's Optimal
Information Coordinate (OIC) is the trajectory point maximising gamma*x + (1-gamma)*y with
gamma = R_y / (R_x + R_y).

Deliberate differences from the public reference code (whose defects we do not copy):
* the critics see the cached Z_l itself (the reference trains a fresh encoder of X instead);
* pooling respects the attention mask (no averaging over padding);
* class ids are one-hot encoded (never ordinal floats);
* trajectory points are read on a fixed held-out monitor batch, and the final numbers on all
  held-out pairs (not the last training minibatch);
* every off-diagonal pair of a batch is a negative (no permutation with fixed points).
Values are reported in raw nats; the d_eff^2 division only weights the training loss.

All layers are trained together: each critic's weights carry a leading layer dimension and are
applied with batched einsums (see :mod:`cmiexp.mi.critics`), so one optimiser step updates all
layers. The per-layer losses are summed; since the layers share no parameters, each layer's
gradient (and its Adam state) is exactly what training that layer alone would give, which is
what ``layerwise_loop=True`` (one layer at a time, benchmark only) verifies.
"""

from __future__ import annotations

import csv
import io
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cmiexp.errors import ConfigError, DataError, TrainingDiverged
from cmiexp.io import atomic_write_json, atomic_write_text
from cmiexp.mi.bounds import MineEMA, check_estimator, readout, training_objective
from cmiexp.mi.critics import CRITICS, make_stacked_critic
from cmiexp.mi.estimate import batch_stream, eval_chunks, one_hot_labels, split_indices, standardizer

# ----------------------------------------------------------------------------- pure math


def _as_2d(z, name: str = "z") -> torch.Tensor:
    t = z.detach().cpu() if isinstance(z, torch.Tensor) else torch.as_tensor(np.asarray(z))
    # float32 activations keep float32 for the one big matmul (4x cheaper on 5000 x 768 inputs,
    # ~1e-6 relative error); anything else is computed in float64.
    t = t if t.dtype == torch.float32 else t.double()
    if t.dim() == 1:
        t = t[:, None]
    if t.dim() != 2 or t.shape[0] < 2:
        raise DataError(f"{name} must be [n, d] with n >= 2, got shape {tuple(t.shape)}")
    return t


def _scatter_matrix(z) -> tuple[torch.Tensor, int]:
    """(n-1) * covariance in float64, or the n x n Gram matrix when n < d (same nonzero
    eigenvalues, cheaper)."""
    t = _as_2d(z)
    c = t - t.mean(0, keepdim=True)
    n, d = c.shape
    m = (c @ c.T) if n < d else (c.T @ c)
    return m.double(), n


def covariance_eigenvalues(z) -> np.ndarray:
    """Eigenvalues (descending, clipped at 0) of the sample covariance of z [n, d]."""
    m, n = _scatter_matrix(z)
    lam = torch.linalg.eigvalsh(m / (n - 1)).clamp_min(0.0)
    return lam.flip(0).numpy()


def _pr_from_eigenvalues(lam: np.ndarray) -> float:
    s2 = float((lam * lam).sum())
    return 0.0 if s2 <= 0.0 else float(lam.sum()) ** 2 / s2


def _shannon_from_eigenvalues(lam: np.ndarray) -> float:
    s = lam.sum()
    if s <= 0:
        return 0.0
    p = lam[lam > 0] / s
    return float(np.exp(-(p * np.log(p)).sum()))


def participation_ratio(z) -> float:
    """(sum lambda)^2 / sum lambda^2 of the covariance eigenvalues = tr(C)^2 / ||C||_F^2.

    0.0 for constant data (no variance at all).
    """
    m, _ = _scatter_matrix(z)  # the (n-1) scale cancels in the ratio
    fro2 = float((m * m).sum())
    return 0.0 if fro2 <= 0.0 else float(torch.trace(m)) ** 2 / fro2


def shannon_effective_dim(z) -> float:
    """exp(entropy of the normalised covariance eigenvalues); 0.0 for constant data."""
    return _shannon_from_eigenvalues(covariance_eigenvalues(z))


def effective_dims(z) -> tuple[float, float]:
    """(participation ratio, Shannon effective dimension) from one eigendecomposition."""
    lam = covariance_eigenvalues(z)
    return _pr_from_eigenvalues(lam), _shannon_from_eigenvalues(lam)


def alpha_schedule(T: int, delta: float = 0.001) -> np.ndarray:
    """alpha(t) for t = 0..T-1: alpha(0) = 1, alpha(t+1) = max(0, alpha(t) - delta)."""
    if int(T) < 1:
        raise ConfigError(f"steps must be >= 1, got {T}")
    if delta < 0:
        raise ConfigError(f"delta must be >= 0, got {delta}")
    return np.maximum(0.0, 1.0 - float(delta) * np.arange(int(T), dtype=np.float64))


def select_oic(ix, iy) -> tuple[int, float, float, float]:
    """Optimal Information Coordinate of a trajectory.

    gamma = R_y / (R_x + R_y) with R = max - min over the trajectory (gamma = 0.5 when both
    ranges are 0, i.e. all points coincide); returns the first t maximising
    gamma * ix[t] + (1 - gamma) * iy[t], as (t, ix[t], iy[t], gamma).
    """
    ix = np.asarray(ix, dtype=np.float64).reshape(-1)
    iy = np.asarray(iy, dtype=np.float64).reshape(-1)
    if ix.size == 0 or ix.shape != iy.shape:
        raise DataError(f"OIC needs two non-empty trajectories of equal length, got {ix.size} and {iy.size}")
    if not (np.isfinite(ix).all() and np.isfinite(iy).all()):
        raise DataError("OIC trajectory contains NaN or infinite values")
    rx = ix.max() - ix.min()
    ry = iy.max() - iy.min()
    gamma = 0.5 if rx + ry == 0 else ry / (rx + ry)
    t = int(np.argmax(gamma * ix + (1.0 - gamma) * iy))
    return t, float(ix[t]), float(iy[t]), float(gamma)


# ----------------------------------------------------------------------------- pooling


def _check_pool_inputs(hidden: torch.Tensor, attention_mask: torch.Tensor | None):
    if hidden.dim() != 3:
        raise DataError(f"hidden states must be [B, L, D], got shape {tuple(hidden.shape)}")
    if attention_mask is not None:
        if tuple(attention_mask.shape) != tuple(hidden.shape[:2]):
            raise DataError(f"attention_mask shape {tuple(attention_mask.shape)} does not match hidden "
                            f"states {tuple(hidden.shape[:2])}")
        if bool((attention_mask.sum(1) == 0).any()):
            raise DataError("attention_mask has an example with no tokens")


def masked_mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean over the positions where attention_mask == 1 (padding never enters the average)."""
    _check_pool_inputs(hidden, attention_mask)
    m = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(1) / m.sum(1)


def cls_pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The first real token of each example (position 0 for right padding or no mask; the first
    position with mask 1 for left padding)."""
    _check_pool_inputs(hidden, attention_mask)
    if attention_mask is None:
        return hidden[:, 0]
    first = attention_mask.long().argmax(1)  # argmax returns the first maximal index
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), first]


def last_token_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The last real token of each example, found per example from the mask (works for left-
    and right-padded batches)."""
    _check_pool_inputs(hidden, attention_mask)
    length = attention_mask.shape[1]
    last = length - 1 - attention_mask.long().flip(1).argmax(1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


POOLINGS = {"mean": masked_mean_pool, "cls": cls_pool, "last": last_token_pool}


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    if pooling not in POOLINGS:
        raise ConfigError(f"pooling={pooling!r} is unknown; choose one of {', '.join(POOLINGS)}")
    return POOLINGS[pooling](hidden, attention_mask)


# ----------------------------------------------------------------------------- activations


def _hidden_states(out) -> tuple:
    """All hidden states of a forward output: ``hidden_states``, or the encoder's for
    encoder-decoder classifiers (T5), whose decoder reads only a start token."""
    hs = getattr(out, "hidden_states", None)
    if hs is None:
        hs = getattr(out, "encoder_hidden_states", None)
    if hs is None or len(hs) < 2:
        raise DataError("extract_activations: the model returned no hidden states")
    return hs


@torch.no_grad()
def extract_activations(model, dataloader, pooling: str = "mean", device: str = "cpu",
                        head_positions=None) -> dict[str, torch.Tensor]:
    """Run ``model`` once over ``dataloader`` and cache pooled (X, Z_1..Z_L, Y).

    Batches are dicts with input_ids, attention_mask, labels, idx (token_type_ids passed on when
    present). X is hidden_states[0] (embedding output), always attention-masked mean pooled (a
    CLS or last-token slice of the embedding output is nearly the same vector for every
    example); Z_l = hidden_states[l] pooled by ``pooling``: mean | cls | last, or ``head`` = the
    token at ``head_positions(input_ids, attention_mask)`` ([B] long), e.g. the mask token a
    prompt head reads. Returns float32 CPU tensors x [N, D], z [L, N, D], y [N], idx [N].
    """
    if pooling == "head":
        if head_positions is None:
            raise ConfigError("pooling='head' needs head_positions (a function of input_ids and attention_mask)")
    elif pooling not in POOLINGS:
        raise ConfigError(f"pooling={pooling!r} is unknown; choose one of {', '.join(POOLINGS)}, head")
    dev = torch.device(device)
    model.to(dev)
    was_training = model.training
    model.eval()
    xs, zs, ys, ids = [], [], [], []
    try:
        for i, batch in enumerate(dataloader):
            for key in ("input_ids", "attention_mask", "labels", "idx"):
                if key not in batch:
                    raise DataError(f"extract_activations: batch {i} has no {key!r} field")
            mask = batch["attention_mask"].to(dev)
            inputs = {"input_ids": batch["input_ids"].to(dev), "attention_mask": mask}
            if "token_type_ids" in batch:
                inputs["token_type_ids"] = batch["token_type_ids"].to(dev)
            hs = _hidden_states(model(**inputs, output_hidden_states=True))
            xs.append(masked_mean_pool(hs[0].float(), mask).cpu())
            if pooling == "head":
                _check_pool_inputs(hs[-1], mask)
                pos = torch.as_tensor(head_positions(inputs["input_ids"], mask)).to(dev).long()
                rows = torch.arange(mask.shape[0], device=dev)
                zs.append(torch.stack([h.float()[rows, pos].cpu() for h in hs[1:]]))
            else:
                zs.append(torch.stack([pool(h.float(), mask, pooling).cpu() for h in hs[1:]]))
            ys.append(torch.as_tensor(batch["labels"]).cpu())
            ids.append(torch.as_tensor(batch["idx"]).cpu().long())
    finally:
        model.train(was_training)
    if not xs:
        raise DataError("extract_activations: the dataloader yielded no batches")
    return {"x": torch.cat(xs), "z": torch.cat(zs, dim=1), "y": torch.cat(ys), "idx": torch.cat(ids)}


# ----------------------------------------------------------------------------- training


@dataclass
class FlowNIBResult:
    """Per-layer information-plane trajectories, OICs, effective dimensions, held-out MI."""

    layers: list[int]
    steps: np.ndarray  # [T'] recorded training steps
    ix: np.ndarray  # [T', L] I_t(X; Z_l), nats, on the held-out monitor batch
    iy: np.ndarray  # [T', L] I_t(Z_l; Y)
    alpha: np.ndarray  # [T'] alpha at the recorded steps
    oic: list[dict]  # per layer {step, x, y, gamma}
    d_eff_pr: np.ndarray  # [L] participation ratio of Z_l
    d_eff_shannon: np.ndarray  # [L]
    d_eff_y_pr: float
    heldout_ixz: np.ndarray  # [L] final critics on all held-out pairs
    heldout_izy: np.ndarray  # [L]
    config: dict = field(default_factory=dict)
    wall_time_s: float = 0.0
    timings: dict = field(default_factory=dict)  # seconds: d_eff_s, critic_training_s

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
            )
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"not a FlowNIB result (flownib.json): missing or bad field {e}") from None


def _tensor(a, name: str) -> torch.Tensor:
    if isinstance(a, torch.Tensor):
        return a.detach().cpu()
    try:
        return torch.as_tensor(np.asarray(a))
    except (TypeError, ValueError) as e:
        raise DataError(f"{name} must be a numeric array: {e}") from None


def _prepare_inputs(x, z, y, num_classes):
    xt = _tensor(x, "x").float()
    zt = _tensor(z, "z").float()
    yt = _tensor(y, "y")
    if xt.dim() != 2:
        raise DataError(f"x must be [N, D], got shape {tuple(xt.shape)}")
    if zt.dim() == 2:
        zt = zt[None]
    if zt.dim() != 3:
        raise DataError(f"z must be [L, N, D] (one slice per layer), got shape {tuple(zt.shape)}")
    n = xt.shape[0]
    if zt.shape[1] != n or yt.reshape(-1).shape[0] != n:
        raise DataError(f"x, z and y disagree on the number of examples: x {n}, z {zt.shape[1]}, "
                        f"y {yt.reshape(-1).shape[0]}")
    for name, t in (("x", xt), ("z", zt)):
        if not torch.isfinite(t).all():
            raise DataError(f"{name} contains NaN or infinite values")
    if num_classes is None or int(num_classes) <= 1:
        # regression target: a continuous scalar
        yf = yt.reshape(-1, 1).float()
        if not torch.isfinite(yf).all():
            raise DataError("y contains NaN or infinite values (unlabelled rows must be removed)")
        return xt, zt, yf, False
    labels = yt.reshape(-1)
    yoh, _ = one_hot_labels(labels, int(num_classes))
    if int((yoh.sum(0) > 0).sum()) < 2:
        raise DataError("y holds a single class: I(Z;Y) is 0 and d_eff(Y) is undefined")
    return xt, zt, yoh, True


def _train_stack(data: dict, wz: torch.Tensor, wy: float, seeds_xz, seeds_zy, cfg: dict) -> dict:
    """Train the critics of the layers in data['z_tr'] ([K, n, D]) together; returns trajectories
    [T', K] and held-out values [K]. Pure function of its inputs and cfg['seed']."""
    dev = torch.device(cfg["device"])
    x_tr, z_tr, y_tr = data["x_tr"], data["z_tr"], data["y_tr"]
    k = z_tr.shape[0]
    kw = dict(hidden=cfg["hidden"], side_layers=cfg["side_layers"], pair_layers=cfg["pair_layers"],
              embed_dim=cfg["embed_dim"])
    crit_xz = make_stacked_critic(cfg["critic"], k, x_tr.shape[1], z_tr.shape[2], seeds=seeds_xz, **kw).to(dev)
    crit_zy = make_stacked_critic(cfg["critic"], k, z_tr.shape[2], y_tr.shape[1], seeds=seeds_zy, **kw).to(dev)
    optim = torch.optim.Adam(list(crit_xz.parameters()) + list(crit_zy.parameters()), lr=cfg["lr"])
    est, tau = cfg["estimator"], cfg["tau"]
    ema_xz = MineEMA(cfg["ema_momentum"]) if est == "mine" else None
    ema_zy = MineEMA(cfg["ema_momentum"]) if est == "mine" else None
    steps = cfg["steps"]
    alpha = alpha_schedule(steps, cfg["delta"])
    wz = wz.to(dev)

    gen = torch.Generator().manual_seed(cfg["seed"] + 1)  # batch order: same for every layer/mode
    stream = batch_stream(x_tr.shape[0], cfg["batch_size"], gen)
    mon = data["monitor"]
    x_mon, z_mon, y_mon = data["x_ho"][mon], data["z_ho"][:, mon], data["y_ho"][mon]
    rec_ix, rec_iy = [], []
    record_every = cfg["record_every"]
    for t in range(steps):
        idx = next(stream).to(dev)
        xb, zb, yb = x_tr[idx], z_tr[:, idx], y_tr[idx]
        o_xz = training_objective(est, crit_xz(xb, zb), tau=tau, ema=ema_xz)  # [K]
        o_zy = training_objective(est, crit_zy(zb, yb), tau=tau, ema=ema_zy)  # [K]
        a = float(alpha[t])
        loss = -(a * o_xz / wz + (1.0 - a) * o_zy / wy).sum()
        # checked every 50 steps (a check is a GPU sync); a NaN persists, so none is missed
        if ((t + 1) % 50 == 0 or t == steps - 1) and not torch.isfinite(loss):
            raise TrainingDiverged(f"FlowNIB: the {est} objective became non-finite by step {t}; lower lr "
                                   f"or use estimator='smile'")
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()
        if (t + 1) % record_every == 0 or t == steps - 1:
            with torch.no_grad():
                # stays on the device: a .cpu() per step would force a GPU sync every step
                rec_ix.append(readout(est, crit_xz(x_mon, z_mon), tau=tau))
                rec_iy.append(readout(est, crit_zy(z_mon, y_mon), tau=tau))

    ho_ix, ho_iy = [], []
    with torch.no_grad():
        for chunk in eval_chunks(data["x_ho"].shape[0], cfg["eval_batch_size"]):
            chunk = chunk.to(dev)
            xb, zb, yb = data["x_ho"][chunk], data["z_ho"][:, chunk], data["y_ho"][chunk]
            ho_ix.append(readout(est, crit_xz(xb, zb), tau=tau))
            ho_iy.append(readout(est, crit_zy(zb, yb), tau=tau))
    return {
        "ix": torch.stack(rec_ix).double().cpu().numpy(),
        "iy": torch.stack(rec_iy).double().cpu().numpy(),
        "heldout_ixz": torch.stack(ho_ix).double().mean(0).cpu().numpy(),
        "heldout_izy": torch.stack(ho_iy).double().mean(0).cpu().numpy(),
    }


def _check_cfg(cfg: dict) -> dict:
    check_estimator(cfg["estimator"])
    if cfg["critic"] not in CRITICS:
        raise ConfigError(f"critic={cfg['critic']!r} is unknown; choose one of {', '.join(CRITICS)}")
    for key in ("steps", "batch_size", "hidden", "record_every", "eval_batch_size", "monitor_batch_size"):
        if int(cfg[key]) < 1:
            raise ConfigError(f"{key} must be >= 1, got {cfg[key]}")
    if cfg["batch_size"] < 2:
        raise ConfigError(f"batch_size must be >= 2 (negatives come from the batch), got {cfg['batch_size']}")
    if not cfg["lr"] > 0:
        raise ConfigError(f"lr must be > 0, got {cfg['lr']}")
    return cfg


def train_flownib(x, z, y, num_classes: int | None, steps: int = 2000, batch_size: int = 128,
                  delta: float = 0.001, estimator: str = "dv", heldout_fraction: float = 0.2, seed: int = 0,
                  hidden: int = 128, lr: float = 1e-3, device: str = "cpu", *, critic: str = "concat",
                  side_layers: int = 1, pair_layers: int = 0, embed_dim: int = 32, tau: float | None = 5.0,
                  ema_momentum: float = 0.99, monitor_batch_size: int | None = None,
                  eval_batch_size: int | None = None, record_every: int = 1, standardize: bool = True,
                  layer_ids: list[int] | None = None, layerwise_loop: bool = False) -> FlowNIBResult:
    """Train the FlowNIB critics of all layers at once and return their information-plane data.

    x [N, Dx] pooled embedding output, z [L, N, Dz] pooled layer outputs, y [N] class ids (one-
    hot encoded; ``num_classes=None`` treats y as a continuous regression target). Data are
    split once into train / held-out (``heldout_fraction``); x and z are standardised with train
    statistics (d_eff is computed on the raw z). Each step samples one batch (the same indices
    for every layer), applies the alpha schedule and the 1/d_eff^2 weights, and records every
    layer's (I(X;Z_l), I(Z_l;Y)) readout on a fixed held-out monitor batch every
    ``record_every`` steps. ``layerwise_loop=True`` runs the same computation one layer at a
    time (for benchmarking; results match the batched run up to float rounding).
    """
    t0 = time.perf_counter()
    cfg = _check_cfg({
        "steps": int(steps), "batch_size": int(batch_size), "delta": float(delta), "estimator": estimator,
        "heldout_fraction": float(heldout_fraction), "seed": int(seed), "hidden": int(hidden), "lr": float(lr),
        "device": str(device), "critic": critic, "side_layers": int(side_layers), "pair_layers": int(pair_layers),
        "embed_dim": int(embed_dim), "tau": tau, "ema_momentum": float(ema_momentum),
        "monitor_batch_size": int(monitor_batch_size or batch_size),
        "eval_batch_size": int(eval_batch_size or batch_size), "record_every": int(record_every),
        "standardize": bool(standardize), "num_classes": None if num_classes is None else int(num_classes),
    })
    xt, zt, yt, discrete = _prepare_inputs(x, z, y, num_classes)
    num_layers, n = zt.shape[0], zt.shape[1]
    layers = list(layer_ids) if layer_ids is not None else list(range(1, num_layers + 1))
    if len(layers) != num_layers:
        raise ConfigError(f"layer_ids has {len(layers)} entries for {num_layers} layers")

    # Effective dimensions on the raw representations (a property of the model, not the probe).
    dims = np.array([effective_dims(zt[k]) for k in range(num_layers)]).reshape(num_layers, 2)
    d_pr, d_sh = dims[:, 0], dims[:, 1]
    d_y = participation_ratio(yt)
    t_deff = time.perf_counter() - t0
    if not np.all(d_pr > 0):
        raise DataError(f"z layer(s) {[layers[k] for k in np.where(d_pr <= 0)[0]]} are constant: d_eff is 0")

    gen = torch.Generator().manual_seed(cfg["seed"])
    tr, ho = split_indices(n, cfg["heldout_fraction"], gen)
    cfg["batch_size"] = min(cfg["batch_size"], len(tr))
    mon = torch.randperm(len(ho), generator=gen)[: min(cfg["monitor_batch_size"], len(ho))]
    if cfg["standardize"]:
        mx, sx = standardizer(xt[tr])
        xt = (xt - mx) / sx
        mz = zt[:, tr].mean(1, keepdim=True)
        sz = zt[:, tr].std(1, unbiased=False, keepdim=True)
        zt = (zt - mz) / torch.where(sz > 1e-8, sz, torch.ones_like(sz))
        if not discrete:
            my, sy = standardizer(yt[tr])
            yt = (yt - my) / sy
    dev = torch.device(cfg["device"])
    data = {"x_tr": xt[tr].to(dev), "z_tr": zt[:, tr].to(dev), "y_tr": yt[tr].to(dev),
            "x_ho": xt[ho].to(dev), "z_ho": zt[:, ho].to(dev), "y_ho": yt[ho].to(dev), "monitor": mon.to(dev)}
    wz = torch.as_tensor(d_pr**2, dtype=torch.float32)
    wy = float(d_y**2)
    base = cfg["seed"] * 1_000_003
    seeds_xz = [base + 2 * k for k in range(num_layers)]
    seeds_zy = [base + 2 * k + 1 for k in range(num_layers)]

    t_train = time.perf_counter()
    if layerwise_loop:
        parts = []
        for k in range(num_layers):
            sub = dict(data, z_tr=data["z_tr"][k:k + 1], z_ho=data["z_ho"][k:k + 1])
            parts.append(_train_stack(sub, wz[k:k + 1], wy, seeds_xz[k:k + 1], seeds_zy[k:k + 1], cfg))
        out = {key: np.concatenate([p[key] for p in parts], axis=-1) for key in parts[0]}
    else:
        out = _train_stack(data, wz, wy, seeds_xz, seeds_zy, cfg)
    t_train = time.perf_counter() - t_train

    rec_steps = np.array([t for t in range(cfg["steps"])
                          if (t + 1) % cfg["record_every"] == 0 or t == cfg["steps"] - 1], dtype=np.int64)
    alpha = alpha_schedule(cfg["steps"], cfg["delta"])[rec_steps]
    oic = []
    for k in range(num_layers):
        t_idx, ox, oy, gamma = select_oic(out["ix"][:, k], out["iy"][:, k])
        oic.append({"step": int(rec_steps[t_idx]), "x": ox, "y": oy, "gamma": gamma})
    cfg["layerwise_loop"] = bool(layerwise_loop)
    cfg["n_train"], cfg["n_heldout"] = int(len(tr)), int(len(ho))
    return FlowNIBResult(layers=layers, steps=rec_steps, ix=out["ix"], iy=out["iy"], alpha=alpha, oic=oic,
                         d_eff_pr=d_pr, d_eff_shannon=d_sh, d_eff_y_pr=float(d_y),
                         heldout_ixz=out["heldout_ixz"], heldout_izy=out["heldout_izy"], config=cfg,
                         wall_time_s=time.perf_counter() - t0,
                         timings={"d_eff_s": t_deff, "critic_training_s": t_train})


def train_flownib_single_layer(x, z_layer, y, num_classes: int | None, **kwargs) -> FlowNIBResult:
    """FlowNIB on one layer's activations z_layer [N, D] (same math as ``train_flownib``)."""
    zt = _tensor(z_layer, "z_layer")
    if zt.dim() != 2:
        raise DataError(f"z_layer must be [N, D], got shape {tuple(zt.shape)}")
    return train_flownib(x, zt[None], y, num_classes, **kwargs)


# ----------------------------------------------------------------------------- outputs

CSV_FIELDS = ["layer", "d_eff_pr", "d_eff_shannon", "oic_step", "oic_x", "oic_y", "oic_gamma",
              "heldout_ixz", "heldout_izy", "final_ix", "final_iy"]


def _as_result_dict(r) -> dict:
    if isinstance(r, FlowNIBResult):
        return r.to_dict()
    if isinstance(r, dict) and "layers" in r:
        return r
    raise DataError(f"expected a FlowNIBResult or its to_dict() form, got {type(r).__name__}")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _subsample(n: int, limit: int = 600) -> np.ndarray:
    # thousands of points per layer add nothing visually but slow the PNG down
    return np.unique(np.linspace(0, n - 1, min(n, limit)).round().astype(int))


def plot_information_plane(result, path, title: str | None = None) -> int:
    """One trajectory per layer coloured by step, plus the OIC path across layers.
    Returns the number of trajectories drawn."""
    d = _as_result_dict(result)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 5.5))
    steps = np.asarray(d["steps"])
    drawn = 0
    sc = None
    for e in d["layers"]:
        ix, iy = np.asarray(e["trajectory"]["ix"]), np.asarray(e["trajectory"]["iy"])
        sel = _subsample(len(ix))
        ax.plot(ix[sel], iy[sel], color="0.75", lw=0.6, zorder=1)
        sc = ax.scatter(ix[sel], iy[sel], c=steps[sel], cmap="viridis", s=4, zorder=2,
                        vmin=steps.min(), vmax=max(steps.max(), steps.min() + 1))
        drawn += 1
    ox = [e["oic"]["x"] for e in d["layers"]]
    oy = [e["oic"]["y"] for e in d["layers"]]
    ax.plot(ox, oy, "-o", color="crimson", lw=1.5, ms=5, zorder=3, label="OIC path (by layer)")
    for e, xv, yv in zip(d["layers"], ox, oy):
        ax.annotate(str(e["layer"]), (xv, yv), textcoords="offset points", xytext=(4, 4), fontsize=7)
    if sc is not None:
        fig.colorbar(sc, ax=ax, label="step")
    ax.set_xlabel("I(X; Z_l)  [nats]")
    ax.set_ylabel("I(Z_l; Y)  [nats]")
    ax.set_title(title or "FlowNIB information plane")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return drawn


def plot_deff(result, path) -> None:
    d = _as_result_dict(result)
    plt = _pyplot()
    layers = [e["layer"] for e in d["layers"]]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(layers, [e["d_eff_pr"] for e in d["layers"]], "-o", label="participation ratio")
    ax.plot(layers, [e["d_eff_shannon"] for e in d["layers"]], "-s", label="Shannon effective dim")
    ax.set_xlabel("layer")
    ax.set_ylabel("d_eff(Z_l)")
    ax.set_title("Effective dimension by layer")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_oic_by_layer(results: dict, path) -> None:
    """OIC coordinates vs layer for one or several runs (label -> result)."""
    plt = _pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for label, r in results.items():
        d = _as_result_dict(r)
        layers = [e["layer"] for e in d["layers"]]
        ax1.plot(layers, [e["oic"]["x"] for e in d["layers"]], "-o", label=label)
        ax2.plot(layers, [e["oic"]["y"] for e in d["layers"]], "-o", label=label)
    ax1.set_title("OIC  I(X; Z_l)")
    ax2.set_title("OIC  I(Z_l; Y)")
    for ax in (ax1, ax2):
        ax.set_xlabel("layer")
        ax.set_ylabel("nats")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _csv_text(d: dict) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    w.writeheader()
    for e in d["layers"]:
        w.writerow({
            "layer": e["layer"], "d_eff_pr": e["d_eff_pr"], "d_eff_shannon": e["d_eff_shannon"],
            "oic_step": e["oic"]["step"], "oic_x": e["oic"]["x"], "oic_y": e["oic"]["y"],
            "oic_gamma": e["oic"]["gamma"], "heldout_ixz": e["heldout"]["ixz"], "heldout_izy": e["heldout"]["izy"],
            "final_ix": e["trajectory"]["ix"][-1], "final_iy": e["trajectory"]["iy"][-1],
        })
    return buf.getvalue()


def write_outputs(result, out_dir) -> dict[str, Path]:
    """Write flownib.json, flownib.csv (one row per layer) and the PNG plots into ``out_dir``."""
    d = _as_result_dict(result)
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
    atomic_write_text(paths["csv"], _csv_text(d))
    plot_information_plane(d, paths["information_plane"])
    plot_deff(d, paths["deff"])
    plot_oic_by_layer({"run": d}, paths["oic"])
    return paths


def compare_runs(results: dict, out_dir) -> dict[str, Path]:
    """Overlay several runs (label -> FlowNIBResult or result dict, e.g. bidirectional vs
    unidirectional): one information-plane plot (faint per-layer trajectories and bold OIC path
    per run), one OIC-by-layer plot, and a JSON summary of the OICs."""
    if not results:
        raise ConfigError("compare_runs needs at least one run")
    ds = {str(label): _as_result_dict(r) for label, r in results.items()}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plt = _pyplot()
    paths = {"information_plane": out / "compare_information_plane.png",
             "oic": out / "compare_oic_by_layer.png", "json": out / "compare_flownib.json"}
    fig, ax = plt.subplots(figsize=(7, 5.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, d) in enumerate(ds.items()):
        c = colors[i % len(colors)]
        for e in d["layers"]:
            ix, iy = np.asarray(e["trajectory"]["ix"]), np.asarray(e["trajectory"]["iy"])
            sel = _subsample(len(ix), 300)
            ax.plot(ix[sel], iy[sel], color=c, alpha=0.25, lw=0.7)
        ax.plot([e["oic"]["x"] for e in d["layers"]], [e["oic"]["y"] for e in d["layers"]], "-o",
                color=c, lw=2, ms=5, label=f"{label} (OIC path)")
    ax.set_xlabel("I(X; Z_l)  [nats]")
    ax.set_ylabel("I(Z_l; Y)  [nats]")
    ax.set_title("FlowNIB information plane")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(paths["information_plane"], dpi=120)
    plt.close(fig)
    plot_oic_by_layer(ds, paths["oic"])
    summary = {label: [{"layer": e["layer"], **e["oic"], "d_eff_pr": e["d_eff_pr"]} for e in d["layers"]]
               for label, d in ds.items()}
    atomic_write_json(paths["json"], summary)
    return paths


__all__ = [
    "FlowNIBResult", "alpha_schedule", "cls_pool", "compare_runs", "covariance_eigenvalues",
    "effective_dims", "extract_activations", "last_token_pool", "masked_mean_pool", "participation_ratio", "plot_deff",
    "plot_information_plane", "plot_oic_by_layer", "pool", "select_oic", "shannon_effective_dim",
    "train_flownib", "train_flownib_single_layer", "write_outputs",
]
