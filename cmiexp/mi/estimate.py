"""One-call MI estimation: ``estimate_mi`` and ``ba_bound_discrete``.

Every estimate is read on data that neither fitted nor selected it. The rows are split three
ways (``val_fraction``, ``test_fraction``, the rest trains):

* train: the critic (or probe, or Gaussian fit) is fitted here;
* validation: model selection: early stopping of the critic (its readout is evaluated every
  ``eval_every`` steps and the best state kept; ``patience`` evaluations without a gain stop
  training), and in ``auto`` mode the choice between the Gaussian-copula model and the critic;
* test: the reported number. A critic fixed before it sees the test pairs gives a DV/NWJ value
  that is a lower bound on the true MI in expectation, so overfitting can lower the estimate
  but never inflate it; picking the best of several critics on the same data would.

Estimators (``estimator=``):

* ``auto`` (default): for a discrete y, ``ba``. Otherwise three density-ratio models are fitted
  on train: the Gaussian of the data, the Gaussian copula (both marginals rank-transformed to
  normal scores; MI is invariant under monotone maps of each coordinate) and a neural critic
  (SMILE-trained, on the normal scores). All three are scored on validation with the
  Jensen-Shannon criterion, which the true log density ratio maximises and which is bounded, so
  the comparison is low-variance even at large MI. The critic is used only when it beats the
  better Gaussian model by more than two standard errors of the paired difference; then the
  larger of its test readout (DV of the critic clipped to +-tau, still a bound) and, in low
  dimension, KSG is reported. Otherwise the Gaussian model's closed form is. Measured on the
  ground-truth suite (``benchmarks/bench_mi.py``; docs/mi.md) this is far more accurate than any
  single estimator: the closed forms are exact for every Gaussian copula at any MI and dimension
  (where critics cannot reach 10 nats from 5000 samples: a distribution-free lower bound needs
  about e^I samples), KSG is the best estimator in low dimension, and the critic takes over where
  dependence goes beyond a Gaussian copula in high dimension.
* ``copula`` / ``gaussian``: the closed-form Gaussian MI of the normal scores / of the raw data
  (see :mod:`cmiexp.mi.closed_form`); ``ksg``: Kraskov's k-nearest-neighbour estimator
  (:mod:`cmiexp.mi.knn`), good in low dimension; ``ba``: H(Y) - CE of a softmax probe, discrete
  y only, never above log C.
* ``smile``, ``dv``, ``mine``, ``nwj``, ``infonce``: a neural critic with that training
  objective and readout (see :mod:`cmiexp.mi.bounds`).

Critic capacity adapts to the input size (``hidden=None``: 4 (dx + dy) clipped to [64, 256]);
the step budget is a maximum, early stopping sets the real one. Everything is deterministic
given ``seed`` (private generators; the global torch RNG is untouched).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from cmiexp.errors import ConfigError, DataError, TrainingDiverged
from cmiexp.mi.bounds import ESTIMATORS as NEURAL_ESTIMATORS
from cmiexp.mi.bounds import MineEMA, readout, training_objective
from cmiexp.mi.closed_form import GaussianCritic, copula_normalize, gaussian_mi
from cmiexp.mi.critics import CRITICS, make_stacked_critic
from cmiexp.mi.knn import ksg_mi
from cmiexp.mi.pairs import (
    as_tensor_2d,
    batch_stream,
    eval_chunks,
    flush_denormals,
    one_hot_labels,
    prepare_pair,
    split_indices,
    split_three,
    standardizer,
)

ESTIMATORS = ("auto", "copula", "gaussian", "ksg", "ba") + NEURAL_ESTIMATORS

DEFAULTS: dict[str, Any] = {
    "critic": "separable",
    "hidden": None,  # None: 4 * (dx + dy) clipped to [64, 256]
    "side_layers": 2,  # measured on the suite: 2 beats 1 (d=20, I=4: bias -0.04 vs -0.45) and 3 (unstable)
    "pair_layers": 0,
    "embed_dim": 64,
    "steps": 4000,  # maximum; early stopping on validation ends training sooner
    "eval_every": 50,
    "patience": 6,
    "batch_size": 256,
    "eval_batch_size": 2048,
    "lr": 1e-3,
    "weight_decay": 0.0,
    "val_fraction": 0.2,
    "test_fraction": 0.2,
    "tau": 5.0,  # SMILE clip of the partition term (estimator='smile' only); None = plain DV
    "ema_momentum": 0.99,
    "marginals": "copula",  # copula (normal scores) | standardize | none: the critic's inputs
    "ksg_k": 5,
    "ksg_max_dim": 6,  # auto: KSG competes with the critic only up to this many dimensions (dx + dy)
    "discrete_y": None,  # None: detect from an integer 1-D y
    "num_classes": None,
    "ci": None,  # e.g. 0.95: percentile bootstrap interval over the rows the estimate is read on
    "bootstrap": 200,
    "details": False,  # True: return an MIEstimate (value, estimator used, interval, diagnostics)
    "device": "cpu",
}


@dataclass
class MIEstimate:
    """An MI estimate in nats with how it was obtained. ``float(est)`` is the value."""

    value: float
    estimator: str  # the estimator that produced the value (auto resolves to one)
    ci: tuple[float, float] | None = None
    ci_level: float | None = None
    n_train: int = 0
    n_val: int = 0
    n_test: int = 0
    steps: int = 0  # critic steps actually run (early stopping)
    best_step: int = 0
    seconds: float = 0.0
    diagnostics: dict = field(default_factory=dict)

    def __float__(self) -> float:
        return float(self.value)


def _options(options: dict) -> dict:
    unknown = sorted(set(options) - set(DEFAULTS))
    if unknown:
        raise ConfigError(f"unknown estimate_mi option(s) {unknown}; valid: {sorted(DEFAULTS)}")
    opts = {**DEFAULTS, **options}
    if opts["critic"] not in CRITICS:
        raise ConfigError(f"critic={opts['critic']!r} is unknown; choose one of {', '.join(CRITICS)}")
    for key in ("steps", "batch_size", "eval_batch_size", "eval_every", "patience", "ksg_k", "bootstrap"):
        if int(opts[key]) < 1:
            raise ConfigError(f"{key} must be >= 1, got {opts[key]}")
    if opts["hidden"] is not None and int(opts["hidden"]) < 1:
        raise ConfigError(f"hidden must be >= 1 or None, got {opts['hidden']}")
    if float(opts["lr"]) <= 0:
        raise ConfigError(f"lr must be > 0, got {opts['lr']}")
    if opts["marginals"] not in ("copula", "standardize", "none"):
        raise ConfigError(f"marginals={opts['marginals']!r} is unknown; choose copula, standardize or none")
    if opts["ci"] is not None and not 0.0 < float(opts["ci"]) < 1.0:
        raise ConfigError(f"ci must be a level in (0, 1) such as 0.95, got {opts['ci']}")
    return opts


def check_mi_estimator(name: str, key: str = "estimator") -> str:
    if name not in ESTIMATORS:
        raise ConfigError(f"{key}={name!r} is unknown; choose one of {', '.join(ESTIMATORS)}")
    return name


def critic_hidden(dx: int, dy: int, hidden: int | None) -> int:
    """The critic width: ``hidden`` if given, else 4 (dx + dy) clipped to [64, 256]."""
    return int(hidden) if hidden is not None else int(min(256, max(64, 4 * (dx + dy))))


# ----------------------------------------------------------------------------- critic readouts


class ConstantCritic(torch.nn.Module):
    """f(x, y) = 0 (the critic of independence; for NWJ, whose optimum constant is 1, f = 1):
    every readout of it is exactly 0."""

    def __init__(self, value: float = 0.0):
        super().__init__()
        self.value = float(value)

    def pair_scores(self, x: torch.Tensor, y: torch.Tensor, block: int = 0) -> torch.Tensor:
        return torch.full((1, x.shape[-2], y.shape[-2]), self.value, device=x.device)


def _score_matrix(critic, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if isinstance(critic, GaussianCritic):
        return critic(x, y)
    return critic.pair_scores(x, y)[0]


class ClippedCritic(torch.nn.Module):
    """clamp(f, -tau, tau) of a critic f: a valid critic whose DV value has bounded variance."""

    def __init__(self, critic, tau: float):
        super().__init__()
        self.critic, self.tau = critic, float(tau)

    def pair_scores(self, x: torch.Tensor, y: torch.Tensor, block: int = 256) -> torch.Tensor:
        return self.critic.pair_scores(x, y).clamp(-self.tau, self.tau)


def _chunked_readout(est: str, critic, x: torch.Tensor, y: torch.Tensor, eval_batch_size: int,
                     tau) -> float:
    """Mean readout over nearly equal chunks of at most ~eval_batch_size rows (all off-diagonal
    pairs of a chunk are its negatives)."""
    vals = []
    with torch.no_grad():
        for chunk in eval_chunks(x.shape[0], eval_batch_size):
            vals.append(float(readout(est, _score_matrix(critic, x[chunk], y[chunk]), tau=tau)))
    return float(np.mean(vals))


def js_rows(scores: torch.Tensor) -> torch.Tensor:
    """Per-row Jensen-Shannon score -softplus(-f_ii) - mean_{j != i} softplus(f_ij); its mean is the
    JS objective, maximised by the true log density ratio (a proper score for critics)."""
    b = scores.shape[-1]
    pos = -F.softplus(-scores.diagonal())
    off = ~torch.eye(b, dtype=torch.bool, device=scores.device)
    neg = (F.softplus(scores) * off).sum(1) / (b - 1)
    return (pos - neg).double()


def _masked_readout(est: str, scores: torch.Tensor, neg_mask: torch.Tensor, tau) -> float:
    """The readout of ``est`` on a bootstrap resample: negatives are the pairs whose rows came
    from different original samples (a resampled duplicate of row i is a positive, not a negative)."""
    pos = scores.diagonal()
    if est == "infonce":
        b = scores.shape[0]
        # row i: its own positive plus its true negatives, normalised by (number of terms)
        masked = scores.masked_fill(~(neg_mask | torch.eye(b, dtype=torch.bool)), float("-inf"))
        terms = neg_mask.sum(1) + 1
        return float((pos - torch.logsumexp(masked, 1) + terms.log()).mean())
    s = scores.clamp(-tau, tau) if (est == "smile" and tau is not None) else scores
    lme = torch.logsumexp(s[neg_mask], 0) - math.log(int(neg_mask.sum()))
    if est == "nwj":
        return float(pos.mean() - torch.exp(lme - 1.0))
    return float(pos.mean() - lme)


def _bootstrap_readout(est: str, scores: torch.Tensor, level: float, reps: int, tau, seed: int):
    gen = torch.Generator().manual_seed(seed + 7919)
    n = scores.shape[0]
    vals = []
    for _ in range(reps):
        idx = torch.randint(0, n, (n,), generator=gen)
        vals.append(_masked_readout(est, scores[idx][:, idx], idx[:, None] != idx[None, :], tau))
    lo, hi = np.quantile(vals, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


# ----------------------------------------------------------------------------- critic training


class EarlyStopping:
    """Model selection on validation: keeps a copy of ``module``'s state at its best score (higher
    is better) and says when ``patience`` evaluations in a row brought no gain over ``min_gain``.

    ``baseline`` is the score to beat: 0.0 for MI critics (the constant critic's exact value), so
    ``restore()`` returns False when no trained state beat it; -inf for probes."""

    def __init__(self, module: torch.nn.Module, patience: int, baseline: float, min_gain: float):
        self.module, self.patience, self.min_gain = module, int(patience), float(min_gain)
        self.best, self.best_step, self.bad, self.state = float(baseline), 0, 0, None

    def update(self, score: float, step: int) -> bool:
        """Record one validation score; True means stop."""
        if score > self.best + self.min_gain:
            self.best, self.best_step, self.bad = float(score), int(step), 0
            self.state = copy.deepcopy(self.module.state_dict())
            return False
        self.bad += 1
        return self.bad >= self.patience

    def restore(self) -> bool:
        """Load the best state into the module; False if none beat the baseline."""
        if self.state is None:
            return False
        self.module.load_state_dict(self.state)
        return True



def fit_critic(est: str, x_tr, y_tr, x_val, y_val, opts: dict, seed: int, gen: torch.Generator) -> tuple:
    """Train a critic on (x_tr, y_tr) and keep the state with the best validation readout.

    Returns (critic, info) with info = {steps, best_step, best_val}.
    """
    dx, dy = x_tr.shape[1], y_tr.shape[1]
    critic = make_stacked_critic(
        opts["critic"], 1, dx, dy, hidden=critic_hidden(dx, dy, opts["hidden"]),
        side_layers=int(opts["side_layers"]), pair_layers=int(opts["pair_layers"]),
        embed_dim=int(opts["embed_dim"]), seeds=[int(seed)],
    ).to(x_tr.device)
    optim = torch.optim.Adam(critic.parameters(), lr=float(opts["lr"]), weight_decay=float(opts["weight_decay"]))
    ema = MineEMA(float(opts["ema_momentum"])) if est == "mine" else None
    tau = opts["tau"]
    batch = min(int(opts["batch_size"]), x_tr.shape[0])
    stream = batch_stream(x_tr.shape[0], batch, gen)
    every, patience = int(opts["eval_every"]), int(opts["patience"])
    # The constant critic scores exactly 0 under every readout and is the baseline to beat: if no
    # trained state does better on validation, the estimate is that of the constant, 0 (MI >= 0
    # is certain), not the negative readout of a critic that found nothing.
    stopper = EarlyStopping(critic, patience, baseline=0.0, min_gain=1e-4)
    step = 0
    for step in range(1, int(opts["steps"]) + 1):
        idx = next(stream).to(x_tr.device)
        loss = -training_objective(est, critic(x_tr[idx], y_tr[idx])[0], tau=tau, ema=ema)
        if not torch.isfinite(loss):
            raise TrainingDiverged(f"estimate_mi: the {est} objective became {loss.item()} at step {step}; "
                                   f"lower lr or use estimator='auto'")
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()
        if step % every == 0 or step == int(opts["steps"]):
            val = _chunked_readout(est, critic, x_val, y_val, int(opts["eval_batch_size"]), tau)
            if stopper.update(val, step):
                break
    if not stopper.restore():
        critic = ConstantCritic(1.0 if est == "nwj" else 0.0)
    critic.eval()
    best_val, best_step = stopper.best, stopper.best_step
    return critic, {"steps": step, "best_step": best_step, "best_val": best_val}


# ----------------------------------------------------------------------------- estimate_mi


def _marginal_transform(t: torch.Tensor, how: str, train_idx: torch.Tensor) -> torch.Tensor:
    if how == "copula":
        return torch.from_numpy(copula_normalize(t.numpy())).float()
    if how == "standardize":
        m, s = standardizer(t[train_idx])
        return (t - m) / s
    return t


def _interval(values: list[float], level: float) -> tuple[float, float]:
    lo, hi = np.quantile(values, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def _closed_form(kind: str, xt: torch.Tensor, yt: torch.Tensor, opts: dict, seed: int) -> MIEstimate:
    """gaussian / copula / ksg on all rows (nothing is fitted that could overfit the pairing
    beyond the dx*dy correlations, whose bias is corrected)."""
    xa, ya = xt.double().numpy(), yt.double().numpy()
    if kind == "copula":
        xa, ya = copula_normalize(xa), copula_normalize(ya)
    if kind == "ksg":
        value = ksg_mi(xa, ya, k=int(opts["ksg_k"]), seed=seed)
    else:
        value = gaussian_mi(xa, ya)
    est = MIEstimate(value=float(value), estimator=kind, n_train=len(xa))
    if opts["ci"] is not None:
        if kind == "ksg":
            raise ConfigError("ci is not available for estimator='ksg' (a bootstrap resample repeats rows, "
                              "which breaks nearest-neighbour counts); use several seeds of subsamples instead")
        rng = np.random.default_rng(seed + 7919)
        vals = []
        for _ in range(int(opts["bootstrap"])):
            idx = rng.integers(0, len(xa), len(xa))
            vals.append(gaussian_mi(xa[idx], ya[idx]))
        est.ci, est.ci_level = _interval(vals, float(opts["ci"])), float(opts["ci"])
    return est


def estimate_mi(x, y, estimator: str = "auto", seed: int = 0, **options):
    """Estimate I(X; Y) in nats.

    ``x``, ``y``: numpy/torch arrays [n, d] or [n] (treated as [n, 1]); an integer 1-D ``y`` (or
    ``discrete_y=True``) is a class label. ``estimator``: auto (default) | copula | gaussian |
    ksg | ba | smile | dv | mine | nwj | infonce (see the module docstring). Options: see
    ``DEFAULTS``. Returns a float, or an :class:`MIEstimate` with ``details=True`` or ``ci=``.

    Neural and probe estimates are read on a test split that neither trained nor selected the
    critic, so they are not inflated by overfitting. A value slightly below 0 on independent
    data is sampling noise and is kept visible, not clipped.
    """
    check_mi_estimator(estimator)
    opts = _options(options)
    with flush_denormals():
        result = _estimate(estimator, x, y, opts, seed)
    if opts["details"] or opts["ci"] is not None:
        return result
    return float(result.value)


def _estimate(estimator: str, x, y, opts: dict, seed: int) -> MIEstimate:
    t0 = time.perf_counter()
    xt, yt, discrete = prepare_pair(x, y, opts["discrete_y"], opts["num_classes"])
    if estimator == "auto":
        estimator = "ba" if discrete else "auto"
    if estimator == "ba":
        if not discrete:
            raise ConfigError("estimator='ba' needs a discrete y (integer class ids, or discrete_y=True)")
        result = _ba_estimate(xt, yt.argmax(1), yt.shape[1], opts, seed)
    elif estimator in ("copula", "gaussian", "ksg"):
        result = _closed_form(estimator, xt, yt, opts, seed)
    else:
        result = _critic_estimate(estimator, xt, yt, discrete, opts, seed)
    result.seconds = time.perf_counter() - t0
    return result


def _critic_estimate(estimator: str, xt, yt, discrete: bool, opts: dict, seed: int) -> MIEstimate:
    """A neural critic (``estimator`` in smile/dv/mine/nwj/infonce), or ``auto``: the critic versus
    the Gaussian models, chosen on validation (see the module docstring)."""
    n = xt.shape[0]
    gen = torch.Generator().manual_seed(int(seed))
    tr, va, te = split_three(n, float(opts["val_fraction"]), float(opts["test_fraction"]), gen)
    how = "copula" if estimator == "auto" else opts["marginals"]
    xm = _marginal_transform(xt, how, tr)
    ym = yt if discrete else _marginal_transform(yt, how, tr)
    device = torch.device(opts["device"])
    x_tr, y_tr, x_va, y_va, x_te, y_te = (a.to(device) for a in (xm[tr], ym[tr], xm[va], ym[va], xm[te], ym[te]))
    neural = "smile" if estimator == "auto" else estimator
    critic, info = fit_critic(neural, x_tr, y_tr, x_va, y_va, opts, int(seed), gen)
    tau, read = opts["tau"], neural
    diag = {"critic_best_val": info["best_val"], "marginals": how}
    if estimator == "auto":
        return _auto_choice(critic, info, xt, yt, tr, va, te, x_va, y_va, x_te, y_te, opts, seed, diag)
    with torch.no_grad():
        value = _chunked_readout(read, critic, x_te, y_te, int(opts["eval_batch_size"]), tau)
    res = MIEstimate(value=value, estimator=neural,
                     n_train=len(tr), n_val=len(va), n_test=len(te), steps=info["steps"],
                     best_step=info["best_step"], diagnostics=diag)
    if opts["ci"] is not None:
        with torch.no_grad():
            scores = _score_matrix(critic, x_te, y_te).cpu()
        res.ci = _bootstrap_readout(read, scores, float(opts["ci"]), int(opts["bootstrap"]), tau, int(seed))
        res.ci_level = float(opts["ci"])
    return res


def _js_rows_of(critic, x, y, eval_batch_size: int) -> torch.Tensor:
    rows = []
    with torch.no_grad():
        for chunk in eval_chunks(x.shape[0], eval_batch_size):
            rows.append(js_rows(_score_matrix(critic, x[chunk], y[chunk])).cpu())
    return torch.cat(rows)


def _auto_choice(critic, info, xt, yt, tr, va, te, x_va, y_va, x_te, y_te, opts, seed, diag) -> MIEstimate:
    """``auto`` for a continuous y: choose on validation between the Gaussian models (of the raw
    data and of its normal scores) and the neural critic, by the Jensen-Shannon score; report the
    chosen model's closed form, or, when the critic is significantly better (dependence beyond a
    Gaussian copula), the larger of its test readout and, in low dimension, KSG."""
    eb = int(opts["eval_batch_size"])
    xr, yr = xt.double(), yt.double()
    mx, sx = standardizer(xr[tr])
    my, sy = standardizer(yr[tr])
    xs, ys = (xr - mx) / sx, (yr - my) / sy
    xc, yc = torch.from_numpy(copula_normalize(xr.numpy())), torch.from_numpy(copula_normalize(yr.numpy()))
    models = {"gaussian": (xs, ys), "copula": (xc, yc)}
    js = {}
    for name, (a, b) in models.items():
        js[name] = _js_rows_of(GaussianCritic(a[tr].numpy(), b[tr].numpy()), a[va], b[va], eb)
    js["critic"] = _js_rows_of(critic, x_va, y_va, eb)
    gauss = max(("gaussian", "copula"), key=lambda m: float(js[m].mean()))
    d = (js["critic"] - js[gauss]).numpy()
    gain, se = float(d.mean()), float(d.std(ddof=1) / math.sqrt(len(d)))
    diag.update({f"js_{k}": float(v.mean()) for k, v in js.items()})
    diag.update(js_gain_critic=gain, js_gain_se=se, gaussian_model=gauss)
    common = dict(n_train=len(tr), n_val=len(va), n_test=len(te), steps=info["steps"], best_step=info["best_step"])
    if gain <= 2.0 * se:
        res = _closed_form(gauss, xt, yt, opts, seed)
        res.estimator, res.diagnostics = f"auto:{gauss}", diag
        for k, v in common.items():
            setattr(res, k, v)
        return res
    # The readout is DV of the critic clipped to [-tau, tau] as a whole: a clipped critic is still a
    # critic, so on fresh pairs this stays a lower bound in expectation (SMILE's readout clips only
    # the partition term, which can overshoot at large MI), and its variance is at most e^(2 tau).
    tau = 5.0 if opts["tau"] is None else float(opts["tau"])
    clipped = ClippedCritic(critic, tau)
    with torch.no_grad():
        value = _chunked_readout("dv", clipped, x_te, y_te, eb, None)
    diag["critic_test"] = value
    chosen = "critic"
    if xt.shape[1] + yt.shape[1] <= int(opts["ksg_max_dim"]):
        k = ksg_mi(xt.double().numpy(), yt.double().numpy(), k=int(opts["ksg_k"]), seed=seed)
        diag["ksg"] = k
        if k > value:
            value, chosen = k, "ksg"
    res = MIEstimate(value=float(value), estimator=f"auto:{chosen}", diagnostics=diag, **common)
    if opts["ci"] is not None:
        if chosen == "ksg":
            raise ConfigError("ci is not available when auto resolves to ksg (low-dimensional, non-Gaussian "
                              "dependence); repeat over seeds of subsamples instead")
        with torch.no_grad():
            scores = _score_matrix(clipped, x_te, y_te).cpu()
        res.ci = _bootstrap_readout("dv", scores, float(opts["ci"]), int(opts["bootstrap"]), None, int(seed))
        res.ci_level = float(opts["ci"])
    return res


# ----------------------------------------------------------------------------- Barber-Agakov


def entropy_from_labels(labels: torch.Tensor, num_classes: int) -> float:
    """Plug-in entropy (nats) of the label frequencies."""
    counts = torch.bincount(labels.reshape(-1).long(), minlength=num_classes).double()
    p = counts / counts.sum()
    p = p[p > 0]
    return float(-(p * p.log()).sum())


def fit_probe(z_tr, y_tr, z_va, y_va, num_classes: int, *, hidden: int, lr: float, weight_decay: float,
              batch_size: int, steps: int, eval_every: int, patience: int, seed: int, gen: torch.Generator):
    """A softmax probe q(y|z) (linear if hidden=0) trained with cross-entropy and early-stopped on
    the validation cross-entropy. Returns (probe, info)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        if hidden:
            probe = torch.nn.Sequential(torch.nn.Linear(z_tr.shape[1], hidden), torch.nn.ReLU(),
                                        torch.nn.Linear(hidden, num_classes))
        else:
            probe = torch.nn.Linear(z_tr.shape[1], num_classes)
    probe = probe.to(z_tr.device)
    optim = torch.optim.Adam(probe.parameters(), lr=lr, weight_decay=weight_decay)
    stream = batch_stream(z_tr.shape[0], min(batch_size, z_tr.shape[0]), gen)
    stopper = EarlyStopping(probe, patience, baseline=-math.inf, min_gain=1e-5)  # score: -CE
    step = 0
    for step in range(1, int(steps) + 1):
        idx = next(stream).to(z_tr.device)
        loss = F.cross_entropy(probe(z_tr[idx]), y_tr[idx])
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()
        if step % eval_every == 0 or step == int(steps):
            with torch.no_grad():
                val = -float(F.cross_entropy(probe(z_va), y_va))
            if stopper.update(val, step):
                break
    stopper.restore()
    probe.eval()
    best, best_step = -stopper.best, stopper.best_step
    return probe, {"steps": step, "best_step": best_step, "best_val_ce": best}


