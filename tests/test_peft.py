"""LoRA and RoCoFT: trainable counts against closed forms written out from the tiny configs' sizes,
only the intended parameters move in a training step, and checkpoints keep the original layout."""

from __future__ import annotations

import pytest
import torch

from cmiexp.errors import ConfigError
from cmiexp.models.factory import count_parameters
from cmiexp.models.peft_methods import backbone_linears, linear_shape, lora_trainable_count, rocoft_trainable_count
from tests.test_heads import collate, setup_model

# conf/model/tiny-{bert,gpt2}.yaml: hidden 128, intermediate 256, 2 layers; RTE has 2 classes.
H, F, LAYERS, C = 128, 256, 2, 2


def _n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _step(net, tok, ds, weight_decay=0.1, lr=1e-2):
    """One AdamW step with decoupled weight decay on everything trainable (the runner's recipe is milder)."""
    batch, labels = collate(tok, ds, list(range(8)), "right")
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)
    net.train()
    loss = torch.nn.functional.cross_entropy(net(**batch).logits.float(), labels)
    loss.backward()
    opt.step()
    opt.zero_grad()


def _snapshot(net) -> dict:
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


# ----------------------------------------------------------------------------- trainable counts


def test_rocoft_counts_match_closed_form_tiny_bert_masking(cache_dir):
    _, _, _, full, _ = setup_model(cache_dir, "tiny-bert", "masking")
    total = _n_params(full)
    _, _, _, net, _ = setup_model(cache_dir, "tiny-bert", "masking", extra=["peft=rocoft"])
    # column, r = 3: min(r, in) * out per weight; per layer q, k, v, attention-output (128 -> 128),
    # intermediate (128 -> 256), output (256 -> 128)
    per_layer = 4 * (3 * H) + 3 * F + 3 * H
    head = (H * H + H) + (H * C + C)  # MLP head: dense 128 -> 128, out_proj 128 -> 2
    assert count_parameters(net) == (LAYERS * per_layer + head, total)
    shapes = [linear_shape(m) for _, m in backbone_linears(net)]
    assert len(shapes) == 6 * LAYERS
    assert rocoft_trainable_count(shapes, 3, "column") == LAYERS * per_layer


@pytest.mark.parametrize("axis", ["row", "column"])
def test_rocoft_counts_gpt2_rows_vs_columns(cache_dir, axis):
    """GPT-2's Conv1D stores [in, out]: rows/columns refer to the logical [out, in] weight."""
    _, _, _, full, _ = setup_model(cache_dir, "tiny-gpt2", "pooling")
    total = _n_params(full)
    _, _, _, net, _ = setup_model(cache_dir, "tiny-gpt2", "pooling", extra=["peft=rocoft", f"peft.axis={axis}"])
    # c_attn 128 -> 384, attn c_proj 128 -> 128, c_fc 128 -> 256, mlp c_proj 256 -> 128
    if axis == "column":  # 3 * out each
        per_layer = 3 * (3 * H) + 3 * H + 3 * F + 3 * H
    else:  # 3 * in each
        per_layer = 3 * H + 3 * H + 3 * H + 3 * F
    score = H * C  # GPT2ForSequenceClassification.score has no bias
    assert count_parameters(net) == (LAYERS * per_layer + score, total)
    assert {"column": 2688, "row": 1920}[axis] == per_layer


def test_rocoft_train_bias_and_targets(cache_dir):
    _, _, _, net, _ = setup_model(cache_dir, "tiny-bert", "masking",
                                  extra=["peft=rocoft", "peft.rank=2", "peft.train_bias=true",
                                         "peft.target_modules=[query,value]"])
    # only query and value (128 -> 128) of each layer: 2 * 128 entries + their 128 biases
    head = (H * H + H) + (H * C + C)
    assert count_parameters(net)[0] == LAYERS * 2 * (2 * H + H) + head


def test_lora_counts_match_closed_form(cache_dir):
    _, _, _, full, _ = setup_model(cache_dir, "tiny-gpt2", "pooling")
    total = _n_params(full)
    _, _, _, net, _ = setup_model(cache_dir, "tiny-gpt2", "pooling", extra=["peft=lora", "peft.rank=4"])
    # r * (in + out) per adapted weight: c_attn 4*(128+384), c_proj 4*(128+128), c_fc 4*(128+256), c_proj 4*(256+128)
    lora = LAYERS * (4 * 512 + 4 * 256 + 4 * 384 + 4 * 384)
    assert count_parameters(net) == (lora + H * C, total + lora)
    shapes = [(384, 128), (128, 128), (256, 128), (128, 256)] * LAYERS
    assert lora_trainable_count(shapes, 4) == lora


# ----------------------------------------------------------------------------- what moves in a step


@pytest.mark.parametrize("axis", ["column", "row"])
def test_rocoft_step_changes_only_the_chosen_rows_or_columns(cache_dir, axis):
    _, _, tok, net, ds = setup_model(cache_dir, "tiny-bert", "masking", extra=["peft=rocoft", f"peft.axis={axis}"])
    wrapped = {f"{n}.weight" for n in net.rocoft_info["modules"]}
    before = _snapshot(net)
    assert wrapped <= set(before) and not any("rocoft" in k for k in before)  # original layout
    _step(net, tok, ds)
    after = _snapshot(net)
    assert set(after) == set(before)
    for key, old in before.items():
        diff = (after[key] - old).abs()
        if key.startswith("head."):
            assert diff.sum() > 0, f"{key} did not train"
        elif key in wrapped:  # nn.Linear weight [out, in]: rows = dim 0, columns = dim 1
            inside = diff[:3] if axis == "row" else diff[:, :3]
            outside = diff[3:] if axis == "row" else diff[:, 3:]
            assert outside.max() == 0, f"{key}: entries outside the first 3 {axis}s changed"
            assert inside.sum() > 0, f"{key}: the trainable {axis}s did not change"
        else:
            assert diff.max() == 0, f"frozen {key} changed"


