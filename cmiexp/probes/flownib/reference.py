"""Reference-parity FlowNIB (``objective.compat=reference``): the authors' released pipeline
(FlowNIB.py of Kowsher/BidiVsUniLM), re-implemented here so a user can put it next to our probe
on the same cached activations. Written from a reading of that script, not copied.

What the released pipeline does, per layer l (and what this module therefore does):

* d_eff(Z_l) is the participation ratio of the cached Z_l; d_eff(Y) that of the label column.
  Z_l enters nowhere else: the critics see z = ReLU(W x + b), a fresh trainable encoder of X
  with Z_l's width, trained jointly with them (so layers differ only through d_eff and seeds);
* critics T(a, b) = Linear(512, 1)(tanh(Linear(da + db, 512)([a; b]))) on the concatenation;
* Y is the raw label as one float column (class ids as ordinal numbers);
* negatives: b shuffled by one random permutation (fixed points included);
* DV value: mean T(pos) - [max T(neg) + log(mean exp(T(neg) - max) + 1e-6)];
* loss -(alpha I(X;Z)/d_eff(Z)^2 + (1 - alpha) I(Z;Y)/d_eff(Y)^2), Adam (lr 1e-3), gradient
  norm clipped at 5, minibatches of 1000, alpha lowered by delta once per epoch (not per step);
* the recorded point of an epoch is the raw DV value of its last training minibatch (no held-out
  data); 2000 epochs.
Our differences from it are listed in the README (FlowNIB section).
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.nn as nn

from cmiexp.errors import ConfigError, DataError
from cmiexp.probes.flownib.fit import as_tensor
from cmiexp.probes.flownib.geometry import effective_dims, participation_ratio, select_oic
from cmiexp.probes.flownib.progress import progress as progress_bar
from cmiexp.probes.flownib.result import FlowNIBResult, check_estimates

REFERENCE = {"batch_size": 1000, "epochs": 2000, "lr": 1e-3, "delta": 0.001, "critic_hidden": 512, "clip": 5.0}


def reference_dv(t_pos: torch.Tensor, t_neg: torch.Tensor) -> torch.Tensor:
    """The released code's DV value: mean(t_pos) - (m + log(mean(exp(t_neg - m)) + 1e-6)), m = max(t_neg).
    (The 1e-6 sits inside the log after the max shift, so it is not exactly DV.)"""
    m = torch.max(t_neg)
    return t_pos.mean() - (m + torch.log(torch.exp(t_neg - m).mean() + 1e-6))


class ReferenceCritic(nn.Module):
    def __init__(self, da: int, db: int, hidden: int = 512):
        super().__init__()
        self.fc1 = nn.Linear(da + db, hidden)
        self.fc3 = nn.Linear(hidden, 1)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.tanh(self.fc1(torch.cat([a, b], dim=1))))


class ReferenceModel(nn.Module):
    """Encoder of X plus the two critics, as one module (one optimiser, one clipping norm)."""

    def __init__(self, dx: int, dz: int, dy: int, hidden: int = 512):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(dx, dz), nn.ReLU())
        self.mine_xz = ReferenceCritic(dx, dz, hidden)
        self.mine_zy = ReferenceCritic(dz, dy, hidden)

    def values(self, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator):
        z = self.encoder(x)
        pz = torch.randperm(z.shape[0], generator=gen).to(x.device)
        py = torch.randperm(y.shape[0], generator=gen).to(x.device)
        ixz = reference_dv(self.mine_xz(x, z), self.mine_xz(x, z[pz]))
        izy = reference_dv(self.mine_zy(z, y), self.mine_zy(z, y[py]))
        return ixz, izy


def train_flownib_reference(x, z, y, num_classes: int | None, steps: int = REFERENCE["epochs"],
                            delta: float = REFERENCE["delta"], seed: int = 0, lr: float = REFERENCE["lr"],
                            batch_size: int = REFERENCE["batch_size"], device: str = "cpu",
                            critic_hidden: int = REFERENCE["critic_hidden"], layer_ids: list[int] | None = None,
                            progress: bool = False) -> FlowNIBResult:
    """The released pipeline on cached (x [N, Dx], z [L, N, Dz], y [N]); ``steps`` counts epochs,
    as in the reference. Returns a FlowNIBResult whose 'held-out' numbers are the last epoch's
    training-minibatch values (the reference has no held-out data), checked like any probe."""
    t0 = time.perf_counter()
    xt = as_tensor(x, "x").float()
    zt = as_tensor(z, "z").float()
    zt = zt[None] if zt.dim() == 2 else zt
    yt = as_tensor(y, "y").reshape(-1, 1).float()  # raw labels as one float column, as the reference
    if xt.dim() != 2 or zt.dim() != 3 or zt.shape[1] != xt.shape[0] or yt.shape[0] != xt.shape[0]:
        raise DataError(f"x [N, D], z [L, N, D] and y [N] expected, got {tuple(xt.shape)}, {tuple(zt.shape)}, "
                        f"{tuple(yt.shape)}")
    if int(steps) < 1 or int(batch_size) < 2:
        raise ConfigError(f"steps (epochs) must be >= 1 and batch_size >= 2, got {steps} and {batch_size}")
    num_layers, n = zt.shape[0], zt.shape[1]
    layers = list(layer_ids) if layer_ids is not None else list(range(1, num_layers + 1))
    dev = torch.device(device)
    dims = np.array([effective_dims(zt[k]) for k in range(num_layers)]).reshape(num_layers, 2)
    d_pr, d_sh = dims[:, 0], dims[:, 1]
    d_y = participation_ratio(yt)
    if not d_y > 0:
        raise DataError("y is constant: d_eff(Y) is 0")
    alpha = np.maximum(0.0, 1.0 - float(delta) * np.arange(int(steps)))
    ix = np.zeros((int(steps), num_layers))
    iy = np.zeros((int(steps), num_layers))
    bar = progress_bar(int(steps) * num_layers, progress, "FlowNIB reference pipeline")
    for k in range(num_layers):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed) * 1_000_003 + k)
            model = ReferenceModel(xt.shape[1], zt.shape[2], 1, critic_hidden).to(dev)
        gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + 7 * k + 1)
        optim = torch.optim.Adam(model.parameters(), lr=float(lr))
        xd, yd = xt.to(dev), yt.to(dev)
        wz, wy = float(d_pr[k]) ** 2, float(d_y) ** 2
        for epoch in range(int(steps)):
            a = float(alpha[epoch])
            perm = torch.randperm(n, generator=gen)
            for s in range(0, n, int(batch_size)):
                idx = perm[s:s + int(batch_size)].to(dev)
                if idx.numel() < 2:
                    continue
                i_xz, i_zy = model.values(xd[idx], yd[idx], gen)
                loss = -(a * i_xz / wz + (1.0 - a) * i_zy / wy)
                optim.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), REFERENCE["clip"])
                optim.step()
            ix[epoch, k], iy[epoch, k] = float(i_xz.detach()), float(i_zy.detach())  # last minibatch, raw nats
            bar.update(1)
    bar.close()
    steps_arr = np.arange(int(steps), dtype=np.int64)
    oic = []
    for k in range(num_layers):
        t_idx, ox, oy, gamma = select_oic(ix[:, k], iy[:, k])
        oic.append({"step": int(t_idx), "x": ox, "y": oy, "gamma": gamma})
    selection = [{"ixz_peak": float(ix[:, k].max()), "ixz_final": float(ix[-1, k]),
                  "izy_peak": float(iy[:, k].max()), "izy_final": float(iy[-1, k])} for k in range(num_layers)]
    discrete = num_classes is not None and int(num_classes) > 1
    if discrete:
        counts = np.bincount(yt.reshape(-1).long().numpy(), minlength=int(num_classes)).astype(float)
        p = counts[counts > 0] / counts.sum()
        h_y = float(-(p * np.log(p)).sum())
    else:
        h_y = None
    flags = check_estimates(layers, ix[-1], iy[-1], selection, h_y, math.log(n))
    cfg = {"compat": "reference", "steps": int(steps), "batch_size": int(batch_size), "delta": float(delta),
           "lr": float(lr), "seed": int(seed), "critic": "reference concat (tanh, 512)", "estimator": "dv (reference)",
           "num_classes": None if num_classes is None else int(num_classes), "n_train": int(n), "n_val": 0,
           "n_test": 0, "noise_std": None,
           "view": "reference pipeline: trainable encoder of X, last-minibatch training values (no held-out data)"}
    return FlowNIBResult(layers=layers, steps=steps_arr, ix=ix, iy=iy, alpha=alpha, oic=oic, d_eff_pr=d_pr,
                         d_eff_shannon=d_sh, d_eff_y_pr=float(d_y), heldout_ixz=ix[-1].copy(),
                         heldout_izy=iy[-1].copy(), config=cfg, wall_time_s=time.perf_counter() - t0,
                         timings={"critic_training_s": time.perf_counter() - t0}, selection=selection, flags=flags,
                         bounds={"h_y": h_y, "log_n": math.log(n), "tolerance": 0.05})


__all__ = ["REFERENCE", "ReferenceModel", "reference_dv", "train_flownib_reference"]