def _ba_estimate(zt: torch.Tensor, labels: torch.Tensor, num_classes: int, opts: dict, seed: int) -> MIEstimate:
    gen = torch.Generator().manual_seed(int(seed))
    tr, va, te = split_three(zt.shape[0], float(opts["val_fraction"]), float(opts["test_fraction"]), gen)
    m, s = standardizer(zt[tr])
    zs = (zt - m) / s
    dev = torch.device(opts["device"])
    hidden = critic_hidden(zt.shape[1], num_classes, opts["hidden"])
    probe, info = fit_probe(zs[tr].to(dev), labels[tr].to(dev), zs[va].to(dev), labels[va].to(dev), num_classes,
                            hidden=hidden, lr=float(opts["lr"]), weight_decay=float(opts["weight_decay"]),
                            batch_size=int(opts["batch_size"]), steps=int(opts["steps"]),
                            eval_every=int(opts["eval_every"]), patience=int(opts["patience"]), seed=seed, gen=gen)
    h_y = entropy_from_labels(labels, num_classes)
    with torch.no_grad():
        ce_rows = F.cross_entropy(probe(zs[te].to(dev)), labels[te].to(dev), reduction="none").double().cpu()
    res = MIEstimate(value=h_y - float(ce_rows.mean()), estimator="ba", n_train=len(tr), n_val=len(va),
                     n_test=len(te), steps=info["steps"], best_step=info["best_step"],
                     diagnostics={"h_y": h_y, "test_ce": float(ce_rows.mean())})
    if opts["ci"] is not None:
        rng = np.random.default_rng(seed + 7919)
        ce = ce_rows.numpy()
        vals = [h_y - float(ce[rng.integers(0, len(ce), len(ce))].mean()) for _ in range(int(opts["bootstrap"]))]
        res.ci, res.ci_level = _interval(vals, float(opts["ci"])), float(opts["ci"])
    return res


