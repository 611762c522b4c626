"""Conditional mutual information (CMI) math for classifiers: pure functions, no training loop.

Notation. A classifier maps an input x to a distribution P_x over C classes. For a class y the
*centroid* is Q_y = E[P_X | Y=y]. Then

* CMI   = I(X; Y_hat | Y) = E_{(X,Y)} [ KL(P_X || Q_Y) ]             (intra-class concentration)
* Gamma = E[ -sum_i P_X(i) log P_U(i) | Y != V ]                    (inter-class separation:
          the cross-entropy between the outputs of two samples of different classes)
* NCMI  = CMI / Gamma

(Yang et al. 2023, "Conditional Mutual Information Constrained Deep Learning for
Classification"; Ye et al., ICLR 2024, MCMI teachers.)

Numerics. Every function upcasts its input to fp32 (or fp64 for the dev-set diagnostics) and
works with ``log_softmax`` -- never ``log(softmax(...))`` -- so bf16/fp16 autocast outputs or
extreme logits (+-1e4) give finite values and gradients. Centroids are clamped to >= 1e-8 and
renormalised before their log is taken, so a centroid coordinate that is (numerically) zero
never produces log(0).

Input convention. Functions named ``*_loss`` and ``cmi_diagnostics`` take raw logits. The
others take log-probabilities ``[N, C]``; ``conditional_mutual_information`` and ``ncmi`` also
accept logits with ``from_logits=True``. Probabilities themselves are never accepted: taking
their log is exactly the unstable step this module avoids.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from cmiexp.errors import DataError

#: Floor for centroid coordinates before their log is taken.
CENTROID_FLOOR = 1e-8


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def _to_log_probs(x: torch.Tensor, from_logits: bool, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    if x.dim() != 2:
        raise ValueError(f"expected a [N, C] tensor of {'logits' if from_logits else 'log-probabilities'}, got shape {tuple(x.shape)}")
    x = x.to(dtype)
    # log_softmax is idempotent on normalised log-probabilities, so applying it in both cases
    # only renormalises (cheaply) and guarantees rows of valid log-probabilities.
    return F.log_softmax(x, dim=-1)


def _check_labels(labels: torch.Tensor, n: int, num_classes: int) -> torch.Tensor:
    if labels.dim() != 1 or labels.shape[0] != n:
        raise ValueError(f"labels must have shape [{n}], got {tuple(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise DataError(f"CMI needs integer class labels, got dtype {labels.dtype} (regression targets?)")
    return labels.long()


def _validate_label_range(labels: torch.Tensor, num_classes: int) -> None:
    # Costs a device sync; only used by the once-per-evaluation diagnostics.
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        bad = int(labels.min()) if int(labels.min()) < 0 else int(labels.max())
        raise DataError(f"label {bad} is outside the {num_classes} classes 0..{num_classes - 1}")


def log_centroids(centroids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """log Q after clamping every coordinate to >= 1e-8 and renormalising each row.

    Always detached: centroids are constants of the objective, never trained.
    """
    if centroids.dim() != 2 or centroids.shape[0] != centroids.shape[1]:
        raise ValueError(f"centroids must have shape [C, C], got {tuple(centroids.shape)}")
    q = centroids.detach().to(dtype).clamp_min(CENTROID_FLOOR)
    q = q / q.sum(dim=-1, keepdim=True)
    return q.log()


def empirical_centroids(log_probs: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per-class mean of exp(log_probs): [C, C]. Rows of absent classes are uniform (never NaN)."""
    p = log_probs.detach().exp()
    sums = torch.zeros(num_classes, p.shape[1], dtype=p.dtype, device=p.device).index_add_(0, labels, p)
    counts = torch.bincount(labels, minlength=num_classes).to(p.dtype)
    q = sums / counts.clamp_min(1).unsqueeze(1)
    absent = counts == 0
    if bool(absent.any()):
        q[absent] = 1.0 / p.shape[1]
    return q


