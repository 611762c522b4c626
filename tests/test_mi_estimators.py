"""Tests of cmiexp.mi: bound formulas against hand computations, estimators against closed-form MI."""

import math

import numpy as np
import pytest
import torch

from cmiexp.errors import CmiexpError, ConfigError, DataError
from cmiexp.mi import (
    ConcatCritic,
    MineEMA,
    SeparableCritic,
    StackedConcatCritic,
    ba_bound_discrete,
    derangement,
    dv_bound,
    estimate_mi,
    infonce_bound,
    js_bound,
    mine_objective,
    nwj_bound,
    shuffled_pairs,
    smile_objective,
    smile_readout,
)

# A fixed critic output: rows index x_i, columns y_j, diagonal = positive pairs.
S3 = [[1.0, 0.2, -0.5],
      [0.3, 2.0, 0.1],
      [-1.0, 0.4, 0.5]]


# the critics are tiny: intra-op threads only add contention on a shared 2-core machine
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _pos_neg(s):
    b = len(s)
    pos = [s[i][i] for i in range(b)]
    neg = [s[i][j] for i in range(b) for j in range(b) if i != j]
    return pos, neg


def softplus(v):
    return math.log1p(math.exp(v))


def gaussian_pair(d, mi, n, seed):
    """x ~ N(0, I_d), y = rho x + sqrt(1 - rho^2) e: I(X;Y) = -(d/2) log(1 - rho^2) = mi."""
    rho = math.sqrt(1.0 - math.exp(-2.0 * mi / d))
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d))
    y = rho * x + math.sqrt(1.0 - rho**2) * rng.standard_normal((n, d))
    return x.astype(np.float32), y.astype(np.float32)


# ----------------------------------------------------------------------------- bound formulas


def test_dv_nwj_infonce_on_2x2_by_hand():
    s = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    # positives both 2, negatives both 0 -> E_q[e^f] = 1
    assert float(dv_bound(s)) == pytest.approx(2.0, abs=1e-6)
    assert float(nwj_bound(s)) == pytest.approx(2.0 - math.exp(-1.0), abs=1e-6)
    # each row: 2 - log(e^2 + e^0), plus log 2
    assert float(infonce_bound(s)) == pytest.approx(2.0 - math.log(math.exp(2.0) + 1.0) + math.log(2.0), abs=1e-6)


def test_dv_nwj_infonce_js_on_3x3_against_explicit_formulas():
    pos, neg = _pos_neg(S3)
    s = torch.tensor(S3, dtype=torch.float64)
    mean_pos = sum(pos) / 3
    dv = mean_pos - math.log(sum(math.exp(v) for v in neg) / 6)
    nwj = mean_pos - sum(math.exp(v - 1.0) for v in neg) / 6
    nce = sum(S3[i][i] - math.log(sum(math.exp(S3[i][j]) for j in range(3)) / 3) for i in range(3)) / 3
    js = sum(-softplus(-v) for v in pos) / 3 - sum(softplus(v) for v in neg) / 6
    assert float(dv_bound(s)) == pytest.approx(dv, abs=1e-12)
    assert float(nwj_bound(s)) == pytest.approx(nwj, abs=1e-12)
    assert float(infonce_bound(s)) == pytest.approx(nce, abs=1e-12)
    assert float(js_bound(s)) == pytest.approx(js, abs=1e-12)


def test_smile_readout_clips_only_the_partition_term():
    s = [[6.0, 7.0, -9.0],
         [0.5, 1.0, 2.0],
         [-8.0, 3.0, 0.0]]
    pos, neg = _pos_neg(s)
    tau = 2.0
    clipped = [min(max(v, -tau), tau) for v in neg]
    expected = sum(pos) / 3 - math.log(sum(math.exp(v) for v in clipped) / 6)
    t = torch.tensor(s, dtype=torch.float64)
    assert float(smile_readout(t, tau=tau)) == pytest.approx(expected, abs=1e-12)
    # tau=None is plain DV
    dv = sum(pos) / 3 - math.log(sum(math.exp(v) for v in neg) / 6)
    assert float(smile_readout(t, tau=None)) == pytest.approx(dv, abs=1e-12)


