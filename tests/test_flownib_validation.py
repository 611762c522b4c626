"""The FlowNIB probe against ground truth and against the bounds of MI.

Synthetic layers with closed-form I(X;Z_l) and I(Z_l;Y) (jointly Gaussian constructions, one layer
independent of everything) check that the probe's test-split estimates are right, ordered and never
negative; the noisy-channel view is checked against its closed form; the self-check flags are tested
on hand-made numbers and on a probe forced to fail; the reference-parity mode's DV value is checked
against a hand computation."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from cmiexp.mi.groundtruth import gaussian_mi_of_cov
from cmiexp.probes.flownib import check_estimates, summary_line, train_flownib, write_outputs
from cmiexp.probes.flownib.outputs import describe
from cmiexp.probes.flownib.reference import ReferenceModel, reference_dv, train_flownib_reference
from cmiexp.probes.flownib.result import trajectory_collapsed


# the critics are tiny: intra-op threads only add contention on a shared 2-core machine
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def linear_gaussian_layers(n: int, seed: int = 0):
    """x ~ N(0, I_6); every quantity is a linear map M of one vector w of independent N(0, 1)
    variables, so each MI is the Gaussian closed form of the covariance M_a M_b^T.

    layer 1: (x0 + 0.5 e, x1 + 0.5 e', e'', e''')  I(X;Z) = log 5
    layer 2: (x0 + e, e', e'', e''')               I(X;Z) = log(2) / 2
    layer 3: independent noise                      I(X;Z) = I(Z;Y) = 0
    y = x0 + x1 + e (continuous)
    """
    dx, d = 6, 4
    m = dx + 3 * d + 1
    w = np.random.default_rng(seed).standard_normal((n, m))

    def rows(spec):
        mat = np.zeros((len(spec), m))
        for r, terms in enumerate(spec):
            for j, c in terms:
                mat[r, j] = c
        return mat

    mx = rows([[(i, 1.0)] for i in range(dx)])
    o1, o2, o3, oy = dx, dx + d, dx + 2 * d, dx + 3 * d
    m1 = rows([[(0, 1.0), (o1, 0.5)], [(1, 1.0), (o1 + 1, 0.5)], [(o1 + 2, 1.0)], [(o1 + 3, 1.0)]])
    m2 = rows([[(0, 1.0), (o2, 1.0)], [(o2 + 1, 1.0)], [(o2 + 2, 1.0)], [(o2 + 3, 1.0)]])
    m3 = rows([[(o3 + i, 1.0)] for i in range(d)])
    my = rows([[(0, 1.0), (1, 1.0), (oy, 1.0)]])

    def mi(a, b):
        s = np.concatenate([a, b])
        return gaussian_mi_of_cov(s @ s.T, len(a))

    truth = [(mi(mx, mz), mi(mz, my)) for mz in (m1, m2, m3)]
    return w @ mx.T, np.stack([w @ mz.T for mz in (m1, m2, m3)]), (w @ my.T)[:, 0], truth


def test_closed_forms_of_the_synthetic_layers():
    *_, truth = linear_gaussian_layers(10)
    assert truth[0][0] == pytest.approx(math.log(5))
    assert truth[1][0] == pytest.approx(0.5 * math.log(2))
    assert truth[2] == (pytest.approx(0.0, abs=1e-12), pytest.approx(0.0, abs=1e-12))
    # I(Z1;Y): y = x0 + x1 + e against z = x + 0.5 e: var y = 3, Cov(z, y) = (1, 1), Var z = 1.25 I
    cov = np.array([[1.25, 0, 1], [0, 1.25, 1], [1, 1, 3]])
    assert truth[0][1] == pytest.approx(gaussian_mi_of_cov(cov, 2))


def test_probe_recovers_known_mi_of_synthetic_layers():
    x, z, y, truth = linear_gaussian_layers(3000)
    r = train_flownib(x, z, y, None, steps=600, delta=1 / 400, hidden=64, record_every=10, seed=0)
    for k, (t_xz, t_zy) in enumerate(truth):
        assert abs(r.heldout_ixz[k] - t_xz) <= 0.15, (k, r.heldout_ixz[k], t_xz)
        assert abs(r.heldout_izy[k] - t_zy) <= 0.15, (k, r.heldout_izy[k], t_zy)
    assert (r.heldout_ixz >= -0.05).all() and (r.heldout_izy >= -0.05).all()
    assert r.heldout_ixz[0] > r.heldout_ixz[1] > r.heldout_ixz[2]
    assert r.heldout_izy[0] > r.heldout_izy[1] > r.heldout_izy[2] - 0.05
    assert r.config["n_train"] + r.config["n_val"] + r.config["n_test"] == 3000
    # no bound is violated by the estimates themselves (trajectory flags are allowed on the noise layer)
    assert not [f for f in r.flags if f["kind"] != "trajectory_collapse"], r.flags
    assert "deterministic" in r.config["view"]


def test_noisy_view_matches_its_closed_form():
    """Z_l = a copy of two coordinates of X is deterministic (true I(X;Z) = log N); with channel noise
    of std s the quantity is finite: I(X; Z + N(0, s^2)) = d/2 log(1 + 1/s^2) for standardised Z."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((3000, 4))
    z = np.stack([x[:, :2], np.stack([x[:, 0], rng.standard_normal(3000)], 1)])
    y = x[:, 0] + rng.standard_normal(3000)
    r = train_flownib(x, z, y, None, steps=500, delta=0.002, hidden=64, record_every=10, seed=0, noise_std=1.0)
    assert r.heldout_ixz[0] == pytest.approx(math.log(2), abs=0.15)
    assert r.heldout_ixz[1] == pytest.approx(0.5 * math.log(2), abs=0.15)
    assert "noisy channel" in r.config["view"]
    assert "noisy view" in describe(r.to_dict())


