"""MI-CoT term (reference and masked ablation) against independent numpy loops; ECE by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cmiexp.metrics import expected_calibration_error
from cmiexp.objectives.cot_mi import mi_loss_masked, mi_loss_reference

# --- independent numpy versions (plain loops) ---------------------------------------------------


def _np_softmax(row: np.ndarray) -> np.ndarray:
    e = np.exp(row - row.max())
    return e / e.sum()


def _np_max_pool_probs(logits: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """[B, T, V] -> [B, V]: element-wise max over (unmasked) positions of the softmax rows."""
    B, T, V = logits.shape
    out = np.full((B, V), -np.inf)
    for b in range(B):
        for t in range(T):
            if mask is not None and not mask[b, t]:
                continue
            p = _np_softmax(logits[b, t])
            for v in range(V):
                out[b, v] = max(out[b, v], p[v])
    return out


def np_reference(pred_logits: np.ndarray, expl_logits: np.ndarray) -> float:
    s = _np_max_pool_probs(pred_logits, None)  # padding included
    e = _np_max_pool_probs(expl_logits, None)
    total = 0.0
    for b in range(s.shape[0]):
        log_soft_e = np.log(_np_softmax(e[b]))  # the second softmax, applied to probabilities
        total += -sum(s[b, v] * log_soft_e[v] for v in range(s.shape[1]))
    return total / s.shape[0]


def np_masked(pred_logits, expl_logits, pred_mask, expl_mask) -> float:
    m_p = _np_max_pool_probs(pred_logits, pred_mask)
    m_e = _np_max_pool_probs(expl_logits, expl_mask)
    total = 0.0
    for b in range(m_p.shape[0]):
        p = m_p[b] / m_p[b].sum()
        r = m_e[b] / m_e[b].sum()
        total += -sum(p[v] * math.log(r[v]) for v in range(len(p)))
    return total / m_p.shape[0]


@pytest.fixture
def logits():
    rng = np.random.default_rng(0)
    pred = rng.normal(scale=2.0, size=(3, 4, 7))  # B=3, Tp=4, V=7
    expl = rng.normal(scale=2.0, size=(3, 6, 7))  # Te=6
    # Padding masks: 1 = real token. Row lengths 4/2/1 (predict) and 6/3/5 (explain).
    pred_mask = np.array([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], dtype=bool)
    expl_mask = np.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]], dtype=bool)
    return pred, expl, pred_mask, expl_mask


# --- reference term ----------------------------------------------------------------------------


def test_reference_closed_form_tiny():
    # V=2. Predict rows softmax to [0.5, 0.5] and [0.75, 0.25]: pooled [0.75, 0.5] (sums to 1.25).
    # Explain logits are all equal, so the pooled explain vector is constant and its second
    # softmax is uniform: loss = 1.25 * log 2.
    pred = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0]]], dtype=torch.float64)
    expl = torch.tensor([[[1.0, 1.0], [-2.0, -2.0], [0.5, 0.5]]], dtype=torch.float64)
    assert mi_loss_reference(pred, expl).item() == pytest.approx(1.25 * math.log(2.0), rel=1e-12)


def test_reference_matches_numpy(logits):
    pred, expl, _, _ = logits
    got = mi_loss_reference(torch.tensor(pred), torch.tensor(expl)).item()
    assert got == pytest.approx(np_reference(pred, expl), rel=1e-10)


def test_reference_pools_over_padding(logits):
    # The public code does not mask: logits at padded positions change the value.
    pred, expl, pred_mask, expl_mask = logits
    before = mi_loss_reference(torch.tensor(pred), torch.tensor(expl)).item()
    expl2 = expl.copy()
    expl2[~expl_mask] = 0.0
    expl2[1, 4, 2] = 25.0  # a confident token at a padded explain position
    after = mi_loss_reference(torch.tensor(pred), torch.tensor(expl2)).item()
    assert after != pytest.approx(before, rel=1e-6)
    assert after == pytest.approx(np_reference(pred, expl2), rel=1e-10)


def test_reference_gradient_reaches_only_explain(logits):
    pred, expl, _, _ = logits
    p = torch.tensor(pred, requires_grad=True)
    e = torch.tensor(expl, requires_grad=True)
    mi_loss_reference(p, e).backward()
    assert p.grad is None or torch.count_nonzero(p.grad) == 0
    assert e.grad is not None and torch.count_nonzero(e.grad) > 0


def test_reference_gradient_numerically(logits):
    # Autograd gradient w.r.t. explain logits vs central differences of the numpy reference.
    pred, expl, _, _ = logits
    e = torch.tensor(expl, requires_grad=True)
    mi_loss_reference(torch.tensor(pred), e).backward()
    h = 1e-6
    for b, t, v in [(0, 0, 0), (0, 5, 3), (1, 2, 6), (2, 4, 1), (1, 5, 5)]:
        up, down = expl.copy(), expl.copy()
        up[b, t, v] += h
        down[b, t, v] -= h
        numeric = (np_reference(pred, up) - np_reference(pred, down)) / (2 * h)
        assert e.grad[b, t, v].item() == pytest.approx(numeric, rel=1e-5, abs=1e-9)


# --- masked ablation ---------------------------------------------------------------------------


def test_masked_matches_numpy(logits):
    pred, expl, pm, em = logits
    got = mi_loss_masked(torch.tensor(pred), torch.tensor(expl), torch.tensor(pm), torch.tensor(em)).item()
    assert got == pytest.approx(np_masked(pred, expl, pm, em), rel=1e-10)


def test_masked_accepts_int_masks(logits):
    pred, expl, pm, em = logits
    a = mi_loss_masked(torch.tensor(pred), torch.tensor(expl), torch.tensor(pm), torch.tensor(em))
    b = mi_loss_masked(
        torch.tensor(pred), torch.tensor(expl), torch.tensor(pm.astype(np.int64)), torch.tensor(em.astype(np.int64))
    )
    assert a.item() == pytest.approx(b.item(), rel=1e-12)


def test_masked_ignores_padding(logits):
    pred, expl, pm, em = logits
    before = mi_loss_masked(torch.tensor(pred), torch.tensor(expl), torch.tensor(pm), torch.tensor(em)).item()
    rng = np.random.default_rng(5)
    pred2, expl2 = pred.copy(), expl.copy()
    pred2[~pm] = rng.normal(scale=30.0, size=int((~pm).sum() * pred.shape[2])).reshape(-1, pred.shape[2])
    expl2[~em] = rng.normal(scale=30.0, size=int((~em).sum() * expl.shape[2])).reshape(-1, expl.shape[2])
    after = mi_loss_masked(torch.tensor(pred2), torch.tensor(expl2), torch.tensor(pm), torch.tensor(em)).item()
    assert after == pytest.approx(before, rel=1e-12)
    # ...while the unmasked reference term does move.
    ref_before = mi_loss_reference(torch.tensor(pred), torch.tensor(expl)).item()
    ref_after = mi_loss_reference(torch.tensor(pred2), torch.tensor(expl2)).item()
    assert ref_after != pytest.approx(ref_before, rel=1e-6)


def test_masked_closed_form_tiny():
    # Predict: one real row [0.75, 0.25] (the second position is padding), so p = [0.75, 0.25].
    # Explain: rows [0.5, 0.5] and [0.25, 0.75] pool to [0.5, 0.75] -> r = [0.4, 0.6].
    # H(p, r) = -(0.75 log 0.4 + 0.25 log 0.6).
    pred = torch.tensor([[[math.log(3.0), 0.0], [0.0, 50.0]]], dtype=torch.float64)
    expl = torch.tensor([[[0.0, 0.0], [0.0, math.log(3.0)]]], dtype=torch.float64)
    got = mi_loss_masked(pred, expl, torch.tensor([[1, 0]]), torch.tensor([[1, 1]])).item()
    assert got == pytest.approx(-(0.75 * math.log(0.4) + 0.25 * math.log(0.6)), rel=1e-12)


def test_masked_gradient_reaches_only_explain(logits):
    pred, expl, pm, em = logits
    p = torch.tensor(pred, requires_grad=True)
    e = torch.tensor(expl, requires_grad=True)
    mi_loss_masked(p, e, torch.tensor(pm), torch.tensor(em)).backward()
    assert p.grad is None or torch.count_nonzero(p.grad) == 0
    assert torch.count_nonzero(e.grad) > 0
    # No gradient flows into padded explain positions.
    assert torch.count_nonzero(e.grad[torch.tensor(~em)]) == 0


def test_masked_finite_for_extreme_logits():
    # float32 probabilities underflow to 0 here; the log-space pooling keeps the value finite.
    pred = torch.tensor([[[0.0, 200.0, -200.0]]])
    expl = torch.tensor([[[-200.0, 200.0, 0.0]]])
    out = mi_loss_masked(pred, expl, torch.ones(1, 1), torch.ones(1, 1))
    assert torch.isfinite(out)
    assert out.item() == pytest.approx(0.0, abs=1e-6)  # both pooled distributions are one-hot on v=1


def test_mask_errors(logits):
    pred, expl, pm, em = logits
    empty = pm.copy()
    empty[2] = False
    with pytest.raises(ValueError, match="no unmasked position"):
        mi_loss_masked(torch.tensor(pred), torch.tensor(expl), torch.tensor(empty), torch.tensor(em))
    with pytest.raises(ValueError, match="mask shape"):
        mi_loss_masked(torch.tensor(pred), torch.tensor(expl), torch.tensor(em), torch.tensor(em))
    with pytest.raises(ValueError, match="vocab sizes differ"):
        mi_loss_reference(torch.zeros(2, 3, 5), torch.zeros(2, 3, 6))


# --- expected calibration error ----------------------------------------------------------------


def test_ece_hand_example():
    # Bins of width 0.1, right-closed: 0.25, 0.25 -> (0.2, 0.3]; 0.35 -> (0.3, 0.4]; 0.75, 0.85, 0.95
    # each alone. Contributions n_k * |acc_k - conf_k|:
    #   (0.2,0.3]: 2 * |0.5 - 0.25| = 0.5; (0.3,0.4]: |1 - 0.35| = 0.65; (0.7,0.8]: |1 - 0.75| = 0.25;
    #   (0.8,0.9]: |0 - 0.85| = 0.85; (0.9,1]: |1 - 0.95| = 0.05. Sum 2.3 over N = 6.
    conf = [0.25, 0.25, 0.35, 0.75, 0.85, 0.95]
    correct = [1, 0, 1, 1, 0, 1]
    assert expected_calibration_error(conf, correct) == pytest.approx(2.3 / 6, rel=1e-12)


def test_ece_bin_edges():
    # 0.5 belongs to (0.4, 0.5] with 0.45: 2 * |1 - 0.475| + |0 - 0.55| = 1.6 over 3.
    assert expected_calibration_error([0.45, 0.5, 0.55], [1, 1, 0]) == pytest.approx(1.6 / 3, rel=1e-12)
    # 0 goes to the first bin, 1 to the last.
    assert expected_calibration_error([0.0, 1.0], [0, 1]) == pytest.approx(0.0, abs=1e-15)
    assert expected_calibration_error([0.0, 1.0], [True, False]) == pytest.approx(1.0, rel=1e-12)
    # Two bins: [0.2, 0.4] -> 2 * |0.5 - 0.3| = 0.4; [0.6, 0.9] -> 2 * |1 - 0.75| = 0.5; 0.9 / 4.
    assert expected_calibration_error([0.2, 0.4, 0.6, 0.9], [0, 1, 1, 1], n_bins=2) == pytest.approx(0.225, rel=1e-12)
    # Perfectly calibrated bin: confidence 0.7, 7 of 10 correct.
    assert expected_calibration_error([0.7] * 10, [1] * 7 + [0] * 3) == pytest.approx(0.0, abs=1e-12)


def test_ece_rejects_bad_input():
    with pytest.raises(ValueError):
        expected_calibration_error([], [])
    with pytest.raises(ValueError):
        expected_calibration_error([0.5, 0.6], [1])
    with pytest.raises(ValueError):
        expected_calibration_error([1.2], [1])
    with pytest.raises(ValueError):
        expected_calibration_error([float("nan")], [1])
    with pytest.raises(ValueError):
        expected_calibration_error([0.5], [2])