def test_smile_objective_has_readout_value_and_js_gradient():
    s1 = torch.tensor(S3, dtype=torch.float64, requires_grad=True)
    s2 = torch.tensor(S3, dtype=torch.float64, requires_grad=True)
    v = smile_objective(s1, tau=0.7)
    assert float(v.detach()) == pytest.approx(float(smile_readout(s1.detach(), tau=0.7)), abs=1e-12)
    v.backward()
    js_bound(s2).backward()
    assert torch.allclose(s1.grad, s2.grad)


def test_bounds_are_stable_for_huge_scores():
    s = torch.tensor([[1000.0, 999.0], [998.0, 1000.0]])
    # DV: 1000 - log((e^999 + e^998)/2) = 1 - log((1 + e^-1)/2), no overflow
    assert float(dv_bound(s)) == pytest.approx(1.0 - math.log((1.0 + math.exp(-1.0)) / 2.0), abs=1e-4)
    assert math.isfinite(float(infonce_bound(s)))


@pytest.mark.parametrize("b", [2, 16, 128])
def test_infonce_never_exceeds_log_batch(b):
    g = torch.Generator().manual_seed(b)
    s = torch.randn(b, b, generator=g) + 1e4 * torch.eye(b)
    v = float(infonce_bound(s))
    # in float32 the bound may reach (but not pass) log B rounded to float32
    assert v <= float(torch.tensor(math.log(b), dtype=torch.float32))
    assert v == pytest.approx(math.log(b), abs=1e-4)
    s64 = (torch.randn(b, b, generator=g, dtype=torch.float64) * 30.0) + 1e6 * torch.eye(b, dtype=torch.float64)
    assert float(infonce_bound(s64)) <= math.log(b)


def test_bounds_accept_a_leading_stack_dimension():
    a = torch.tensor(S3)
    b = torch.tensor([[0.0, 1.0, 2.0], [3.0, 4.0, 5.0], [6.0, 7.0, 8.0]])
    stacked = torch.stack([a, b])
    for fn in (dv_bound, nwj_bound, infonce_bound, js_bound):
        out = fn(stacked)
        assert out.shape == (2,)
        assert float(out[0]) == pytest.approx(float(fn(a)), abs=1e-6)
        assert float(out[1]) == pytest.approx(float(fn(b)), abs=1e-6)


def test_mine_value_is_dv_and_gradient_uses_debiased_moving_average():
    m = 0.9
    ema = MineEMA(momentum=m)
    first = torch.tensor([[0.0, 1.0], [2.0, 0.0]], dtype=torch.float64)
    mine_objective(first, ema)  # step 1: debiased EMA = this batch's mean e^f exactly
    ema1 = (math.exp(1.0) + math.exp(2.0)) / 2
    s = torch.tensor(S3, dtype=torch.float64, requires_grad=True)
    v = mine_objective(s, ema)
    assert float(v.detach()) == pytest.approx(float(dv_bound(s.detach())), abs=1e-12)
    v.backward()
    _, neg = _pos_neg(S3)
    batch_mean = sum(math.exp(x) for x in neg) / 6
    # raw EMA after two steps: (1-m) * m * ema1 + (1-m) * batch_mean; debias by 1 - m^2
    debiased = ((1 - m) * m * ema1 + (1 - m) * batch_mean) / (1 - m**2)
    for i in range(3):
        for j in range(3):
            expected = 1.0 / 3 if i == j else -math.exp(S3[i][j]) / (6 * debiased)
            assert float(s.grad[i, j]) == pytest.approx(expected, rel=1e-9)


def test_bad_score_shapes_raise_one_line_errors():
    with pytest.raises(DataError, match="square"):
        dv_bound(torch.zeros(3, 4))
    with pytest.raises(DataError, match="at least 2"):
        dv_bound(torch.zeros(1, 1))
    with pytest.raises(ConfigError, match="tau"):
        smile_readout(torch.zeros(3, 3), tau=-1.0)