# --------------------------------------------------------------------------------------------
# CMI
# --------------------------------------------------------------------------------------------
def kl_to_centroids(log_probs: torch.Tensor, labels: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Per-sample KL(P_x || Q_{y_x}) as a [N] fp32 tensor.

    ``log_probs`` [N, C] (any float dtype; upcast to fp32), ``labels`` [N] ints, ``centroids``
    [C, C] (row y = Q_y; treated as constants, no gradient flows into them).
    """
    lp = _to_log_probs(log_probs, from_logits=False)
    labels = _check_labels(labels, lp.shape[0], lp.shape[1])
    if centroids.shape != (lp.shape[1], lp.shape[1]):
        raise ValueError(f"centroids shape {tuple(centroids.shape)} does not match {lp.shape[1]} classes")
    log_q = log_centroids(centroids.to(lp.device), dtype=lp.dtype)[labels]
    # lp is finite (log_softmax of finite numbers), so p * (lp - log_q) is 0 where p underflows.
    return (lp.exp() * (lp - log_q)).sum(dim=-1)


def conditional_mutual_information(
    log_probs_or_logits: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    centroids: torch.Tensor | None = None,
    from_logits: bool = False,
) -> torch.Tensor:
    """Empirical CMI of a set of outputs: (1/N) sum_x KL(P_x || Q_{y_x}), a 0-dim fp32 tensor.

    ``log_probs_or_logits`` [N, C]: log-probabilities, or logits when ``from_logits=True``.
    ``centroids`` [C, C]: when None, Q_y is estimated from this same set (the per-class mean
    of P_x) and is treated as a constant for gradients. Differentiable w.r.t. the input.
    """
    lp = _to_log_probs(log_probs_or_logits, from_logits)
    labels = _check_labels(labels, lp.shape[0], num_classes)
    if lp.shape[1] != num_classes:
        raise ValueError(f"outputs have {lp.shape[1]} classes, num_classes={num_classes}")
    if lp.shape[0] == 0:
        raise DataError("cannot compute CMI of an empty set of outputs")
    if centroids is None:
        centroids = empirical_centroids(lp, labels, num_classes)
    return kl_to_centroids(lp, labels, centroids).mean()


# --------------------------------------------------------------------------------------------
# Separation Gamma
# --------------------------------------------------------------------------------------------
def _clamped(lp: torch.Tensor, prob_clamp: float | None) -> torch.Tensor:
    """log(max(P, prob_clamp)) from log P (None = no clamp): the NCMI reference code takes the log of
    probabilities clamped at 1e-8, which caps every -log P_u at 18.42 on confident outputs."""
    if prob_clamp is None:
        return lp
    if not (0.0 < float(prob_clamp) < 1.0):
        raise ValueError(f"the probability clamp must be in (0, 1), got {prob_clamp}")
    return lp.clamp_min(math.log(float(prob_clamp)))


def _cross_class_sum(lp: torch.Tensor, labels: torch.Tensor, num_classes: int, detach_second: bool,
                     prob_clamp: float | None = None):
    """(sum over ordered cross-class pairs of -sum_i P_x(i) log P_u(i), number of such pairs).

    Uses per-class sums instead of the N x N pair matrix: with S_a = sum_{x in a} P_x and
    L_b = sum_{u in b} log P_u,
        sum_{x in a} sum_{u in b} -sum_i P_x(i) log P_u(i) = -S_a . L_b,
    so the total is -sum_{a != b} (S L^T)_{ab}: O(N*C + C^3) time, O(C^2) memory. The diagonal is
    masked out (not subtracted from the full sum) to avoid cancellation between large sums.
    """
    c = lp.shape[1]
    p = lp.exp()
    second = _clamped(lp.detach() if detach_second else lp, prob_clamp)
    S = torch.zeros(num_classes, c, dtype=lp.dtype, device=lp.device).index_add(0, labels, p)
    L = torch.zeros(num_classes, c, dtype=lp.dtype, device=lp.device).index_add(0, labels, second)
    # An enclosing autocast region would run this matmul in bf16/fp16; keep it in lp's dtype.
    with torch.autocast(device_type=lp.device.type, enabled=False):
        cross = S @ L.T  # [C, C]: (a, b) -> sum_{x in a, u in b} sum_i P_x(i) log P_u(i)
    off = ~torch.eye(num_classes, dtype=torch.bool, device=lp.device)
    total = -(cross * off).sum()
    counts = torch.bincount(labels, minlength=num_classes).to(torch.float64)
    n = counts.sum()
    pairs = n * n - (counts * counts).sum()  # ordered pairs with different labels (on device)
    return total, pairs


def separation(
    log_probs: torch.Tensor,
    labels: torch.Tensor,
    detach_second: bool = True,
    num_classes: int | None = None,
    prob_clamp: float | None = None,
) -> torch.Tensor:
    """Mini-batch Gamma-hat: mean of -sum_i P_x(i) log P_u(i) over all ordered pairs (x, u)
    in the batch with y_x != y_u. A 0-dim fp32 tensor.

    ``detach_second=True`` (the loss version) stops the gradient through log P_u, so only
    the first argument is pushed. A batch whose samples all share one class has no
    cross-class pair: the result is then exactly 0.0 with an all-zero gradient (the sum over
    pairs is empty and the pair count is clamped to 1), i.e. the separation term drops out
    of that step's loss. Deciding this needs no host-device sync. ``prob_clamp`` (e.g. 1e-8, the
    NCMI reference) takes log P_u as log(max(P_u, prob_clamp)); None (our default) uses it unclamped.
    """
    lp = _to_log_probs(log_probs, from_logits=False)
    if num_classes is None:
        num_classes = lp.shape[1]
    labels = _check_labels(labels, lp.shape[0], num_classes)
    total, pairs = _cross_class_sum(lp, labels, num_classes, detach_second, prob_clamp)
    return total / pairs.clamp_min(1).to(lp.dtype)


def ncmi(
    log_probs_or_logits: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    centroids: torch.Tensor | None = None,
    from_logits: bool = False,
    prob_clamp: float | None = None,
) -> torch.Tensor:
    """NCMI = CMI / Gamma of a set of outputs (Gamma over all its ordered cross-class pairs).

    Returns NaN when the set holds a single class (Gamma is then undefined).
    """
    lp = _to_log_probs(log_probs_or_logits, from_logits)
    cmi = conditional_mutual_information(lp, labels, num_classes, centroids)
    total, pairs = _cross_class_sum(lp, _check_labels(labels, lp.shape[0], num_classes), num_classes, False,
                                    prob_clamp)
    gamma = total / pairs.to(lp.dtype)  # 0/0 = NaN for a single-class set
    return cmi / gamma


@torch.no_grad()
def cmi_diagnostics(logits: torch.Tensor, labels: torch.Tensor, num_classes: int,
                    prob_clamp: float | None = None) -> dict[str, float]:
    """CMI, Gamma and NCMI of a whole (dev) set of logits, as python floats.

    Centroids come from the same set; Gamma is over ALL ordered cross-class pairs of the set,
    computed from per-class sums (never an N x N matrix). Computed in float64 so summing
    ~1e5 log-probabilities stays accurate. If the set holds one class, gamma is 0.0 and ncmi
    is NaN.
    """
    lp = _to_log_probs(logits, from_logits=True, dtype=torch.float64)
    labels = _check_labels(labels.to(lp.device), lp.shape[0], num_classes)
    if lp.shape[1] != num_classes:
        raise ValueError(f"logits have {lp.shape[1]} classes, num_classes={num_classes}")
    if lp.shape[0] == 0:
        raise DataError("cannot compute CMI diagnostics of an empty set of outputs")
    _validate_label_range(labels, num_classes)
    q = empirical_centroids(lp, labels, num_classes)
    log_q = log_centroids(q, dtype=torch.float64)[labels]
    cmi = float((lp.exp() * (lp - log_q)).sum(dim=-1).mean())
    total, pairs = _cross_class_sum(lp, labels, num_classes, detach_second=True, prob_clamp=prob_clamp)
    if float(pairs) == 0:
        return {"cmi": cmi, "gamma": 0.0, "ncmi": math.nan}
    gamma = float(total) / float(pairs)
    return {"cmi": cmi, "gamma": gamma, "ncmi": cmi / gamma}


# --------------------------------------------------------------------------------------------
# Per-batch losses
# --------------------------------------------------------------------------------------------
def _parts(as_tensors: bool = False, **vals: torch.Tensor) -> dict[str, float]:
    # as_tensors: detached 0-d tensors, read by the training loop at log time (no host sync per step);
    # otherwise one device sync for all logged scalars instead of one per .item().
    if as_tensors:
        return {k: v.detach().float() for k, v in vals.items()}
    stacked = torch.stack([v.detach().float() for v in vals.values()]).tolist()
    return dict(zip(vals.keys(), stacked))


def cmi_min_loss(
    logits: torch.Tensor, labels: torch.Tensor, centroids: torch.Tensor, lam: float, beta: float,
    gamma_clamp: float | None = None, as_tensors: bool = False,
) -> tuple[torch.Tensor, dict[str, float]]:
    """CMI-constrained loss: CE + lam * mean KL(P_x || Q_y) - beta * Gamma-hat.

    ``logits`` [N, C] (any float dtype, upcast to fp32), ``labels`` [N], ``centroids`` [C, C]
    (constants). Gamma-hat detaches its second argument. Returns (loss, parts) with parts
    {"ce", "kl", "gamma"} as python floats for logging.
    """
    z = logits.float()
    labels = labels.long()
    ce = F.cross_entropy(z, labels)
    lp = F.log_softmax(z, dim=-1)
    kl = kl_to_centroids(lp, labels, centroids).mean()
    gamma = separation(lp, labels, detach_second=True, prob_clamp=gamma_clamp)
    loss = ce + lam * kl - beta * gamma
    return loss, _parts(as_tensors, ce=ce, kl=kl, gamma=gamma)


def mcmi_loss(
    logits: torch.Tensor, labels: torch.Tensor, centroids: torch.Tensor, lam: float, as_tensors: bool = False,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Max-CMI teacher loss: CE - lam * mean KL(P_x || Q_y) (reference lam = 0.15).

    No separation term and no temperature. Bounded below because the centroid floor caps
    KL at -log(1e-8). Returns (loss, parts) with parts {"ce", "kl"} as python floats.
    """
    z = logits.float()
    labels = labels.long()
    ce = F.cross_entropy(z, labels)
    kl = kl_to_centroids(F.log_softmax(z, dim=-1), labels, centroids).mean()
    loss = ce - lam * kl
    return loss, _parts(as_tensors, ce=ce, kl=kl)
