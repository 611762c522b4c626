"""One-call MI estimators: ``estimate_mi`` (neural critic) and ``ba_bound_discrete`` (softmax probe).

Both split the data into a train part (fit the standardisation and the critic/probe) and a
held-out part (report the estimate), so a critic that memorised its training pairs cannot
inflate the number. Everything is deterministic given ``seed``: the split, the batches and the
initialisation come from private generators, and the global torch RNG is left untouched.

Default estimator: SMILE (tau=5) with a separable critic. SMILE trains the critic with the
Jensen-Shannon objective, whose gradients stay bounded (sigmoid-weighted) so training is stable
and low-variance unlike MINE/NWJ, whose exp terms explode; it reads the estimate out with DV,
which unlike InfoNCE is not capped at log(batch); and the clipping of the partition term keeps
the readout's variance bounded, at the price of a downward bias once the MI nears tau (about 5
nats), so pass ``tau=None`` (or a larger tau) for large MI. The separable critic g(x)^T h(y)
scores a whole batch with one matmul, so 300 steps of batch 256 take about a second on a CPU
core; on 5-d Gaussians with 20k samples it lands within ~4% of the truth at 1-2 nats (the
held-out sampling noise alone is ~3%). The concat critic (``critic="concat"``) is more
general but costs O(B^2 * hidden) per step.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from cmiexp.errors import ConfigError, DataError, TrainingDiverged
from cmiexp.mi.bounds import MineEMA, check_estimator, readout, training_objective
from cmiexp.mi.critics import CRITICS, make_stacked_critic

DEFAULTS: dict[str, Any] = {
    "critic": "separable",
    "hidden": 128,
    "side_layers": 1,
    "pair_layers": 0,
    "embed_dim": 64,
    "steps": 300,
    "batch_size": 256,
    "eval_batch_size": 512,
    "lr": 3e-3,
    "lr_schedule": "cosine",  # cosine decay to 0 settles the critic; "constant" keeps lr
    "weight_decay": 0.0,
    "heldout_fraction": 0.3,
    "tau": 5.0,
    "ema_momentum": 0.99,
    "discrete_y": None,  # None: detect from an integer 1-D y
    "num_classes": None,
    "standardize": True,
    "device": "cpu",
}


def as_tensor_2d(a, name: str) -> torch.Tensor:
    """numpy/torch/list -> tensor [n, d] (a 1-D input becomes [n, 1]); keeps integer dtypes."""
    if isinstance(a, torch.Tensor):
        t = a.detach().cpu()
    else:
        try:
            t = torch.as_tensor(np.asarray(a))
        except (TypeError, ValueError) as e:
            raise DataError(f"{name} must be a numeric array, got {type(a).__name__}: {e}") from None
    if t.dim() == 1:
        t = t[:, None]
    if t.dim() != 2:
        raise DataError(f"{name} must be 1-D [n] or 2-D [n, d], got shape {tuple(t.shape)}")
    return t


def _is_integer(t: torch.Tensor) -> bool:
    return not t.is_floating_point() and not t.is_complex()


def one_hot_labels(y: torch.Tensor, num_classes: int | None, name: str = "y") -> tuple[torch.Tensor, int]:
    """Integer labels [n] or [n, 1] -> float one-hot [n, C]; class ids are never used as numbers."""
    y = y.reshape(-1)
    if y.is_floating_point():
        if not torch.all(y == y.round()):
            raise DataError(f"{name} was declared discrete but holds non-integer values")
        y = y.long()
    y = y.long()
    if y.numel() and int(y.min()) < 0:
        raise DataError(f"{name} holds negative class ids (min {int(y.min())}); unlabelled rows must be removed")
    c = int(y.max()) + 1 if num_classes is None else int(num_classes)
    if y.numel() and int(y.max()) >= c:
        raise DataError(f"{name} holds class id {int(y.max())} but num_classes={c}")
    return torch.nn.functional.one_hot(y, c).float(), c


def split_indices(n: int, heldout_fraction: float, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    if not 0.0 < heldout_fraction < 1.0:
        raise ConfigError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
    n_ho = int(round(n * heldout_fraction))
    if n_ho < 2 or n - n_ho < 2:
        raise DataError(f"need at least 2 train and 2 held-out samples; got n={n} with "
                        f"heldout_fraction={heldout_fraction}")
    perm = torch.randperm(n, generator=gen)
    return perm[n_ho:], perm[:n_ho]


def standardizer(train: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-feature mean and std of the train part (constant features get std 1)."""
    mean = train.mean(0)
    std = train.std(0, unbiased=False)
    std = torch.where(std > 1e-8, std, torch.ones_like(std))
    return mean, std


