"""Variational mutual-information bounds as pure functions of a critic score matrix.

Every function takes ``scores`` of shape ``[..., B, B]`` with ``scores[..., i, j] = f(x_i, y_j)``:
the diagonal holds the B positive (joint) pairs and ALL ``B*(B-1)`` off-diagonal entries are used
as negatives (samples of the product of marginals). Leading dimensions are batch dimensions
(for instance one critic per network layer), so every function returns a tensor of shape ``[...]``.
All normalisers are computed with log-sum-exp so that large scores never overflow.

References: Poole et al. 2019 "On Variational Bounds of Mutual Information" (DV, NWJ, InfoNCE,
JS); Belghazi et al. 2018 "MINE" (moving-average gradient correction); Song & Ermon 2020
"Understanding the Limitations of Variational MI Estimators" (SMILE = JS training + clipped-DV
readout).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from cmiexp.errors import ConfigError, DataError


def _check_scores(scores: torch.Tensor) -> int:
    if not isinstance(scores, torch.Tensor):
        raise DataError(f"scores must be a torch.Tensor, got {type(scores).__name__}")
    if scores.dim() < 2 or scores.shape[-1] != scores.shape[-2]:
        raise DataError(f"scores must be a square [..., B, B] matrix, got shape {tuple(scores.shape)}")
    b = scores.shape[-1]
    if b < 2:
        raise DataError(f"scores needs a batch of at least 2 pairs to have negatives, got B={b}")
    return b


def _offdiag_mask(b: int, device) -> torch.Tensor:
    return ~torch.eye(b, dtype=torch.bool, device=device)


def diag_mean(scores: torch.Tensor) -> torch.Tensor:
    """Mean critic value on the positive pairs: (1/B) sum_i f(x_i, y_i)."""
    _check_scores(scores)
    return scores.diagonal(dim1=-2, dim2=-1).mean(-1)


def logmeanexp_offdiag(scores: torch.Tensor) -> torch.Tensor:
    """log( 1/(B(B-1)) * sum_{i != j} exp f(x_i, y_j) ), computed stably."""
    b = _check_scores(scores)
    masked = scores.masked_fill(~_offdiag_mask(b, scores.device), float("-inf"))
    return torch.logsumexp(masked.flatten(-2), dim=-1) - math.log(b * (b - 1))


def dv_bound(scores: torch.Tensor) -> torch.Tensor:
    """Donsker-Varadhan: E_p[f] - log E_q[e^f]."""
    return diag_mean(scores) - logmeanexp_offdiag(scores)


def nwj_bound(scores: torch.Tensor) -> torch.Tensor:
    """Nguyen-Wainwright-Jordan (f-GAN KL): E_p[f] - E_q[e^(f-1)]."""
    return diag_mean(scores) - torch.exp(logmeanexp_offdiag(scores) - 1.0)


def infonce_bound(scores: torch.Tensor) -> torch.Tensor:
    """InfoNCE: mean_i [ f_ii - log( (1/B) sum_j e^(f_ij) ) ]; never exceeds log B.

    Each row's log-sum-exp includes its own positive, so every term is <= 0 before adding log B.
    """
    b = _check_scores(scores)
    pos = scores.diagonal(dim1=-2, dim2=-1)
    return (pos - torch.logsumexp(scores, dim=-1)).mean(-1) + math.log(b)


def js_bound(scores: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon f-GAN objective E_p[-softplus(-f)] - E_q[softplus(f)].

    Not an MI bound itself: it is the low-variance training signal of SMILE, whose optimum
    critic is log p(x,y)/(p(x)p(y)) just like DV's.
    """
    b = _check_scores(scores)
    pos = scores.diagonal(dim1=-2, dim2=-1)
    first = (-F.softplus(-pos)).mean(-1)
    off = _offdiag_mask(b, scores.device)
    second = (F.softplus(scores) * off).sum(dim=(-2, -1)) / (b * (b - 1))
    return first - second