# ----------------------------------------------------------------------------- self-check


def test_check_estimates_flags_every_bound_violation():
    sel = [{"ixz_peak": 1.0, "ixz_final": 0.95, "izy_peak": 0.4, "izy_final": 0.39},
           {"ixz_peak": 1.0, "ixz_final": 0.30, "izy_peak": 0.2, "izy_final": 0.19},
           {"ixz_peak": 0.1, "ixz_final": 0.05, "izy_peak": 0.0, "izy_final": 0.0}]
    flags = check_estimates([1, 2, 3], [0.9, 9.5, -0.2], [0.3, 0.8, float("nan")], sel, h_y=math.log(2),
                            log_n=math.log(1000))
    kinds = {(f["layer"], f["quantity"], f["kind"]) for f in flags}
    assert kinds == {
        (2, "I(Z;Y)", "above_entropy"),  # 0.8 > ln 2 + 0.05
        (2, "I(X;Z)", "above_log_n"),  # 9.5 > ln 1000 + 0.05
        (2, "I(X;Z)", "trajectory_collapse"),  # 1.0 -> 0.3
        (3, "I(X;Z)", "negative"),
        (3, "I(Z;Y)", "not_finite"),
    }
    assert all(f["message"].startswith(f"layer {f['layer']}: ") for f in flags)
    # within tolerance and small wiggles are not flagged
    assert check_estimates([1], [-0.04], [math.log(2) + 0.04], sel[:1], h_y=math.log(2), log_n=10.0) == []
    assert not trajectory_collapsed(0.05, 0.0) and trajectory_collapsed(1.0, 0.5)


def test_probe_forced_to_fail_is_flagged_in_its_outputs(tmp_path):
    """Tiny data, a huge critic and a high learning rate: the validation readout collapses from its
    peak as the critics memorise their 24 training pairs; the run says so instead of plotting it."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 8))
    z = rng.standard_normal((2, 40, 8))
    y = rng.integers(0, 2, 40)
    r = train_flownib(x, z, y, 2, steps=300, batch_size=24, hidden=512, lr=1e-2, record_every=5, select_every=5,
                      seed=0)
    assert not r.ok and r.flags
    assert "FLAGGED" in summary_line(r)
    write_outputs(r, tmp_path)
    d = json.loads((tmp_path / "flownib.json").read_text())
    assert d["ok"] is False and d["flags"] and any(e["flags"] for e in d["layers"])
    assert (tmp_path / "flownib.csv").read_text().count("trajectory_collapse") + \
        (tmp_path / "flownib.csv").read_text().count("negative") >= 1
    # the estimates themselves never go below 0: the constant critic is each layer's floor
    assert (r.heldout_ixz >= 0).all() and (r.heldout_izy >= 0).all()


# ----------------------------------------------------------------------------- reference parity


def test_reference_dv_by_hand():
    t_pos = torch.tensor([[1.0], [2.0]])
    t_neg = torch.tensor([[0.0], [math.log(3.0)]])
    # m = ln 3; mean(exp(t_neg - m)) = (1/3 + 1) / 2 = 2/3; value = 1.5 - ln 3 - ln(2/3 + 1e-6)
    expected = 1.5 - math.log(3.0) - math.log(2.0 / 3.0 + 1e-6)
    assert float(reference_dv(t_pos, t_neg)) == pytest.approx(expected, abs=1e-6)
    assert expected == pytest.approx(1.5 - math.log(2.0 + 3e-6), abs=1e-12)


def test_reference_model_values_equal_an_explicit_recomputation():
    torch.manual_seed(0)
    model = ReferenceModel(3, 4, 1, hidden=8)
    x, y = torch.randn(6, 3), torch.randint(0, 2, (6, 1)).float()
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        ixz, izy = model.values(x, y, gen)
    g2 = torch.Generator().manual_seed(5)
    pz, py = torch.randperm(6, generator=g2), torch.randperm(6, generator=g2)
    z = torch.relu(model.encoder[0](x))

    def dv(critic, a, b, perm):
        pos = critic.fc3(torch.tanh(critic.fc1(torch.cat([a, b], 1))))
        neg = critic.fc3(torch.tanh(critic.fc1(torch.cat([a, b[perm]], 1))))
        m = neg.max()
        return pos.mean() - (m + torch.log(torch.exp(neg - m).mean() + 1e-6))

    with torch.no_grad():
        assert float(ixz) == pytest.approx(float(dv(model.mine_xz, x, z, pz)), abs=1e-6)
        assert float(izy) == pytest.approx(float(dv(model.mine_zy, z, y, py)), abs=1e-6)


def test_reference_pipeline_runs_and_is_checked_like_any_probe():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((120, 5)).astype(np.float32)
    z = rng.standard_normal((2, 120, 3)).astype(np.float32)
    y = rng.integers(0, 2, 120)
    r = train_flownib_reference(x, z, y, 2, steps=4, batch_size=50, critic_hidden=16, seed=0)
    assert r.ix.shape == (4, 2) and r.iy.shape == (4, 2)
    assert np.allclose(r.heldout_ixz, r.ix[-1]) and r.config["compat"] == "reference"
    assert r.alpha.tolist() == pytest.approx([1.0, 0.999, 0.998, 0.997])
    assert isinstance(r.flags, list) and "reference pipeline" in r.config["view"]