def batch_stream(n: int, batch_size: int, gen: torch.Generator):
    """Endless minibatches of distinct indices (epoch-wise shuffling, no repeats inside a batch:
    a repeated sample would put a positive pair among the off-diagonal negatives)."""
    while True:
        perm = torch.randperm(n, generator=gen)
        for s in range(0, n - batch_size + 1, batch_size):
            yield perm[s:s + batch_size]


def eval_chunks(n: int, eval_batch_size: int) -> list[torch.Tensor]:
    """Split range(n) into nearly equal consecutive chunks of about ``eval_batch_size``."""
    k = max(1, n // max(2, eval_batch_size))
    return [c for c in torch.arange(n).tensor_split(k) if len(c) >= 2]


def _options(options: dict) -> dict:
    unknown = sorted(set(options) - set(DEFAULTS))
    if unknown:
        raise ConfigError(f"unknown estimate_mi option(s) {unknown}; valid: {sorted(DEFAULTS)}")
    opts = {**DEFAULTS, **options}
    if opts["critic"] not in CRITICS:
        raise ConfigError(f"critic={opts['critic']!r} is unknown; choose one of {', '.join(CRITICS)}")
    for key in ("steps", "batch_size", "eval_batch_size", "hidden"):
        if int(opts[key]) < 1:
            raise ConfigError(f"{key} must be >= 1, got {opts[key]}")
    if float(opts["lr"]) <= 0:
        raise ConfigError(f"lr must be > 0, got {opts['lr']}")
    return opts


def prepare_pair(x, y, discrete_y=None, num_classes=None) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Tensors [n, dx] float and [n, dy] float (one-hot if y is discrete) plus the discreteness flag."""
    xt = as_tensor_2d(x, "x")
    yt = as_tensor_2d(y, "y")
    if xt.shape[0] != yt.shape[0]:
        raise DataError(f"x and y must have the same number of rows, got {xt.shape[0]} and {yt.shape[0]}")
    if discrete_y is None:
        discrete_y = _is_integer(yt) and yt.shape[1] == 1
    if discrete_y:
        if yt.shape[1] != 1:
            raise DataError(f"discrete y must be 1-D class ids, got shape {tuple(yt.shape)}")
        yt, _ = one_hot_labels(yt, num_classes)
    xt = xt.float()
    yt = yt.float()
    for name, t in (("x", xt), ("y", yt)):
        if not torch.isfinite(t).all():
            raise DataError(f"{name} contains NaN or infinite values")
    return xt, yt, bool(discrete_y)


def estimate_mi(x, y, estimator: str = "smile", seed: int = 0, **options) -> float:
    """Estimate I(X; Y) in nats with a neural critic, evaluated on held-out pairs.

    ``x``, ``y``: numpy/torch arrays [n, d] or [n] (treated as [n, 1]). An integer 1-D ``y`` (or
    ``discrete_y=True``) is one-hot encoded. ``estimator`` is one of smile (default, see module
    docstring), dv, mine, nwj, infonce. Options (see ``DEFAULTS``): critic ('concat' |
    'separable'), hidden, side_layers, pair_layers, embed_dim, steps, batch_size,
    eval_batch_size, lr, weight_decay, heldout_fraction, tau (SMILE clipping), ema_momentum
    (MINE), discrete_y, num_classes, standardize, device.

    The returned value is the estimator's readout averaged over held-out batches; it can be
    slightly negative for independent variables (finite-sample noise), which is kept visible
    rather than clipped.
    """
    check_estimator(estimator)
    opts = _options(options)
    xt, yt, discrete = prepare_pair(x, y, opts["discrete_y"], opts["num_classes"])
    n = xt.shape[0]
    gen = torch.Generator().manual_seed(int(seed))
    tr, ho = split_indices(n, float(opts["heldout_fraction"]), gen)

    if opts["standardize"]:
        mx, sx = standardizer(xt[tr])
        xt = (xt - mx) / sx
        if not discrete:
            my, sy = standardizer(yt[tr])
            yt = (yt - my) / sy

    device = torch.device(opts["device"])
    x_tr, y_tr = xt[tr].to(device), yt[tr].to(device)
    x_ho, y_ho = xt[ho].to(device), yt[ho].to(device)
    batch = min(int(opts["batch_size"]), len(tr))

    critic = make_stacked_critic(
        opts["critic"], 1, xt.shape[1], yt.shape[1], hidden=int(opts["hidden"]),
        side_layers=int(opts["side_layers"]), pair_layers=int(opts["pair_layers"]),
        embed_dim=int(opts["embed_dim"]), seeds=[int(seed)],
    ).to(device)
    optim = torch.optim.Adam(critic.parameters(), lr=float(opts["lr"]), weight_decay=float(opts["weight_decay"]))
    steps = int(opts["steps"])
    if opts["lr_schedule"] not in ("cosine", "constant"):
        raise ConfigError(f"lr_schedule={opts['lr_schedule']!r} is unknown; choose cosine or constant")
    sched = (torch.optim.lr_scheduler.CosineAnnealingLR(optim, T_max=steps)
             if opts["lr_schedule"] == "cosine" else None)
    ema = MineEMA(float(opts["ema_momentum"])) if estimator == "mine" else None
    tau = opts["tau"]

    stream = batch_stream(len(tr), batch, gen)
    critic.train()
    for step in range(steps):
        idx = next(stream).to(device)
        scores = critic(x_tr[idx], y_tr[idx])[0]
        objective = training_objective(estimator, scores, tau=tau, ema=ema)
        loss = -objective
        if not torch.isfinite(loss):
            raise TrainingDiverged(f"estimate_mi: the {estimator} objective became {loss.item()} at step {step}; "
                                   f"lower lr or use estimator='smile'")
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()
        if sched is not None:
            sched.step()

    critic.eval()
    values = []
    with torch.no_grad():
        for chunk in eval_chunks(len(ho), int(opts["eval_batch_size"])):
            chunk = chunk.to(device)
            scores = critic(x_ho[chunk], y_ho[chunk])[0]
            values.append(float(readout(estimator, scores, tau=tau)))
    return float(np.mean(values))


def entropy_from_labels(labels: torch.Tensor, num_classes: int) -> float:
    """Plug-in entropy (nats) of the label frequencies."""
    counts = torch.bincount(labels.reshape(-1).long(), minlength=num_classes).double()
    p = counts / counts.sum()
    p = p[p > 0]
    return float(-(p * p.log()).sum())


def ba_bound_discrete(z, y, num_classes: int, seed: int = 0, *, heldout_fraction: float = 0.3,
                      steps: int = 300, lr: float = 1e-2, batch_size: int = 512, hidden: int = 0,
                      weight_decay: float = 1e-4, standardize: bool = True, device: str = "cpu") -> float:
    """Barber-Agakov bound I(Z; Y) >= H(Y) - CE(q(y|z)) for discrete Y, in nats.

    A softmax probe q(y|z) (linear if ``hidden=0``, else one hidden layer) is trained on a train
    split; CE is its mean cross-entropy on the held-out split, H(Y) the plug-in entropy of the
    label frequencies. Since CE >= 0 and H(Y) <= log C, the result never exceeds log C; it can
    be negative when the probe generalises worse than the label prior.
    """
    if int(num_classes) < 2:
        raise ConfigError(f"num_classes must be >= 2, got {num_classes}")
    zt = as_tensor_2d(z, "z").float()
    yt = as_tensor_2d(y, "y")
    if yt.shape[1] != 1:
        raise DataError(f"y must be 1-D class ids, got shape {tuple(yt.shape)}")
    if zt.shape[0] != yt.shape[0]:
        raise DataError(f"z and y must have the same number of rows, got {zt.shape[0]} and {yt.shape[0]}")
    labels = one_hot_labels(yt, num_classes)[0].argmax(1)  # validates range
    if not torch.isfinite(zt).all():
        raise DataError("z contains NaN or infinite values")
    gen = torch.Generator().manual_seed(int(seed))
    tr, ho = split_indices(zt.shape[0], heldout_fraction, gen)
    if standardize:
        m, s = standardizer(zt[tr])
        zt = (zt - m) / s
    dev = torch.device(device)
    z_tr, y_tr, z_ho, y_ho = zt[tr].to(dev), labels[tr].to(dev), zt[ho].to(dev), labels[ho].to(dev)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        if hidden:
            probe = torch.nn.Sequential(torch.nn.Linear(zt.shape[1], hidden), torch.nn.ReLU(),
                                        torch.nn.Linear(hidden, num_classes))
        else:
            probe = torch.nn.Linear(zt.shape[1], num_classes)
    probe = probe.to(dev)
    optim = torch.optim.Adam(probe.parameters(), lr=lr, weight_decay=weight_decay)
    stream = batch_stream(len(tr), min(batch_size, len(tr)), gen)
    for _ in range(int(steps)):
        idx = next(stream).to(dev)
        loss = torch.nn.functional.cross_entropy(probe(z_tr[idx]), y_tr[idx])
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()
    with torch.no_grad():
        ce = float(torch.nn.functional.cross_entropy(probe(z_ho), y_ho))
    h_y = entropy_from_labels(labels, num_classes)
    return h_y - ce


__all__ = ["estimate_mi", "ba_bound_discrete", "entropy_from_labels", "DEFAULTS"]