# ----------------------------------------------------------------------------- negatives


def test_derangement_has_no_fixed_points_and_is_a_permutation():
    g = torch.Generator().manual_seed(0)
    for n in list(range(2, 40)) + [128, 1000]:
        for _ in range(5):
            p = derangement(n, generator=g)
            assert sorted(p.tolist()) == list(range(n))
            assert all(p[i].item() != i for i in range(n))
    with pytest.raises(ConfigError):
        derangement(1)


def test_shuffled_pairs_never_pairs_a_row_with_itself():
    y = torch.arange(50)[:, None].float()
    out = shuffled_pairs(y, generator=torch.Generator().manual_seed(3))
    assert out.shape == y.shape
    assert not bool((out[:, 0] == y[:, 0]).any())


# ----------------------------------------------------------------------------- critics


def test_concat_critic_matches_an_explicit_pairwise_loop():
    torch.manual_seed(0)
    c = ConcatCritic(3, 2, hidden=8, side_layers=1, seed=5)
    x, y = torch.randn(4, 3), torch.randn(4, 2)
    scores = c(x, y)
    st = c.stacked
    g = lambda v: st.g.weights[1][0].T @ torch.relu(st.g.weights[0][0].T @ v + st.g.biases[0][0]) + st.g.biases[1][0]
    h = lambda v: st.h.weights[1][0].T @ torch.relu(st.h.weights[0][0].T @ v + st.h.biases[0][0]) + st.h.biases[1][0]
    for i in range(4):
        for j in range(4):
            ref = st.w_out[0] @ torch.relu(g(x[i]) + h(y[j])) + st.b_out[0]
            assert float(scores[i, j].detach()) == pytest.approx(float(ref.detach()), abs=1e-5)


def test_separable_critic_is_an_inner_product():
    c = SeparableCritic(3, 2, hidden=8, embed_dim=4, seed=1)
    x, y = torch.randn(5, 3), torch.randn(5, 2)
    with torch.no_grad():
        gx = c.stacked.g(x)[0]
        hy = c.stacked.h(y)[0]
        s = c(x, y)
    for i in range(5):
        for j in range(5):
            assert float(s[i, j]) == pytest.approx(float(gx[i] @ hy[j]), abs=1e-5)


def test_stacked_critic_slices_equal_single_critics_with_the_same_seed():
    stack = StackedConcatCritic(3, 4, 5, hidden=6, seeds=[10, 11, 12])
    x, y = torch.randn(7, 4), torch.randn(3, 7, 5)
    out = stack(x, y)
    for k in range(3):
        single = ConcatCritic(4, 5, hidden=6, seed=10 + k)
        assert torch.allclose(out[k], single(x, y[k]), atol=1e-6)


# ----------------------------------------------------------------------------- estimate_mi


@pytest.mark.parametrize("mi,seed", [(1.0, 0), (2.0, 1)])
def test_estimate_mi_default_recovers_gaussian_mi_within_10_percent(mi, seed):
    x, y = gaussian_pair(5, mi, 5000, seed)
    est = estimate_mi(x, y, seed=seed)
    assert abs(est - mi) <= 0.1 * mi, est


def test_estimate_mi_of_independent_variables_is_near_zero():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((5000, 5)).astype(np.float32)
    y = rng.standard_normal((5000, 5)).astype(np.float32)
    est = estimate_mi(x, y, seed=0)
    assert abs(est) <= 0.05, est


