"""Parity switches (issue 14, item 4): each place our default differs from a reference implementation has
a switch, and on fixed inputs the switch gives the reference's number (golden values written out here)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from cmiexp.errors import ConfigError
from cmiexp.models.factory import count_parameters
from cmiexp.objectives.centroids import CentroidEstimator
from cmiexp.objectives.cmi import cmi_diagnostics, cmi_min_loss, ncmi, separation
from cmiexp.objectives.cmi_objectives import full_pass_centroids
from cmiexp.data.base import TaskData
from cmiexp.objectives import TrainContext, build_objective
from tests.conftest import compose_config
from tests.test_heads import collate, setup_model


def _fake_accelerator():
    return SimpleNamespace(num_processes=1, process_index=0, reduce=lambda t, op: t, device=torch.device("cpu"))


def _objective(name, **knobs):
    task = TaskData(name="toy", train=None, eval_splits={}, text_fields=("sentence",), label_names=["a", "b", "c"],
                    metrics=["accuracy"], primary_metric="accuracy", is_regression=False)
    ctx = TrainContext(accelerator=_fake_accelerator(), model=None, task=task, cfg=None, run_dir=None)
    base = OmegaConf.to_container(compose_config([f"objective={name}"]).objective)
    base.update(knobs)
    return build_objective(OmegaConf.create({"objective": base}), ctx)


def _step(net, tok, ds):
    """One AdamW step (lr 1e-2) on a batch of 8 training rows."""
    batch, labels = collate(tok, ds, list(range(8)), "right")
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-2)
    net.train()
    F.cross_entropy(net(**batch).logits.float(), labels).backward()
    opt.step()

# ---------------------------------------------------------------------------------------------
# Gamma-hat probability clamp (NCMI reference: log of probabilities clamped at 1e-8)
# ---------------------------------------------------------------------------------------------
# Four rows, two classes. Gamma = mean over the 8 ordered cross-class pairs of -sum_i P_x(i) log P_u(i).
# Confident rows (logit gaps 40, 35, 30, 45): every -log P_u of the wrong class is the gap itself
# (35..45), so unclamped Gamma = (40 + 35 + 30 + 45) / 4 = 37.5; with the clamp every one of them is
# capped at -log(1e-8) = 18.420680743952367 (all gaps exceed it), so Gamma is that cap.
CONFIDENT = [[40.0, 0.0], [35.0, 0.0], [0.0, 30.0], [0.0, 45.0]]
CONFIDENT_GAMMA = 37.5
CONFIDENT_GAMMA_CLAMPED = 18.420680743951934  # = -ln(1e-8), less float rounding of the tiny P_x terms
# A mixed example (one row of class 1 is misclassified): pairs written out with math.exp/log by hand.
MIXED = [[30.0, 0.0], [8.0, 0.0], [0.0, 25.0], [2.0, 0.0]]
MIXED_GAMMA = 11.597065602271192
MIXED_GAMMA_CLAMPED = 8.332560591922904
Y4 = [0, 0, 1, 1]


def _pairs_by_hand(rows, labels, clamp=None) -> float:
    def softmax(z):
        m = max(z)
        e = [math.exp(v - m) for v in z]
        return [v / sum(e) for v in e]

    p = [softmax(r) for r in rows]
    vals = [-sum(p[a][i] * math.log(max(p[b][i], clamp) if clamp else p[b][i]) for i in range(len(rows[0])))
            for a in range(len(rows)) for b in range(len(rows)) if labels[a] != labels[b]]
    return sum(vals) / len(vals)


@pytest.mark.parametrize("rows,gold,gold_clamped", [(CONFIDENT, CONFIDENT_GAMMA, CONFIDENT_GAMMA_CLAMPED),
                                                    (MIXED, MIXED_GAMMA, MIXED_GAMMA_CLAMPED)])
def test_gamma_clamp_reproduces_the_ncmi_reference(rows, gold, gold_clamped):
    assert _pairs_by_hand(rows, Y4) == pytest.approx(gold, rel=1e-12)
    assert _pairs_by_hand(rows, Y4, 1e-8) == pytest.approx(gold_clamped, rel=1e-12)
    z, y = torch.tensor(rows, dtype=torch.float64), torch.tensor(Y4)
    # The dev-set diagnostics (float64) and the mini-batch loss term (fp32), off by default ...
    assert cmi_diagnostics(z, y, 2)["gamma"] == pytest.approx(gold, rel=1e-12)
    assert float(separation(F.log_softmax(z.float(), -1), y)) == pytest.approx(gold, rel=1e-6)
    # ... and with the reference's clamp.
    assert cmi_diagnostics(z, y, 2, prob_clamp=1e-8)["gamma"] == pytest.approx(gold_clamped, rel=1e-12)
    assert float(separation(F.log_softmax(z.float(), -1), y, prob_clamp=1e-8)) == pytest.approx(gold_clamped, rel=1e-6)
    cmi = cmi_diagnostics(z, y, 2)["cmi"]
    assert float(ncmi(z, y, 2, from_logits=True, prob_clamp=1e-8)) == pytest.approx(cmi / gold_clamped, rel=1e-5, abs=1e-8)
    _, parts = cmi_min_loss(z.float(), y, torch.eye(2), lam=0.0, beta=1.0, gamma_clamp=1e-8)
    assert parts["gamma"] == pytest.approx(gold_clamped, rel=1e-6)


def test_gamma_clamp_is_off_by_default_and_checked():
    assert compose_config(["objective=cmi_min"]).objective.gamma_clamp is None
    obj = _objective("cmi_min")
    assert obj.gamma_clamp is None and obj.summary()["gamma_clamp"] is None
    assert _objective("cmi_min", gamma_clamp=1e-8).gamma_clamp == 1e-8
    for bad in (0.0, 1.0, -1e-8):
        with pytest.raises(ConfigError, match=r"objective.gamma_clamp"):
            _objective("cmi_min", gamma_clamp=bad)


# ---------------------------------------------------------------------------------------------
# Centroid full pass: eval mode (ours) vs train mode (ICLRMCMI)
# ---------------------------------------------------------------------------------------------
class _DropoutModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(4, 3)
        self.drop = torch.nn.Dropout(0.5)

    def forward(self, x):
        return type("Out", (), {"logits": self.lin(self.drop(x))})()


def _rows(n=12):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 4, generator=g)
    y = torch.arange(n) % 3
    return x, y, [{"x": x[i], "labels": y[i]} for i in range(n)]


def _class_means(logits, y):
    p = F.softmax(logits.double(), -1)
    return torch.stack([p[y == k].mean(0) for k in range(3)]).float()


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_full_pass_mode_eval_or_train(mode):
    x, y, rows = _rows()
    model = _DropoutModel()
    loader = DataLoader(rows, batch_size=5, shuffle=False)
    model.train(False)
    torch.manual_seed(7)
    got = full_pass_centroids(CentroidEstimator(3), model, loader, _fake_accelerator(), 12, {"x"}, mode=mode).clone()
    assert model.training is False  # the mode the model had before is restored
    # The reference number: the model's own outputs in that mode, with the same dropout draws (seed 7).
    torch.manual_seed(7)
    model.train(mode == "train")
    with torch.no_grad():  # (iterating a DataLoader draws its base seed from the RNG too)
        want = _class_means(torch.cat([model(b["x"]).logits for b in loader]), y)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    with torch.no_grad():
        model.eval()
        eval_means = _class_means(model(x).logits, y)
    assert torch.allclose(got, eval_means, atol=1e-6) == (mode == "eval")  # dropout changes Q_y in train mode


def test_full_pass_mode_config():
    for name in ("cmi_min", "mcmi"):
        assert compose_config([f"objective={name}"]).objective.full_pass_mode is None  # = eval
        assert _objective(name).summary()["full_pass_mode"] == "eval"
        assert _objective(name, full_pass_mode="train").full_pass_mode == "train"
        with pytest.raises(ConfigError, match=r"objective.full_pass_mode='dropout'; valid choices: eval, train"):
            _objective(name, full_pass_mode="dropout")


# ---------------------------------------------------------------------------------------------
# RoCoFT: head restriction, biases, GPT-2 Conv1D (tiny configs: hidden 128, intermediate 256, 2 layers)
# ---------------------------------------------------------------------------------------------
H, FF, LAYERS, C = 128, 256, 2, 2


def test_rocoft_reference_head_and_biases_tiny_bert(cache_dir):
    # Column RoCoFT rank 3 trains 3 * out entries per weight. BERT layer: q, k, v, attn-out 128 -> 128,
    # intermediate 128 -> 256, output 256 -> 128; plus the pooler's dense 128 -> 128 (part of the backbone).
    backbone = LAYERS * (4 * 3 * H + 3 * FF + 3 * H) + 3 * H
    biases = LAYERS * (4 * H + FF + H) + H
    _, _, _, ours, _ = setup_model(cache_dir, "tiny-bert", "pooling", extra=["peft=rocoft"])
    # Ours: no biases; the whole head (pooling head = BertForSequenceClassification.classifier 128 -> 2).
    assert count_parameters(ours)[0] == backbone + (H * C + C) == 6018
    _, _, tok, ref, ds = setup_model(cache_dir, "tiny-bert", "pooling",
                                     extra=["peft=rocoft", "peft.train_bias=true", "peft.head=rocoft"])
    # The reference: biases of every adapted layer, and the head's linear layer restricted too (3 * 2 + bias 2).
    assert count_parameters(ref)[0] == backbone + biases + (3 * C + C) == 7688
    assert ref.rocoft_info["head_modules"] == ["classifier"] and ref.rocoft_info["head"] == "rocoft"
    # The restricted head keeps the original layout in checkpoints.
    assert "classifier.weight" in ref.state_dict() and not any("rocoft" in k for k in ref.state_dict())
    # A training step moves only the head's first 3 input columns (and its bias).
    before = ref.state_dict()["classifier.weight"].clone()
    _step(ref, tok, ds)
    moved = (ref.state_dict()["classifier.weight"] != before).any(0)
    assert moved[:3].all() and not moved[3:].any()


def test_rocoft_gpt2_conv1d_choice(cache_dir):
    _, _, _, ours, _ = setup_model(cache_dir, "tiny-gpt2", "pooling", extra=["peft=rocoft"])
    # Ours: Conv1D restricted like nn.Linear (column: 3 * out per weight) + the head (score 128 -> 2, no bias).
    per_layer = 3 * (3 * H) + 3 * H + 3 * FF + 3 * H
    assert count_parameters(ours)[0] == LAYERS * per_layer + H * C == 5632
    _, _, _, ref, _ = setup_model(cache_dir, "tiny-gpt2", "pooling", extra=["peft=rocoft", "peft.conv1d=full"])
    # The reference leaves every Conv1D (c_attn 128->384, c_proj 128->128, c_fc 128->256, c_proj 256->128)
    # fully trainable, weights and biases.
    full = (H * 3 * H + 3 * H) + (H * H + H) + (H * FF + FF) + (FF * H + H)
    assert count_parameters(ref)[0] == LAYERS * full + H * C == 264192
    assert ref.rocoft_info["modules"] == [] and len(ref.rocoft_info["full_modules"]) == 4 * LAYERS


def test_rocoft_switch_values_are_checked(cache_dir):
    for extra, match in ((["peft.head=half"], r"peft.head='half'; valid choices: full, rocoft"),
                         (["peft.conv1d=frozen"], r"peft.conv1d='frozen'; valid choices: rocoft, full")):
        with pytest.raises(ConfigError, match=match):
            setup_model(cache_dir, "tiny-bert", "pooling", extra=["peft=rocoft", *extra])
    peft = compose_config(["peft=rocoft"]).peft
    assert (peft.head, peft.conv1d, peft.train_bias) == (None, None, False)  # ours: full head, Conv1D restricted


# ---------------------------------------------------------------------------------------------
# EMA centroids: the reference's momentum
# ---------------------------------------------------------------------------------------------
def test_ema_momentum_of_the_reference_on_a_hand_worked_batch():
    # Q_y <- m * Q_y + (1 - m) * (mean of the batch's P_x of class y); class 1 absent keeps its row.
    est = CentroidEstimator(2, mode="ema", momentum=0.9999)
    est.centroids = torch.tensor([[0.5, 0.5], [0.5, 0.5]])
    est.initialized = True
    logits = torch.tensor([[math.log(3.0), 0.0], [math.log(3.0), 0.0]])  # softmax = [0.75, 0.25]
    out = est.ema_update(logits, torch.tensor([0, 0]))
    torch.testing.assert_close(out, torch.tensor([[0.500025, 0.499975], [0.5, 0.5]]), rtol=0, atol=1e-7)
    assert OmegaConf.to_container(compose_config(["objective=cmi_min", "objective.centroids=ema",
                                                  "objective.momentum=0.9999"]).objective)["momentum"] == 0.9999
