"""FlowNIB critic training on cached activations, all layers in one batched computation.

Per layer l two critics are trained under

    L_l(t) = -( alpha(t) * I(X;Z_l) / d_eff(Z_l)^2 + (1 - alpha(t)) * I(Z_l;Y) / d_eff(Y)^2 ),
    alpha(0) = 1, alpha(t+1) = max(0, alpha(t) - delta).

The rows are split three ways, so every reported number is read on pairs that neither trained
nor selected the critic that produced it:

* train: the critics' minibatches;
* validation: the trajectory points (a fixed monitor batch, every ``record_every`` steps) and
  model selection: every ``select_every`` steps each layer's critics are scored on all
  validation pairs and the best state of each (layer, quantity) is kept. The trivial constant
  critic (estimate exactly 0) is the starting "best", so a layer where no critic finds
  information reports 0 rather than a negative artefact;
* test: ``heldout_ixz`` / ``heldout_izy``, the kept critics' readouts. A critic fixed before it
  sees those pairs gives a DV value that is a lower bound on the true MI in expectation.

Every run checks its own numbers (:func:`cmiexp.probes.flownib.result.check_estimates`).

What I(X;Z_l) means: Z_l is a deterministic function of the input, so for continuous inputs the
true I(X;Z_l) is infinite, and on the N cached samples it is log N. The deterministic estimate
therefore measures what a critic of this capacity and budget can find, comparable across layers
of one run at equal settings but not an absolute quantity. ``noise_std=s`` gives the well-posed
noisy-channel view (Goldfeld et al. 2019): the critics see Z_l + N(0, s^2 I) (Z_l standardised,
fresh noise every training step, fixed noise on validation/test), so I(X; Z_l + noise) is finite.

Layers share no parameters, so the summed loss gives each layer exactly the gradient (and Adam
state) it would get alone; ``layerwise_loop=True`` (benchmark only) runs them one at a time.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch

from cmiexp.errors import ConfigError, DataError, TrainingDiverged
from cmiexp.mi.bounds import MineEMA, check_estimator, readout, training_objective
from cmiexp.mi.critics import CRITICS, make_stacked_critic
from cmiexp.mi.estimate import entropy_from_labels
from cmiexp.mi.pairs import batch_stream, eval_chunks, flush_denormals, one_hot_labels, split_three, standardizer
from cmiexp.probes.flownib.geometry import alpha_schedule, effective_dims, participation_ratio, select_oic
from cmiexp.probes.flownib.progress import progress as progress_bar
from cmiexp.probes.flownib.result import FlowNIBResult, check_estimates


def as_tensor(a, name: str) -> torch.Tensor:
    if isinstance(a, torch.Tensor):
        return a.detach().cpu()
    try:
        return torch.as_tensor(np.asarray(a))
    except (TypeError, ValueError) as e:
        raise DataError(f"{name} must be a numeric array: {e}") from None


def prepare_inputs(x, z, y, num_classes):
    """Checked float tensors x [N, Dx], z [L, N, Dz], y [N, C] one-hot (or [N, 1] continuous)."""
    xt = as_tensor(x, "x").float()
    zt = as_tensor(z, "z").float()
    yt = as_tensor(y, "y")
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
        yf = yt.reshape(-1, 1).float()
        if not torch.isfinite(yf).all():
            raise DataError("y contains NaN or infinite values (unlabelled rows must be removed)")
        return xt, zt, yf, False
    labels = yt.reshape(-1)
    yoh, _ = one_hot_labels(labels, int(num_classes))
    if int((yoh.sum(0) > 0).sum()) < 2:
        raise DataError("y holds a single class: I(Z;Y) is 0 and d_eff(Y) is undefined")
    return xt, zt, yoh, True


def _chunked(est: str, critic, a: torch.Tensor, b: torch.Tensor, eval_batch: int, tau) -> torch.Tensor:
    """Per-critic readout [K] averaged over nearly equal chunks of the rows of a ([n, D] or
    [K, n, D]) and b."""
    n = a.shape[-2]
    vals = []
    for chunk in eval_chunks(n, eval_batch):
        chunk = chunk.to(a.device)
        ac = a[..., chunk, :]
        bc = b[..., chunk, :]
        vals.append(readout(est, critic(ac, bc), tau=tau))
    return torch.stack(vals).mean(0)


class BestState:
    """The best-on-validation parameters of a stacked critic, kept per critic (layer).

    Every parameter carries the critic index as its leading dimension, so keeping layer k's best
    state is a masked copy along that dimension. ``score`` starts at 0.0, the value of the
    constant critic, which ``found`` marks as not yet beaten."""

    def __init__(self, critic: torch.nn.Module, k: int, device):
        self.critic = critic
        self.params = {n: p.detach().clone() for n, p in critic.named_parameters()}
        self.score = torch.zeros(k, dtype=torch.float64, device=device)
        self.step = torch.zeros(k, dtype=torch.long, device=device)
        self.found = torch.zeros(k, dtype=torch.bool, device=device)

    @torch.no_grad()
    def update(self, score: torch.Tensor, step: int) -> None:
        better = score.double() > self.score + 1e-4
        if not bool(better.any()):
            return
        for n, p in self.critic.named_parameters():
            self.params[n][better] = p.detach()[better]
        self.score = torch.where(better, score.double(), self.score)
        self.step = torch.where(better, torch.full_like(self.step, step), self.step)
        self.found |= better

    @torch.no_grad()
    def load(self) -> None:
        for n, p in self.critic.named_parameters():
            p.copy_(self.params[n])


def _train_stack(data: dict, wz: torch.Tensor, wy: float, seeds_xz, seeds_zy, cfg: dict, bar) -> dict:
    """Train the critics of the layers in data['z_tr'] ([K, n, D]) together; returns trajectories
    [T', K], the selection record and test values [K]. Pure function of its inputs and cfg['seed']."""
    dev = torch.device(cfg["device"])
    x_tr, z_tr, y_tr = data["x_tr"], data["z_tr"], data["y_tr"]
    k = z_tr.shape[0]
    kw = dict(hidden=cfg["hidden"], side_layers=cfg["side_layers"], pair_layers=cfg["pair_layers"],
              embed_dim=cfg["embed_dim"])
    crit_xz = make_stacked_critic(cfg["critic"], k, x_tr.shape[1], z_tr.shape[2], seeds=seeds_xz, **kw).to(dev)
    crit_zy = make_stacked_critic(cfg["critic"], k, z_tr.shape[2], y_tr.shape[1], seeds=seeds_zy, **kw).to(dev)
    optim = torch.optim.Adam(list(crit_xz.parameters()) + list(crit_zy.parameters()), lr=cfg["lr"],
                             weight_decay=cfg["weight_decay"])
    est, tau = cfg["estimator"], cfg["tau"]
    ema_xz = MineEMA(cfg["ema_momentum"]) if est == "mine" else None
    ema_zy = MineEMA(cfg["ema_momentum"]) if est == "mine" else None
    steps = cfg["steps"]
    alpha = alpha_schedule(steps, cfg["delta"])
    wz = wz.to(dev)
    noise = cfg["noise_std"]
    ngen = torch.Generator(device=dev).manual_seed(cfg["seed"] + 2)  # training noise draws

    gen = torch.Generator().manual_seed(cfg["seed"] + 1)  # batch order: same for every layer/mode
    stream = batch_stream(x_tr.shape[0], cfg["batch_size"], gen)
    mon = data["monitor"]
    x_va, z_va, y_va = data["x_va"], data["z_va"], data["y_va"]
    x_mon, z_mon, y_mon = x_va[mon], z_va[:, mon], y_va[mon]
    best_xz, best_zy = BestState(crit_xz, k, dev), BestState(crit_zy, k, dev)
    val_xz, val_zy, val_steps = [], [], []
    rec_ix, rec_iy = [], []
    record_every, select_every, eb = cfg["record_every"], cfg["select_every"], cfg["eval_batch_size"]
    for t in range(steps):
        idx = next(stream).to(dev)
        xb, zb, yb = x_tr[idx], z_tr[:, idx], y_tr[idx]
        if noise:
            zb = zb + noise * torch.randn(zb.shape, generator=ngen, device=dev)
        o_xz = training_objective(est, crit_xz(xb, zb), tau=tau, ema=ema_xz)  # [K]
        o_zy = training_objective(est, crit_zy(zb, yb), tau=tau, ema=ema_zy)  # [K]
        a = float(alpha[t])
        loss = -(a * o_xz / wz + (1.0 - a) * o_zy / wy).sum()
        # checked every 50 steps (a check is a GPU sync); a NaN persists, so none is missed
        if ((t + 1) % 50 == 0 or t == steps - 1) and not torch.isfinite(loss):
            raise TrainingDiverged(f"FlowNIB: the {est} objective became non-finite by step {t}; lower "
                                   f"objective.lr or use objective.estimator=smile")
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()
        last = t == steps - 1
        if (t + 1) % record_every == 0 or last:
            with torch.no_grad():
                # stays on the device: a .cpu() per step would force a GPU sync every step
                rec_ix.append(readout(est, crit_xz(x_mon, z_mon), tau=tau))
                rec_iy.append(readout(est, crit_zy(z_mon, y_mon), tau=tau))
        if (t + 1) % select_every == 0 or last:
            with torch.no_grad():
                vx = _chunked(est, crit_xz, x_va, z_va, eb, tau)
                vy = _chunked(est, crit_zy, z_va, y_va, eb, tau)
            best_xz.update(vx, t + 1)
            best_zy.update(vy, t + 1)
            val_xz.append(vx)
            val_zy.append(vy)
            val_steps.append(t + 1)
            bar.set_postfix_str(f"val I(X;Z) {float(vx.mean()):.2f} I(Z;Y) {float(vy.mean()):.2f} (layer mean)",
                                refresh=False)
        bar.update(1)

    vxs = torch.stack(val_xz).double().cpu().numpy()  # [E, K]
    vys = torch.stack(val_zy).double().cpu().numpy()
    best_xz.load()
    best_zy.load()
    with torch.no_grad():
        te_x = _chunked(est, crit_xz, data["x_te"], data["z_te"], eb, tau)
        te_y = _chunked(est, crit_zy, data["z_te"], data["y_te"], eb, tau)
    # a layer whose critics never beat the constant critic on validation reports the constant's 0
    te_x = torch.where(best_xz.found, te_x.double(), torch.zeros_like(te_x, dtype=torch.float64))
    te_y = torch.where(best_zy.found, te_y.double(), torch.zeros_like(te_y, dtype=torch.float64))
    selection = []
    for j in range(k):
        selection.append({
            "ixz_best_step": int(best_xz.step[j]), "izy_best_step": int(best_zy.step[j]),
            "ixz_peak": float(vxs[:, j].max()), "ixz_final": float(vxs[-1, j]),
            "izy_peak": float(vys[:, j].max()), "izy_final": float(vys[-1, j]),
            "ixz_val_best": float(best_xz.score[j]), "izy_val_best": float(best_zy.score[j]),
        })
    return {
        "ix": torch.stack(rec_ix).double().cpu().numpy(),
        "iy": torch.stack(rec_iy).double().cpu().numpy(),
        "heldout_ixz": te_x.cpu().numpy(),
        "heldout_izy": te_y.cpu().numpy(),
        "selection": selection,
        "val_steps": val_steps,
        "val_ix": vxs,
        "val_iy": vys,
    }


def check_cfg(cfg: dict) -> dict:
    check_estimator(cfg["estimator"])
    if cfg["critic"] not in CRITICS:
        raise ConfigError(f"critic={cfg['critic']!r} is unknown; choose one of {', '.join(CRITICS)}")
    for key in ("steps", "batch_size", "hidden", "record_every", "eval_batch_size", "monitor_batch_size",
                "select_every"):
        if int(cfg[key]) < 1:
            raise ConfigError(f"{key} must be >= 1, got {cfg[key]}")
    if cfg["batch_size"] < 2:
        raise ConfigError(f"batch_size must be >= 2 (negatives come from the batch), got {cfg['batch_size']}")
    if not cfg["lr"] > 0:
        raise ConfigError(f"lr must be > 0, got {cfg['lr']}")
    if cfg["noise_std"] is not None and not cfg["noise_std"] >= 0:
        raise ConfigError(f"noise_std must be >= 0 or null, got {cfg['noise_std']}")
    return cfg


def train_flownib(x, z, y, num_classes: int | None, steps: int = 2000, batch_size: int = 128,
                  delta: float = 0.001, estimator: str = "dv", heldout_fraction: float = 0.2, seed: int = 0,
                  hidden: int = 128, lr: float = 1e-3, device: str = "cpu", *, critic: str = "concat",
                  side_layers: int = 1, pair_layers: int = 0, embed_dim: int = 32, tau: float | None = 5.0,
                  ema_momentum: float = 0.99, monitor_batch_size: int | None = None,
                  eval_batch_size: int | None = None, record_every: int = 1, select_every: int = 25,
                  test_fraction: float = 0.2, noise_std: float | None = None, weight_decay: float = 0.0,
                  standardize: bool = True, layer_ids: list[int] | None = None, layerwise_loop: bool = False,
                  progress: bool = False) -> FlowNIBResult:
    """Train the FlowNIB critics of all layers at once and return their information-plane data.

    x [N, Dx] pooled embedding output, z [L, N, Dz] pooled layer outputs, y [N] class ids (one-
    hot encoded; ``num_classes=None`` treats y as a continuous regression target). Rows are split
    into train / validation (``heldout_fraction``) / test (``test_fraction``); x and z are
    standardised with train statistics (d_eff is computed on the raw z). See the module docstring
    for selection, the noisy view and the checks; ``progress=True`` shows a progress bar.
    """
    t0 = time.perf_counter()
    cfg = check_cfg({
        "steps": int(steps), "batch_size": int(batch_size), "delta": float(delta), "estimator": estimator,
        "heldout_fraction": float(heldout_fraction), "test_fraction": float(test_fraction), "seed": int(seed),
        "hidden": int(hidden), "lr": float(lr), "device": str(device), "critic": critic,
        "side_layers": int(side_layers), "pair_layers": int(pair_layers), "embed_dim": int(embed_dim), "tau": tau,
        "ema_momentum": float(ema_momentum), "monitor_batch_size": int(monitor_batch_size or batch_size),
        "eval_batch_size": int(eval_batch_size or max(batch_size, 256)), "record_every": int(record_every),
        "select_every": int(select_every), "noise_std": None if not noise_std else float(noise_std),
        "weight_decay": float(weight_decay), "standardize": bool(standardize),
        "num_classes": None if num_classes is None else int(num_classes),
    })
    xt, zt, yt, discrete = prepare_inputs(x, z, y, num_classes)
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
    tr, va, te = split_three(n, cfg["heldout_fraction"], cfg["test_fraction"], gen)
    cfg["batch_size"] = min(cfg["batch_size"], len(tr))
    mon = torch.randperm(len(va), generator=gen)[: min(cfg["monitor_batch_size"], len(va))]
    if cfg["standardize"]:
        mx, sx = standardizer(xt[tr])
        xt = (xt - mx) / sx
        mz = zt[:, tr].mean(1, keepdim=True)
        sz = zt[:, tr].std(1, unbiased=False, keepdim=True)
        zt = (zt - mz) / torch.where(sz > 1e-8, sz, torch.ones_like(sz))
        if not discrete:
            my, sy = standardizer(yt[tr])
            yt = (yt - my) / sy
    if cfg["noise_std"]:
        # validation/test see one fixed draw of the channel noise (seeded), training a fresh one per step
        fixed = torch.Generator().manual_seed(cfg["seed"] + 3)
        zt = zt.clone()
        held = torch.cat([va, te])
        zt[:, held] += cfg["noise_std"] * torch.randn((num_layers, len(held), zt.shape[2]), generator=fixed)
    dev = torch.device(cfg["device"])
    data = {"x_tr": xt[tr].to(dev), "z_tr": zt[:, tr].to(dev), "y_tr": yt[tr].to(dev),
            "x_va": xt[va].to(dev), "z_va": zt[:, va].to(dev), "y_va": yt[va].to(dev),
            "x_te": xt[te].to(dev), "z_te": zt[:, te].to(dev), "y_te": yt[te].to(dev), "monitor": mon.to(dev)}
    wz = torch.as_tensor(d_pr**2, dtype=torch.float32)
    wy = float(d_y**2)
    base = cfg["seed"] * 1_000_003
    seeds_xz = [base + 2 * k for k in range(num_layers)]
    seeds_zy = [base + 2 * k + 1 for k in range(num_layers)]

    t_train = time.perf_counter()
    total = cfg["steps"] * (num_layers if layerwise_loop else 1)
    with progress_bar(total, progress, f"FlowNIB critics ({num_layers} layers)") as bar, flush_denormals():
        if layerwise_loop:
            parts = []
            for k in range(num_layers):
                sub = dict(data, z_tr=data["z_tr"][k:k + 1], z_va=data["z_va"][k:k + 1], z_te=data["z_te"][k:k + 1])
                parts.append(_train_stack(sub, wz[k:k + 1], wy, seeds_xz[k:k + 1], seeds_zy[k:k + 1], cfg, bar))
            out = {key: np.concatenate([p[key] for p in parts], axis=-1)
                   for key in ("ix", "iy", "heldout_ixz", "heldout_izy", "val_ix", "val_iy")}
            out["selection"] = [s for p in parts for s in p["selection"]]
            out["val_steps"] = parts[0]["val_steps"]
        else:
            out = _train_stack(data, wz, wy, seeds_xz, seeds_zy, cfg, bar)
    t_train = time.perf_counter() - t_train

    rec_steps = np.array([t for t in range(cfg["steps"])
                          if (t + 1) % cfg["record_every"] == 0 or t == cfg["steps"] - 1], dtype=np.int64)
    alpha = alpha_schedule(cfg["steps"], cfg["delta"])[rec_steps]
    oic = []
    for k in range(num_layers):
        t_idx, ox, oy, gamma = select_oic(out["ix"][:, k], out["iy"][:, k])
        oic.append({"step": int(rec_steps[t_idx]), "x": ox, "y": oy, "gamma": gamma})
    h_y = entropy_from_labels(yt.argmax(1), yt.shape[1]) if discrete else None
    log_n = math.log(n)
    flags = check_estimates(layers, out["heldout_ixz"], out["heldout_izy"], out["selection"], h_y, log_n)
    cfg["layerwise_loop"] = bool(layerwise_loop)
    cfg["n_train"], cfg["n_val"], cfg["n_test"] = int(len(tr)), int(len(va)), int(len(te))
    cfg["view"] = (f"noisy channel: I(X; Z_l + N(0, {cfg['noise_std']:g}^2 I)), Z_l standardised"
                   if cfg["noise_std"] else "deterministic Z_l: estimates measure critic capacity (true value log N)")
    return FlowNIBResult(layers=layers, steps=rec_steps, ix=out["ix"], iy=out["iy"], alpha=alpha, oic=oic,
                         d_eff_pr=d_pr, d_eff_shannon=d_sh, d_eff_y_pr=float(d_y),
                         heldout_ixz=out["heldout_ixz"], heldout_izy=out["heldout_izy"], config=cfg,
                         wall_time_s=time.perf_counter() - t0,
                         timings={"d_eff_s": t_deff, "critic_training_s": t_train},
                         selection=out["selection"], flags=flags,
                         bounds={"h_y": h_y, "log_n": log_n, "tolerance": 0.05})


def train_flownib_single_layer(x, z_layer, y, num_classes: int | None, **kwargs) -> FlowNIBResult:
    """FlowNIB on one layer's activations z_layer [N, D] (same math as ``train_flownib``)."""
    zt = as_tensor(z_layer, "z_layer")
    if zt.dim() != 2:
        raise DataError(f"z_layer must be [N, D], got shape {tuple(zt.shape)}")
    return train_flownib(x, zt[None], y, num_classes, **kwargs)


__all__ = ["BestState", "as_tensor", "check_cfg", "prepare_inputs", "train_flownib", "train_flownib_single_layer"]