def test_rocoft_gpt2_conv1d_columns_are_stored_rows(cache_dir):
    _, _, tok, net, ds = setup_model(cache_dir, "tiny-gpt2", "generation", extra=["peft=rocoft", "peft.axis=column"])
    before = _snapshot(net)
    _step(net, tok, ds)
    after = _snapshot(net)
    key = "backbone.h.0.mlp.c_fc.weight"  # Conv1D [in=128, out=256]: input features index the stored rows
    diff = (after[key] - before[key]).abs()
    assert diff.shape == (H, F) and diff[3:].max() == 0 and diff[:3].sum() > 0
    assert (after["backbone.wte.weight"] == before["backbone.wte.weight"]).all()
    assert (after["backbone.h.0.mlp.c_fc.bias"] == before["backbone.h.0.mlp.c_fc.bias"]).all()


def test_lora_step_changes_only_adapters_and_head(cache_dir):
    _, _, tok, net, ds = setup_model(cache_dir, "tiny-bert", "pooling", extra=["peft=lora", "peft.rank=4"])
    before = _snapshot(net)
    _step(net, tok, ds)
    after = _snapshot(net)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    intended = {k for k in before if ".lora_" in k or k.startswith("classifier.")}
    assert changed <= intended, sorted(changed - intended)
    assert {"classifier.weight", "classifier.bias"} <= changed
    assert any(".lora_B." in k for k in changed)  # B starts at zero and is the first to move
    assert not any(k.endswith("base_layer.weight") for k in changed)


# ----------------------------------------------------------------------------- checkpoints


def test_rocoft_pooling_checkpoint_is_a_plain_hf_model(cache_dir, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    _, _, tok, net, ds = setup_model(cache_dir, "tiny-bert", "pooling", extra=["peft=rocoft"])
    _step(net, tok, ds)
    net.eval()
    net.save_pretrained(tmp_path / "best")
    keys = set(load_file(str(tmp_path / "best" / "model.safetensors")))
    assert not any("rocoft" in k for k in keys) and "bert.encoder.layer.0.attention.self.query.weight" in keys
    plain = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "best")).eval()
    batch, _ = collate(tok, ds, [0, 1, 2], "right")
    with torch.no_grad():
        torch.testing.assert_close(plain(**batch).logits, net(**batch).logits)


def test_rocoft_state_dict_roundtrip_as_accelerate_does(cache_dir, tmp_path):
    """Accelerate's save_state/load_state: model.state_dict() -> safetensors -> load_state_dict(strict)."""
    from safetensors.torch import load_file, save_file

    _, _, tok, net, ds = setup_model(cache_dir, "tiny-gpt2", "generation", extra=["peft=rocoft"])
    _step(net, tok, ds)
    save_file(net.state_dict(), str(tmp_path / "model.safetensors"))
    _, _, _, fresh, _ = setup_model(cache_dir, "tiny-gpt2", "generation", extra=["peft=rocoft"], seed=1)
    fresh.load_state_dict(load_file(str(tmp_path / "model.safetensors")), strict=True)
    batch, _ = collate(tok, ds, [0, 1, 2], "right")
    net.eval(), fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(**batch).logits, net(**batch).logits)
    assert count_parameters(fresh) == count_parameters(net)  # still split: trainable part unchanged


def test_lora_checkpoints_hold_merged_weights(cache_dir, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    from cmiexp.models.heads import load_classifier

    # prompt head + LoRA -> load_classifier
    _, _, tok, net, ds = setup_model(cache_dir, "tiny-gpt2", "generation", extra=["peft=lora", "peft.rank=4"])
    _step(net, tok, ds)
    net.eval()
    net.save_pretrained(tmp_path / "gen")
    keys = set(load_file(str(tmp_path / "gen" / "backbone" / "model.safetensors")))
    assert not any("lora" in k or "base_layer" in k for k in keys) and "h.0.attn.c_attn.weight" in keys
    back = load_classifier(tmp_path / "gen").eval()
    batch, _ = collate(tok, ds, [0, 1, 2], "right")
    with torch.no_grad():
        torch.testing.assert_close(back(**batch).logits, net(**batch).logits, atol=1e-5, rtol=1e-4)

    # Hugging Face pooling model + LoRA -> a plain AutoModelForSequenceClassification
    _, _, tok, net, ds = setup_model(cache_dir, "tiny-bert", "pooling", extra=["peft=lora", "peft.rank=4"])
    _step(net, tok, ds)
    net.eval()
    net.save_pretrained(tmp_path / "pool")
    plain = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "pool")).eval()
    batch, _ = collate(tok, ds, [0, 1, 2], "right")
    with torch.no_grad():
        torch.testing.assert_close(plain(**batch).logits, net(**batch).logits, atol=1e-5, rtol=1e-4)


# ----------------------------------------------------------------------------- config errors


@pytest.mark.parametrize("extra,match", [
    (["peft=rocoft", "peft.rank=0"], "peft.rank=0 must be >= 1"),
    (["peft=rocoft", "peft.axis=diagonal"], "peft.axis='diagonal'; valid choices: row, column"),
    (["peft=lora", "peft.target_modules=[nothing_like_this]"], "matches no linear layer of the backbone"),
    (["peft=lora", "peft.name=adapters"], "unknown peft.name='adapters'; valid choices: none, lora, rocoft"),
])
def test_bad_peft_config_is_one_line_error(cache_dir, extra, match):
    with pytest.raises(ConfigError, match=match):
        setup_model(cache_dir, "tiny-bert", "masking", extra=extra)
