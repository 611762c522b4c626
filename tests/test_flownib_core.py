"""Tests of the FlowNIB probe core (cmiexp.probes.flownib) on small synthetic tensors."""

import csv
import json
import math

import numpy as np
import pytest
import torch
from scipy.linalg import hadamard

from cmiexp.errors import ConfigError, DataError
from cmiexp.probes.flownib import (
    FlowNIBResult,
    alpha_schedule,
    cls_pool,
    compare_runs,
    effective_dims,
    extract_activations,
    last_token_pool,
    masked_mean_pool,
    participation_ratio,
    plot_information_plane,
    select_oic,
    shannon_effective_dim,
    train_flownib,
    train_flownib_single_layer,
    write_outputs,
)


# the critics are tiny: intra-op threads only add contention on a shared 2-core machine
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _synthetic(n=400, d=6, num_classes=3, seed=0):
    """x Gaussian; layer 1 = noisy x plus a class signal; layer 2 = class signal only; layer 3 = noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, num_classes, (n,), generator=g)
    x = torch.randn(n, d, generator=g)
    c = torch.nn.functional.one_hot(y, d).float() * 3.0
    z1 = 0.7 * x + c + 0.5 * torch.randn(n, d, generator=g)
    z2 = c + 0.5 * torch.randn(n, d, generator=g)
    z3 = torch.randn(n, d, generator=g)
    return x, torch.stack([z1, z2, z3]), y


# ----------------------------------------------------------------------------- effective dimension


def _diag_cov_data(variances, n=16, extra_zero_cols=0):
    """Columns of a Sylvester Hadamard matrix (minus the all-ones one) are zero-mean and
    orthogonal, so the sample covariance is exactly n/(n-1) * diag(variances)."""
    h = hadamard(n).astype(np.float64)
    k = len(variances)
    z = h[:, 1:k + 1] * np.sqrt(np.asarray(variances, dtype=np.float64))
    if extra_zero_cols:
        z = np.concatenate([z, np.zeros((n, extra_zero_cols))], axis=1)
    return z


@pytest.mark.parametrize("extra", [0, 20])  # 20 extra columns: d > n uses the Gram-matrix path
def test_effective_dims_equal_closed_form_on_diagonal_covariance(extra):
    v = [4.0, 1.0, 1.0, 0.25, 0.0625]
    z = _diag_cov_data(v, n=16, extra_zero_cols=extra)
    pr = sum(v) ** 2 / sum(a * a for a in v)
    p = [a / sum(v) for a in v]
    shannon = math.exp(-sum(q * math.log(q) for q in p))
    assert participation_ratio(z) == pytest.approx(pr, rel=1e-9)
    assert shannon_effective_dim(z) == pytest.approx(shannon, rel=1e-7)
    assert effective_dims(z) == (pytest.approx(pr, rel=1e-9), pytest.approx(shannon, rel=1e-7))
    # float32 activations (the cached-tensor case) agree to float32 precision
    pr32, sh32 = effective_dims(torch.from_numpy(z).float())
    assert pr32 == pytest.approx(pr, rel=1e-5) and sh32 == pytest.approx(shannon, rel=1e-5)
    # isotropic k-dim data has d_eff = k under both definitions
    iso = _diag_cov_data([2.0] * 7, n=16)
    assert participation_ratio(iso) == pytest.approx(7.0, rel=1e-9)
    assert shannon_effective_dim(torch.from_numpy(iso)) == pytest.approx(7.0, rel=1e-7)


def test_effective_dim_of_constant_data_is_zero():
    assert participation_ratio(np.ones((5, 3))) == 0.0
    assert shannon_effective_dim(np.ones((5, 3))) == 0.0


# ----------------------------------------------------------------------------- OIC and schedule


def _brute_force_oic(ix, iy):
    rx = max(ix) - min(ix)
    ry = max(iy) - min(iy)
    gamma = 0.5 if rx + ry == 0 else ry / (rx + ry)
    best, best_t = None, None
    for t in range(len(ix)):
        s = gamma * ix[t] + (1 - gamma) * iy[t]
        if best is None or s > best:
            best, best_t = s, t
    return best_t, ix[best_t], iy[best_t], gamma


def test_select_oic_by_hand():
    # R_x = 2, R_y = 2 -> gamma = 0.5; scores 1, 1.5, 1 -> t = 1
    assert select_oic([0.0, 1.0, 2.0], [2.0, 2.0, 0.0]) == (1, 1.0, 2.0, 0.5)


@pytest.mark.parametrize("seed", range(5))
def test_select_oic_equals_brute_force(seed):
    rng = np.random.default_rng(seed)
    ix = np.cumsum(rng.random(50)) * 0.1
    iy = np.sin(np.linspace(0, 3, 50)) + 0.3 * rng.random(50)
    t, x, y, gamma = select_oic(ix, iy)
    bt, bx, by, bg = _brute_force_oic(ix.tolist(), iy.tolist())
    assert (t, x, y) == (bt, bx, by)
    assert gamma == pytest.approx(bg, rel=1e-12)


def test_select_oic_with_flat_trajectory_and_bad_input():
    assert select_oic([0.3] * 4, [0.7] * 4) == (0, 0.3, 0.7, 0.5)
    # only y varies: gamma = 1, so the x value (constant) decides and the first point wins
    assert select_oic([1.0, 1.0], [0.0, 5.0])[3] == 1.0
    with pytest.raises(DataError):
        select_oic([1.0, 2.0], [1.0])
    with pytest.raises(DataError):
        select_oic([1.0, float("nan")], [1.0, 2.0])


def test_alpha_schedule_matches_the_recursion():
    a = alpha_schedule(2000, 0.001)
    ref = [1.0]
    for _ in range(1999):
        ref.append(max(0.0, ref[-1] - 0.001))
    assert a.shape == (2000,)
    assert np.allclose(a, ref, atol=1e-9)
    assert a[0] == 1.0 and a[500] == pytest.approx(0.5) and a[1000] == pytest.approx(0.0, abs=1e-12)
    assert np.all(a[1000:] <= 1e-12) and np.all(a >= 0.0)
    assert np.all(np.diff(a) <= 0)
    with pytest.raises(ConfigError):
        alpha_schedule(0)


# ----------------------------------------------------------------------------- pooling


def _hidden():
    return torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)


def test_pooling_right_padded_batch():
    h = _hidden()
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    mean = masked_mean_pool(h, mask)
    assert torch.allclose(mean[0], (h[0, 0] + h[0, 1] + h[0, 2]) / 3)
    assert torch.allclose(mean[1], (h[1, 0] + h[1, 1]) / 2)
    assert torch.equal(last_token_pool(h, mask), torch.stack([h[0, 2], h[1, 1]]))
    assert torch.equal(cls_pool(h, mask), torch.stack([h[0, 0], h[1, 0]]))


def test_pooling_left_padded_batch():
    h = _hidden()
    mask = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 1]])
    mean = masked_mean_pool(h, mask)
    assert torch.allclose(mean[0], (h[0, 1] + h[0, 2] + h[0, 3]) / 3)
    assert torch.allclose(mean[1], (h[1, 2] + h[1, 3]) / 2)
    assert torch.equal(last_token_pool(h, mask), torch.stack([h[0, 3], h[1, 3]]))
    assert torch.equal(cls_pool(h, mask), torch.stack([h[0, 1], h[1, 2]]))


def test_pooling_rejects_bad_masks():
    h = _hidden()
    with pytest.raises(DataError, match="no tokens"):
        masked_mean_pool(h, torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0]]))
    with pytest.raises(DataError, match="does not match"):
        last_token_pool(h, torch.ones(2, 3))


# ----------------------------------------------------------------------------- activations


def _tiny_bert():
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                     vocab_size=100, num_labels=3)
    torch.manual_seed(0)
    return BertForSequenceClassification(cfg)


def _batches(seqs, labels, batch_size):
    out = []
    for s in range(0, len(seqs), batch_size):
        chunk = seqs[s:s + batch_size]
        width = max(len(q) for q in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for i, q in enumerate(chunk):
            ids[i, :len(q)] = torch.tensor(q)
            mask[i, :len(q)] = 1
        out.append({"input_ids": ids, "attention_mask": mask,
                    "labels": torch.tensor(labels[s:s + batch_size]),
                    "idx": torch.arange(s, s + len(chunk))})
    return out


def test_extract_activations_on_tiny_bert_ignores_padding():
    model = _tiny_bert()
    model.train()
    rng = np.random.default_rng(0)
    seqs = [rng.integers(1, 100, size=k).tolist() for k in (5, 3, 7, 2, 4)]
    labels = [0, 2, 1, 1, 0]
    act = extract_activations(model, _batches(seqs, labels, 2), pooling="mean")
    assert act["x"].shape == (5, 32)
    assert act["z"].shape == (2, 5, 32)
    assert act["y"].tolist() == labels
    assert act["idx"].tolist() == [0, 1, 2, 3, 4]
    assert model.training  # mode restored
    last = extract_activations(model, _batches(seqs, labels, 2), pooling="last")
    model.eval()
    with torch.no_grad():
        for i, q in enumerate(seqs):
            # each example alone, unpadded: a plain mean over all of its tokens
            hs = model(input_ids=torch.tensor([q]), output_hidden_states=True).hidden_states
            assert torch.allclose(act["x"][i], hs[0][0].mean(0), atol=1e-5)
            for layer in (1, 2):
                assert torch.allclose(act["z"][layer - 1, i], hs[layer][0].mean(0), atol=1e-5)
                assert torch.allclose(last["z"][layer - 1, i], hs[layer][0, -1], atol=1e-5)


def test_extract_activations_reports_missing_fields():
    model = _tiny_bert()
    batch = _batches([[1, 2, 3]], [0], 1)[0]
    del batch["idx"]
    with pytest.raises(DataError, match="idx"):
        extract_activations(model, [batch])
    with pytest.raises(ConfigError, match="pooling"):
        extract_activations(model, [batch], pooling="max")


# ----------------------------------------------------------------------------- training


def test_batched_training_equals_one_layer_at_a_time():
    x, z, y = _synthetic(n=300)
    kw = dict(steps=25, batch_size=32, hidden=16, delta=0.02, seed=3, lr=3e-3)
    batched = train_flownib(x, z, y, 3, **kw)
    loop = train_flownib(x, z, y, 3, layerwise_loop=True, **kw)
    single = train_flownib_single_layer(x, z[1], y, 3, **kw)
    assert batched.ix.shape == (25, 3) and batched.iy.shape == (25, 3)
    assert np.allclose(batched.ix, loop.ix, atol=1e-4)
    assert np.allclose(batched.iy, loop.iy, atol=1e-4)
    assert np.allclose(batched.heldout_ixz, loop.heldout_ixz, atol=1e-4)
    assert np.allclose(batched.heldout_izy, loop.heldout_izy, atol=1e-4)
    # a one-layer run of layer 2 has different critic seeds, but the same d_eff
    assert single.d_eff_pr[0] == pytest.approx(batched.d_eff_pr[1], rel=1e-9)
    assert [o["step"] for o in batched.oic] == [o["step"] for o in loop.oic]


def test_training_orders_layers_sensibly():
    x, z, y = _synthetic(n=1200, seed=1)
    r = train_flownib(x, z, y, 3, steps=120, batch_size=64, hidden=32, delta=0.015, seed=0, lr=3e-3,
                      heldout_fraction=0.25)
    assert np.all(np.isfinite(r.ix)) and np.all(np.isfinite(r.iy))
    ixz, izy = r.heldout_ixz, r.heldout_izy
    # layer 1 carries x and the class; layer 2 only the class; layer 3 nothing
    assert ixz[0] > ixz[1] + 0.2 and ixz[0] > ixz[2] + 0.3
    assert izy[0] > izy[2] + 0.5 and izy[1] > izy[2] + 0.5
    assert abs(ixz[2]) < 0.15 and abs(izy[2]) < 0.15
    assert max(izy) < math.log(3) + 0.15  # I(Z;Y) <= H(Y) <= log 3, up to estimation noise
    # d_eff: the noise layer is isotropic in 6 dims, the class-only layer is not
    assert r.d_eff_pr[2] > r.d_eff_pr[1]
    # one-hot Y: float32 inside the probe, float64 here
    assert r.d_eff_y_pr == pytest.approx(participation_ratio(torch.nn.functional.one_hot(y, 3).numpy()), rel=1e-5)


def test_training_is_deterministic_and_supports_other_estimators():
    x, z, y = _synthetic(n=200)
    kw = dict(steps=10, batch_size=32, hidden=8, seed=5)
    a = train_flownib(x, z, y, 3, **kw)
    b = train_flownib(x.numpy(), z.numpy(), y.numpy(), 3, **kw)
    assert np.array_equal(a.ix, b.ix) and np.array_equal(a.iy, b.iy)
    for est in ("smile", "mine", "infonce", "nwj"):
        r = train_flownib(x, z, y, 3, estimator=est, critic="separable", record_every=5, **kw)
        assert r.ix.shape == (2, 3) and list(r.steps) == [4, 9]
        assert np.all(np.isfinite(r.ix)) and np.all(np.isfinite(r.heldout_izy))
    reg = train_flownib(x, z, y.float() * 0.5, None, **kw)  # regression target
    assert reg.d_eff_y_pr == pytest.approx(1.0)
    assert np.all(np.isfinite(reg.iy))


def test_training_rejects_bad_input():
    x, z, y = _synthetic(n=100)
    with pytest.raises(DataError, match="negative class"):
        train_flownib(x, z, torch.where(y == 0, -1, y), 3, steps=2)
    with pytest.raises(ConfigError, match="estimator"):
        train_flownib(x, z, y, 3, steps=2, estimator="kde")
    with pytest.raises(DataError, match="number of examples"):
        train_flownib(x[:50], z, y, 3, steps=2)
    with pytest.raises(DataError, match="single class"):
        train_flownib(x, z, torch.zeros_like(y), 3, steps=2)


# ----------------------------------------------------------------------------- outputs


def test_write_outputs_and_compare_runs(tmp_path):
    x, z, y = _synthetic(n=200)
    r = train_flownib(x, z, y, 3, steps=20, batch_size=32, hidden=8, seed=0, delta=0.05)
    paths = write_outputs(r, tmp_path / "run")
    d = json.loads(paths["json"].read_text())
    assert d["num_layers"] == 3 and len(d["layers"]) == 3
    for k, e in enumerate(d["layers"]):
        assert e["layer"] == k + 1
        assert len(e["trajectory"]["ix"]) == 20 and len(e["trajectory"]["iy"]) == 20
        values = e["trajectory"]["ix"] + e["trajectory"]["iy"] + [e["oic"]["x"], e["oic"]["y"], e["d_eff_pr"],
                                                                    e["heldout"]["ixz"], e["heldout"]["izy"]]
        assert all(math.isfinite(v) for v in values)
        assert e["oic"]["x"] == e["trajectory"]["ix"][e["oic"]["step"]]
    with open(paths["csv"]) as f:
        rows = list(csv.DictReader(f))
    assert [int(row["layer"]) for row in rows] == [1, 2, 3]
    assert all(math.isfinite(float(row["oic_y"])) for row in rows)
    for key in ("information_plane", "deff", "oic"):
        assert paths[key].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_information_plane(d, tmp_path / "plane.png") == 3

    back = FlowNIBResult.from_dict(d)
    assert np.allclose(back.ix, r.ix) and back.layers == [1, 2, 3]
    r2 = train_flownib(x, z[:2], y, 3, steps=15, batch_size=32, hidden=8, seed=1)
    cmp = compare_runs({"bidirectional": r, "unidirectional": r2.to_dict()}, tmp_path / "cmp")
    summary = json.loads(cmp["json"].read_text())
    assert set(summary) == {"bidirectional", "unidirectional"}
    assert len(summary["bidirectional"]) == 3 and len(summary["unidirectional"]) == 2
    assert cmp["information_plane"].read_bytes()[:4] == b"\x89PNG"
    assert cmp["oic"].read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(DataError):
        FlowNIBResult.from_dict({"layers": [{"layer": 1}]})