def smile_readout(scores: torch.Tensor, tau: float | None = 5.0) -> torch.Tensor:
    """SMILE estimate: DV with the partition function computed on scores clipped to [-tau, tau].

    The clipping bounds the variance of the exp term (at most e^(2 tau)); it biases the estimate
    down once the true MI approaches tau. ``tau=None`` gives plain DV.
    """
    if tau is None:
        return dv_bound(scores)
    if tau <= 0:
        raise ConfigError(f"tau must be > 0 (or None for no clipping), got {tau}")
    clipped = scores.clamp(-tau, tau)
    return diag_mean(scores) - logmeanexp_offdiag(clipped)


def smile_objective(scores: torch.Tensor, tau: float | None = 5.0) -> torch.Tensor:
    """Value of the SMILE readout, gradient of the JS objective (the training signal)."""
    js = js_bound(scores)
    return js + (smile_readout(scores, tau) - js).detach()


class MineEMA:
    """Bias-corrected exponential moving average of E_q[e^f] for MINE, kept in log space.

    ``update(lme)`` takes the batch log-mean-exp of the negatives and returns the debiased
    log-EMA (like Adam's bias correction: divide by 1 - m^t, so the first step is exact rather
    than shrunk towards the zero initial state). Works elementwise for any tensor shape
    (e.g. one EMA per layer).
    """

    def __init__(self, momentum: float = 0.99):
        if not 0.0 <= momentum < 1.0:
            raise ConfigError(f"ema_momentum must be in [0, 1), got {momentum}")
        self.momentum = float(momentum)
        self.log_ema: torch.Tensor | None = None
        self.steps = 0

    def update(self, log_mean_exp: torch.Tensor) -> torch.Tensor:
        lme = log_mean_exp.detach()
        m = self.momentum
        self.steps += 1
        if m == 0.0:
            self.log_ema = lme
            return lme
        if self.log_ema is None:
            # ema_1 = m * 0 + (1 - m) * x
            self.log_ema = lme + math.log1p(-m)
        else:
            self.log_ema = torch.logaddexp(self.log_ema + math.log(m), lme + math.log1p(-m))
        return self.log_ema - math.log1p(-(m**self.steps))


def mine_objective(scores: torch.Tensor, ema: MineEMA) -> torch.Tensor:
    """MINE: the value is the DV bound; the gradient of the log-partition term is replaced by
    grad(E_q[e^f]) / EMA(E_q[e^f]) (the bias-corrected estimator of Belghazi et al.).

    Updates ``ema`` (call once per training step).
    """
    lme = logmeanexp_offdiag(scores)
    log_ema = ema.update(lme)
    ratio = torch.exp(lme - log_ema)  # batch mean of e^f divided by its moving average
    partition = lme.detach() + (ratio - ratio.detach())
    return diag_mean(scores) - partition


# Estimator name -> (name of the training objective, name of the readout). Used by estimate_mi
# and by the FlowNIB probe so that both speak the same vocabulary.
ESTIMATORS = ("smile", "dv", "mine", "nwj", "infonce")


def check_estimator(name: str, key: str = "estimator") -> str:
    if name not in ESTIMATORS:
        raise ConfigError(f"{key}={name!r} is unknown; choose one of {', '.join(ESTIMATORS)}")
    return name


def training_objective(name: str, scores: torch.Tensor, *, tau: float | None = 5.0,
                       ema: MineEMA | None = None) -> torch.Tensor:
    """The quantity to MAXIMISE when training a critic for estimator ``name``."""
    check_estimator(name)
    if name == "smile":
        return smile_objective(scores, tau)
    if name == "dv":
        return dv_bound(scores)
    if name == "mine":
        if ema is None:
            raise ConfigError("estimator='mine' needs a MineEMA state (ema=...)")
        return mine_objective(scores, ema)
    if name == "nwj":
        return nwj_bound(scores)
    return infonce_bound(scores)


def readout(name: str, scores: torch.Tensor, *, tau: float | None = 5.0) -> torch.Tensor:
    """The MI estimate (nats) reported for estimator ``name`` on a batch of scores."""
    check_estimator(name)
    if name == "smile":
        return smile_readout(scores, tau)
    if name in ("dv", "mine"):
        return dv_bound(scores)
    if name == "nwj":
        return nwj_bound(scores)
    return infonce_bound(scores)
