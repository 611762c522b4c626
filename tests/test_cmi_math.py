"""CMI / separation / NCMI math, checked against hand-worked values and plain numpy loops."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cmiexp.errors import DataError
from cmiexp.objectives.cmi import (
    cmi_diagnostics,
    cmi_min_loss,
    conditional_mutual_information,
    kl_to_centroids,
    mcmi_loss,
    ncmi,
    separation,
)

# --------------------------------------------------------------------------------------------
# Hand-worked example: 2 classes, 4 samples.
#   x1 (y=0): P = (3/4, 1/4)    x2 (y=0): P = (1/4, 3/4)   => Q_0 = (1/2, 1/2)
#   x3 (y=1): P = (1/2, 1/2)    x4 (y=1): P = (1/2, 1/2)   => Q_1 = (1/2, 1/2)
# KL(x1||Q0) = 3/4 log(3/2) + 1/4 log(1/2) = 3/4 log 3 - log 2 = KL(x2||Q0); KL(x3|x4 || Q1) = 0
#   CMI = 2 (3/4 log 3 - log 2) / 4 = 3/8 log 3 - 1/2 log 2                     ~= 0.0654060
# Ordered cross-class pairs: 8.
#   x in class 0, u in class 1: -sum P_x log(1/2) = log 2 each            (4 pairs) -> 4 log 2
#   x in class 1, u = x1 or x2: -(1/2 log 3/4 + 1/2 log 1/4) = 2 log 2 - 1/2 log 3 (4 pairs)
#   Gamma = (12 log 2 - 2 log 3) / 8 = 3/2 log 2 - 1/4 log 3                 ~= 0.7650677
#   NCMI = CMI / Gamma                                                       ~= 0.0854905
# --------------------------------------------------------------------------------------------
HAND_P = [[0.75, 0.25], [0.25, 0.75], [0.5, 0.5], [0.5, 0.5]]
HAND_Y = [0, 0, 1, 1]
HAND_KL = [0.75 * math.log(3) - math.log(2)] * 2 + [0.0, 0.0]
HAND_CMI = 3 / 8 * math.log(3) - 1 / 2 * math.log(2)
HAND_GAMMA = 3 / 2 * math.log(2) - 1 / 4 * math.log(3)


def _hand():
    lp = torch.tensor(HAND_P, dtype=torch.float64).log()
    return lp, torch.tensor(HAND_Y)


def test_hand_worked_literals_are_consistent():
    # Guard against a typo in the closed forms above.
    assert HAND_CMI == pytest.approx(0.0654060, abs=1e-6)
    assert HAND_GAMMA == pytest.approx(0.7650677, abs=1e-6)
    assert HAND_CMI / HAND_GAMMA == pytest.approx(0.0854905, abs=1e-6)


def test_hand_worked_example():
    lp, y = _hand()
    q = torch.tensor([[0.5, 0.5], [0.5, 0.5]])
    assert kl_to_centroids(lp, y, q).tolist() == pytest.approx(HAND_KL, abs=1e-6)
    assert float(conditional_mutual_information(lp, y, 2)) == pytest.approx(HAND_CMI, abs=1e-6)
    assert float(conditional_mutual_information(lp, y, 2, centroids=q)) == pytest.approx(HAND_CMI, abs=1e-6)
    assert float(separation(lp, y)) == pytest.approx(HAND_GAMMA, abs=1e-6)
    assert float(separation(lp, y, detach_second=False)) == pytest.approx(HAND_GAMMA, abs=1e-6)
    assert float(ncmi(lp, y, 2)) == pytest.approx(HAND_CMI / HAND_GAMMA, abs=1e-6)
    # The diagnostics take logits; log-probabilities are valid logits.
    d = cmi_diagnostics(lp, y, 2)
    assert set(d) == {"cmi", "gamma", "ncmi"}
    assert all(isinstance(v, float) for v in d.values())
    assert d["cmi"] == pytest.approx(HAND_CMI, abs=1e-12)
    assert d["gamma"] == pytest.approx(HAND_GAMMA, abs=1e-12)
    assert d["ncmi"] == pytest.approx(HAND_CMI / HAND_GAMMA, abs=1e-12)
    # Logits shifted by a per-row constant describe the same distributions.
    d2 = cmi_diagnostics(lp + torch.tensor([[3.0], [-7.0], [100.0], [0.5]], dtype=torch.float64), y, 2)
    assert d2["cmi"] == pytest.approx(HAND_CMI, abs=1e-10)
    assert d2["gamma"] == pytest.approx(HAND_GAMMA, abs=1e-10)


# --------------------------------------------------------------------------------------------
# Independent numpy references (double loops, float64)
# --------------------------------------------------------------------------------------------
def _np_softmax(z):
    z = np.asarray(z, dtype=np.float64)
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _np_cmi(p, y, c, q=None):
    n = len(y)
    if q is None:
        q = np.zeros((c, p.shape[1]))
        for k in range(c):
            rows = [p[i] for i in range(n) if y[i] == k]
            q[k] = np.mean(rows, axis=0) if rows else 1.0 / p.shape[1]
    else:
        q = np.maximum(np.asarray(q, dtype=np.float64), 1e-8)
        q = q / q.sum(axis=1, keepdims=True)
    total = 0.0
    for i in range(n):
        for j in range(p.shape[1]):
            total += p[i, j] * (math.log(p[i, j]) - math.log(q[y[i], j]))
    return total / n


def _np_gamma(p, y):
    total, pairs = 0.0, 0
    for i in range(len(y)):
        for u in range(len(y)):
            if y[i] != y[u]:
                total += -sum(p[i, k] * math.log(p[u, k]) for k in range(p.shape[1]))
                pairs += 1
    return total / pairs


def _np_entropy(v):
    return -sum(x * math.log(x) for x in v)


@pytest.mark.parametrize("seed", range(5))
def test_random_cases_against_numpy_double_loop(seed):
    rng = np.random.default_rng(seed)
    n, c = int(rng.integers(6, 20)), int(rng.integers(2, 6))
    z = rng.normal(scale=2.0, size=(n, c))
    y = rng.integers(0, c, size=n)
    y[:2] = [0, 1]  # at least two classes
    p = _np_softmax(z)
    want_cmi, want_gamma = _np_cmi(p, y, c), _np_gamma(p, y)

    # A second independent route: CMI = sum_y p(y) [H(Q_y) - mean_{x in y} H(P_x)].
    alt = 0.0
    for k in range(c):
        rows = p[y == k]
        if len(rows):
            alt += len(rows) / n * (_np_entropy(rows.mean(axis=0)) - np.mean([_np_entropy(r) for r in rows]))
    assert want_cmi == pytest.approx(alt, abs=1e-10)

    zt, yt = torch.tensor(z, dtype=torch.float32), torch.tensor(y)
    lp = F.log_softmax(zt, dim=-1)
    assert float(conditional_mutual_information(zt, yt, c, from_logits=True)) == pytest.approx(want_cmi, abs=1e-6)
    assert float(conditional_mutual_information(lp, yt, c)) == pytest.approx(want_cmi, abs=1e-6)
    assert float(separation(lp, yt)) == pytest.approx(want_gamma, abs=1e-6)
    assert float(ncmi(zt, yt, c, from_logits=True)) == pytest.approx(want_cmi / want_gamma, abs=1e-6)

    # The efficient all-pairs Gamma of the diagnostics (float64) against the double loop.
    d = cmi_diagnostics(torch.tensor(z), yt, c)
    assert d["cmi"] == pytest.approx(want_cmi, abs=1e-9)
    assert d["gamma"] == pytest.approx(want_gamma, abs=1e-9)
    assert d["ncmi"] == pytest.approx(want_cmi / want_gamma, abs=1e-9)

    # Given centroids (with a zero coordinate: clamped to 1e-8 and renormalised).
    q = rng.dirichlet(np.ones(c), size=c)
    q[0, -1] = 0.0
    q[0] /= q[0].sum()
    want_q = _np_cmi(p, y, c, q=q)
    got_q = conditional_mutual_information(zt, yt, c, centroids=torch.tensor(q, dtype=torch.float32), from_logits=True)
    assert float(got_q) == pytest.approx(want_q, rel=1e-5, abs=1e-5)
    per = kl_to_centroids(lp, yt, torch.tensor(q))
    assert per.shape == (n,)
    assert float(per.mean()) == pytest.approx(want_q, rel=1e-5, abs=1e-5)


def test_diagnostics_large_set_against_loop_and_dtypes():
    # bf16 / fp16 logits of a larger set: the diagnostics upcast, so they match the float64
    # loop on the same (rounded) values.
    rng = np.random.default_rng(7)
    n, c = 150, 3
    z16 = torch.tensor(rng.normal(scale=3.0, size=(n, c)), dtype=torch.float32).to(torch.bfloat16)
    y = torch.tensor(rng.integers(0, c, size=n))
    p = _np_softmax(z16.double().numpy())
    d = cmi_diagnostics(z16, y, c)
    assert d["cmi"] == pytest.approx(_np_cmi(p, y.numpy(), c), abs=1e-9)
    assert d["gamma"] == pytest.approx(_np_gamma(p, y.numpy()), abs=1e-9)


def test_losses_stay_fp32_inside_autocast():
    # The loop may compute the loss inside an autocast region; the class-sum matmul of
    # Gamma-hat must not be downcast to bf16 there.
    torch.manual_seed(4)
    z = torch.randn(64, 5) * 3
    y = torch.randint(0, 5, (64,))
    p = _np_softmax(z.numpy())
    want = _np_gamma(p, y.numpy())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = separation(F.log_softmax(z, -1), y)
        loss, parts = cmi_min_loss(z, y, torch.full((5, 5), 0.2), lam=1.0, beta=1.0)
    assert got.dtype == torch.float32 and loss.dtype == torch.float32
    assert float(got) == pytest.approx(want, abs=1e-5)
    assert parts["gamma"] == pytest.approx(want, abs=1e-5)


def test_separation_gradient_detaches_second_argument():
    # Reference: an explicit pair loop in torch where the second argument is detached by hand.
    torch.manual_seed(0)
    z = torch.randn(7, 3)
    y = torch.tensor([0, 1, 2, 0, 1, 1, 2])
    z1 = z.clone().requires_grad_(True)
    separation(F.log_softmax(z1, -1), y, detach_second=True).backward()

    z2 = z.clone().requires_grad_(True)
    lp = F.log_softmax(z2, -1)
    terms = [-(lp[i].exp() * lp[u].detach()).sum() for i in range(7) for u in range(7) if y[i] != y[u]]
    (sum(terms) / len(terms)).backward()
    assert torch.allclose(z1.grad, z2.grad, atol=1e-6)

    z3 = z.clone().requires_grad_(True)
    separation(F.log_softmax(z3, -1), y, detach_second=False).backward()
    assert not torch.allclose(z3.grad, z1.grad, atol=1e-4)  # the undetached version differs


def test_single_class_batch():
    torch.manual_seed(1)
    z = torch.randn(5, 3, requires_grad=True)
    y = torch.zeros(5, dtype=torch.long)
    g = separation(F.log_softmax(z, -1), y)
    assert float(g.detach()) == 0.0
    (gz,) = torch.autograd.grad(g, z)
    assert torch.equal(gz, torch.zeros_like(z))
    loss, parts = cmi_min_loss(z, y, torch.full((3, 3), 1 / 3), lam=0.5, beta=0.3)
    loss.backward()
    assert parts["gamma"] == 0.0
    assert torch.isfinite(z.grad).all()
    d = cmi_diagnostics(z.detach(), y, 3)
    assert d["gamma"] == 0.0 and math.isnan(d["ncmi"]) and math.isfinite(d["cmi"])
    assert math.isnan(float(ncmi(z.detach(), y, 3, from_logits=True)))


def test_bad_labels_raise_clear_errors():
    z = torch.randn(4, 3)
    with pytest.raises(DataError, match="label 3 is outside the 3 classes"):
        cmi_diagnostics(z, torch.tensor([0, 1, 2, 3]), 3)
    with pytest.raises(DataError, match="integer class labels"):
        cmi_diagnostics(z, torch.tensor([0.0, 1.0, 2.0, 0.5]), 3)
    with pytest.raises(DataError, match="empty"):
        cmi_diagnostics(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long), 3)


# --------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------
def test_loss_values_match_their_parts():
    lp, y = _hand()
    q = torch.tensor([[0.5, 0.5], [0.5, 0.5]])
    # CE: x1 puts 3/4 on its label 0, x2 1/4, x3 and x4 1/2 on label 1.
    want_ce = -(math.log(0.75) + math.log(0.25) + 2 * math.log(0.5)) / 4
    loss, parts = cmi_min_loss(lp.float(), y, q, lam=0.5, beta=0.25)
    assert parts["ce"] == pytest.approx(want_ce, abs=1e-6)
    assert parts["kl"] == pytest.approx(HAND_CMI, abs=1e-6)
    assert parts["gamma"] == pytest.approx(HAND_GAMMA, abs=1e-6)
    assert float(loss) == pytest.approx(want_ce + 0.5 * HAND_CMI - 0.25 * HAND_GAMMA, abs=1e-6)
    loss, parts = mcmi_loss(lp.float(), y, q, lam=0.15)
    assert set(parts) == {"ce", "kl"}
    assert float(loss) == pytest.approx(want_ce - 0.15 * HAND_CMI, abs=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_extreme_and_low_precision_logits_are_finite(dtype):
    torch.manual_seed(2)
    sign = torch.randint(0, 2, (6, 4)).float() * 2 - 1
    z = (sign * 1e4).to(dtype).requires_grad_(True)
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    # Centroids with exact zeros and ones: the floor keeps their log finite.
    q = torch.eye(4)
    for fn in (lambda: cmi_min_loss(z, y, q, lam=1.0, beta=0.5), lambda: mcmi_loss(z, y, q, lam=0.15)):
        z.grad = None
        loss, parts = fn()
        assert loss.dtype == torch.float32 and torch.isfinite(loss)
        assert all(math.isfinite(v) for v in parts.values())
        loss.backward()
        assert z.grad.dtype == dtype and torch.isfinite(z.grad.float()).all()
    # Moderate bf16 logits as well (autocast outputs).
    zb = torch.randn(6, 4).to(torch.bfloat16).requires_grad_(True)
    loss, _ = cmi_min_loss(zb, y, torch.full((4, 4), 0.25), lam=1.0, beta=0.5)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(zb.grad.float()).all()
    assert math.isfinite(cmi_diagnostics(z.detach(), y, 4)["cmi"])


def _sgd_step_kl(loss_fn, seed):
    """KL to fixed centroids before and after one SGD step on the logits."""
    torch.manual_seed(seed)
    z = torch.randn(8, 3)
    y = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2])
    q = torch.softmax(torch.randn(3, 3), -1)
    z0 = z.clone().requires_grad_(True)
    loss, _ = loss_fn(z0, y, q)
    loss.backward()
    z1 = z0.detach() - 1e-2 * z0.grad
    before = float(kl_to_centroids(F.log_softmax(z, -1), y, q).mean())
    after = float(kl_to_centroids(F.log_softmax(z1, -1), y, q).mean())
    return before, after


@pytest.mark.parametrize("seed", range(3))
def test_gradient_direction(seed):
    # A huge lambda makes the CE term negligible (CE weight ~ 0 relative to the KL term).
    b, a = _sgd_step_kl(lambda z, y, q: mcmi_loss(z, y, q, lam=1e3), seed)
    assert a > b, "mcmi step should increase KL(P||Q)"
    b, a = _sgd_step_kl(lambda z, y, q: cmi_min_loss(z, y, q, lam=1e3, beta=0.0), seed)
    assert a < b, "cmi_min step should decrease KL(P||Q)"


def test_centroids_receive_no_gradient():
    torch.manual_seed(3)
    z = torch.randn(6, 3, requires_grad=True)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    q = torch.softmax(torch.randn(3, 3), -1).requires_grad_(True)
    for loss, _ in (cmi_min_loss(z, y, q, 1.0, 0.5), mcmi_loss(z, y, q, 0.15)):
        loss.backward()
    assert q.grad is None
    assert z.grad is not None and z.grad.abs().sum() > 0