def test_estimate_mi_is_deterministic_and_leaves_global_rng_alone():
    x, y = gaussian_pair(2, 0.5, 2000, 3)
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = estimate_mi(torch.from_numpy(x), torch.from_numpy(y), estimator="smile", seed=4, steps=60, eval_every=20)
    after = torch.rand(1)
    b = estimate_mi(x, y, estimator="smile", seed=4, steps=60, eval_every=20)
    c = estimate_mi(x, y, estimator="smile", seed=5, steps=60, eval_every=20)
    assert a == b
    assert a != c
    assert torch.equal(before, after)
    # auto (which trains a critic to choose) is deterministic too and leaves the RNG alone
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    assert estimate_mi(x, y, seed=4, steps=60) == estimate_mi(x, y, seed=4, steps=60)
    assert torch.equal(before, torch.rand(1))


def test_estimate_mi_one_hot_encodes_integer_labels():
    # y uniform over 4 classes, x a noisy 1-D copy of the class id: I(X;Y) ~ H(Y) = log 4
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, size=8000)
    x = y + 0.05 * rng.standard_normal(8000)
    est = estimate_mi(x, y, seed=0)
    assert abs(est - math.log(4)) < 0.1, est


def test_estimate_mi_other_estimators_run_and_are_finite():
    x, y = gaussian_pair(2, 1.0, 3000, 0)
    for name in ("dv", "mine", "nwj", "infonce"):
        v = estimate_mi(x, y, estimator=name, seed=0, steps=80, batch_size=128, lr=2e-3)
        assert math.isfinite(v)
        assert 0.3 < v < 1.5, (name, v)
    v = estimate_mi(x, y, seed=0, steps=150, critic="concat", hidden=32, batch_size=64, eval_batch_size=128)
    assert 0.6 < v < 1.3, v


def test_estimate_mi_rejects_bad_input():
    x = np.zeros((10, 2))
    with pytest.raises(ConfigError, match="estimator"):
        estimate_mi(x, x, estimator="kraskov")
    with pytest.raises(DataError, match="same number of rows"):
        estimate_mi(x, np.zeros((9, 2)))
    with pytest.raises(ConfigError, match="unknown estimate_mi option"):
        estimate_mi(x, x, step=10)
    with pytest.raises(DataError, match="NaN"):
        estimate_mi(np.full((10, 2), np.nan), x)
    with pytest.raises(CmiexpError):
        estimate_mi(x, np.array([0, 1, -1, 0, 1, 0, 1, 0, 1, 0]))


# ----------------------------------------------------------------------------- Barber-Agakov


def _binary_gaussian_mi(mu):
    """I(Z;Y) for Y uniform on {0,1}, Z|Y ~ N(+-mu, 1): log 2 - E_z[H(Y|z)], by quadrature."""
    z = np.linspace(-mu - 12, mu + 12, 200001)
    dz = z[1] - z[0]
    pdf = lambda m: np.exp(-0.5 * (z - m) ** 2) / math.sqrt(2 * math.pi)
    p_z = 0.5 * pdf(mu) + 0.5 * pdf(-mu)
    q = 0.5 * pdf(mu) / p_z
    q = np.clip(q, 1e-300, 1 - 1e-16)
    h = -(q * np.log(q) + (1 - q) * np.log1p(-q))
    return math.log(2) - float((p_z * h).sum() * dz)


def test_ba_bound_close_to_truth_for_gaussian_classes():
    mu = 1.0
    truth = _binary_gaussian_mi(mu)
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, size=6000)
    z = (2 * y - 1) * mu + rng.standard_normal(6000)
    est = ba_bound_discrete(z, y, 2, seed=0)
    assert est <= math.log(2)
    assert abs(est - truth) < 0.03, (est, truth)


def test_ba_bound_is_at_most_log_c():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 4, size=3000)
    z_sep = np.eye(4)[y] * 5 + 0.1 * rng.standard_normal((3000, 4))
    sep = ba_bound_discrete(z_sep, y, 4, seed=0)
    assert sep <= math.log(4)
    assert sep > math.log(4) - 0.05
    z_noise = rng.standard_normal((3000, 6))
    noise = ba_bound_discrete(z_noise, y, 4, seed=0)
    assert noise <= 0.05
    with pytest.raises(DataError, match="class id"):
        ba_bound_discrete(z_noise, y, 3)