def ba_bound_discrete(z, y, num_classes: int, seed: int = 0, *, val_fraction: float = 0.2,
                      test_fraction: float = 0.2, steps: int = 2000, lr: float = 1e-2, batch_size: int = 512,
                      hidden: int = 0, weight_decay: float = 1e-4, eval_every: int = 25, patience: int = 8,
                      standardize: bool = True, device: str = "cpu") -> float:
    """Barber-Agakov bound I(Z; Y) >= H(Y) - CE(q(y|z)) for discrete Y, in nats.

    A softmax probe q(y|z) (linear if ``hidden=0``, else one hidden layer) is trained on the train
    split with early stopping on the validation cross-entropy; CE is its mean cross-entropy on the
    untouched test split, H(Y) the plug-in entropy of the labels. Since CE >= 0 and H(Y) <= log C,
    the result never exceeds log C; it can be slightly negative when the probe generalises worse
    than the label prior.
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
    tr, va, te = split_three(zt.shape[0], val_fraction, test_fraction, gen)
    if standardize:
        m, s = standardizer(zt[tr])
        zt = (zt - m) / s
    dev = torch.device(device)
    probe, _ = fit_probe(zt[tr].to(dev), labels[tr].to(dev), zt[va].to(dev), labels[va].to(dev), int(num_classes),
                         hidden=hidden, lr=lr, weight_decay=weight_decay, batch_size=batch_size, steps=steps,
                         eval_every=eval_every, patience=patience, seed=seed, gen=gen)
    with torch.no_grad():
        ce = float(F.cross_entropy(probe(zt[te].to(dev)), labels[te].to(dev)))
    return entropy_from_labels(labels, int(num_classes)) - ce


# kept importable from here for the FlowNIB probe and older callers
__all__ = ["DEFAULTS", "ESTIMATORS", "MIEstimate", "ba_bound_discrete", "check_mi_estimator", "critic_hidden",
           "entropy_from_labels", "estimate_mi", "fit_critic", "fit_probe", "js_rows",
           "as_tensor_2d", "batch_stream", "eval_chunks", "one_hot_labels", "split_indices", "standardizer"]
