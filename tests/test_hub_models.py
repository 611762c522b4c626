"""Every hub model of conf/model/ at its real size, on the meta device (no weights, no memory).

Each architecture is built from the published values in cmiexp/models/hub_configs.py through the
runner's own code (``build_classifier`` + ``apply_peft``; ``load_model`` for T5) with every head
and PEFT method that applies, and checked against numbers written out here from the config values
alone: the published parameter count (within 3%), LoRA's and RoCoFT's trainable counts (closed
forms over the layer shapes each architecture is known to have), the forward's output shapes and
the hidden states the FlowNIB probe reads.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import pytest
import torch

from cmiexp.dry_run import MetaScalars, build_meta_model, meta_batch, tokenizer_ids
from cmiexp.models.factory import count_parameters, load_model, without_weights
from cmiexp.models.heads import model_input_keys
from cmiexp.models.hub_configs import MODELS, hub_model, num_layers, published_config
from tests.conftest import compose_config

C = 3          # label count of the stand-in task (distinct from hidden sizes and ranks)
B, S = 2, 16   # meta batch
LORA_R, ROCOFT_R = 8, 3  # conf/peft/lora.yaml and rocoft.yaml defaults
NON_SEQ2SEQ = [n for n, m in MODELS.items() if m.family != "seq2seq"]
SEQ2SEQ = [n for n, m in MODELS.items() if m.family == "seq2seq"]
TASK = SimpleNamespace(num_labels=C, is_regression=False, id2label={0: "a", 1: "b", 2: "c"}, train=None,
                       name="stand-in")


def heads_for(name: str) -> list[str]:
    m = hub_model(name)
    if m.family == "decoder":
        return ["pooling", "generation"]
    return ["pooling", "masking"] if m.mask_token_id is not None else ["pooling"]


@functools.lru_cache(maxsize=None)
def config_of(name: str):
    return published_config(name)


@functools.lru_cache(maxsize=None)
def cfg_of(name: str, head: str, peft: str):
    return compose_config([f"model={name}", f"head={head}", f"peft={peft}"])


def build(name: str, head: str, peft: str):
    return build_meta_model(cfg_of(name, head, peft), TASK, config_of(name), tokenizer_ids(hub_model(name)))


# ----------------------------------------------------------------------------- closed forms from config values


def hidden(c) -> int:
    for k in ("hidden_size", "dim", "n_embd", "d_model"):
        if isinstance(getattr(c, k, None), int):
            return getattr(c, k)
    raise AssertionError(c)


def layer_linears(c) -> list[tuple[int, int]]:
    """(out, in) of the linear layers of one transformer block, written from the architecture."""
    t, h = c.model_type, hidden(c)
    if t in ("bert", "roberta", "deberta-v2"):  # query, key, value, attention output, intermediate, output
        ff = c.intermediate_size
        return [(h, h)] * 4 + [(ff, h), (h, ff)]
    if t == "distilbert":  # q_lin, k_lin, v_lin, out_lin, ffn.lin1, ffn.lin2
        return [(h, h)] * 4 + [(c.hidden_dim, h), (h, c.hidden_dim)]
    if t == "modernbert":  # fused Wqkv, Wo, GLU input (2 x ff), output
        ff = c.intermediate_size
        return [(3 * h, h), (h, h), (2 * ff, h), (h, ff)]
    if t == "gpt2":  # Conv1D c_attn, attn c_proj, c_fc (4h), mlp c_proj
        return [(3 * h, h), (h, h), (4 * h, h), (h, 4 * h)]
    if t == "llama":  # q, k, v (grouped), o, gate, up, down
        hd = getattr(c, "head_dim", None) or h // c.num_attention_heads
        q, kv, ff = c.num_attention_heads * hd, c.num_key_value_heads * hd, c.intermediate_size
        return [(q, h), (kv, h), (kv, h), (h, q), (ff, h), (ff, h), (h, ff)]
    raise AssertionError(t)


def backbone_linears(c, head: str) -> list[tuple[int, int]]:
    shapes = layer_linears(c) * num_layers(c)
    if c.model_type == "bert" and head == "pooling":
        shapes.append((hidden(c), hidden(c)))  # BertForSequenceClassification reads the pooler (inside the backbone)
    return shapes


def head_params(c, head: str) -> int:
    """Parameters outside the backbone (trained in full under every PEFT method)."""
    h = hidden(c)
    if head in ("masking", "generation"):  # cmiexp's MLP head: dense h -> h, out_proj h -> C
        return h * h + h + h * C + C
    return {
        "bert": h * C + C,                                   # classifier (pooler is in the backbone)
        "roberta": (h * h + h) + (h * C + C),                # classifier.dense + out_proj
        "distilbert": (h * h + h) + (h * C + C),             # pre_classifier + classifier
        "deberta-v2": (h * h + h) + (h * C + C),             # ContextPooler dense + classifier
        "modernbert": h * h + h + (h * C + C),               # head.dense (no bias), head.norm (no bias), classifier
        "gpt2": h * C,                                       # score, no bias
        "llama": h * C,                                      # score, no bias
    }[c.model_type]


# ----------------------------------------------------------------------------- published sizes


@pytest.mark.parametrize("name", list(MODELS))
def test_parameter_count_matches_published_size(name):
    entry = hub_model(name)
    kind = "seq2seq" if entry.counted == "seq2seq" else "base"
    model_cfg = compose_config([f"model={name}"]).model
    with without_weights(config_of(name)):
        model = load_model("<meta>", model_cfg, kind=kind)
    total = count_parameters(model)[1]
    assert all(p.is_meta for p in model.parameters())
    assert abs(total - entry.published_params) / entry.published_params < 0.03, (total, entry.published_params)


@pytest.mark.parametrize("name", list(MODELS))
def test_special_token_ids_fit_the_vocabulary(name):
    """A pad or mask id outside the embedding would only fail on the first real batch."""
    entry, c = hub_model(name), config_of(name)
    for tid in (entry.pad_token_id, entry.mask_token_id, entry.eos_token_id):
        if tid is not None:
            assert 0 <= tid < c.vocab_size
    assert hub_model(name).hub_id == compose_config([f"model={name}"]).model.name_or_path


# ----------------------------------------------------------------------------- heads x PEFT


def _forward(model, with_hidden: bool):
    with MetaScalars():
        return model(**meta_batch(B, S), output_hidden_states=with_hidden)


@pytest.mark.parametrize("name,head", [(n, h) for n in NON_SEQ2SEQ for h in heads_for(n)])
def test_heads_and_peft_at_real_size(name, head):
    c = config_of(name)
    h = hidden(c)
    linears = backbone_linears(c, head)
    expect_head = head_params(c, head)

    full = build(name, head, "none")
    trainable, total = count_parameters(full)
    assert trainable == total
    assert {"input_ids", "attention_mask"} <= model_input_keys(full)
    out = _forward(full, with_hidden=True)
    assert out.logits.shape == (B, C) and out.logits.is_meta            # what every classification objective reads
    states = out.hidden_states                                           # what the FlowNIB probe reads
    assert len(states) == num_layers(c) + 1 and all(s.shape == (B, S, h) for s in states)
    if hub_model(name).family == "decoder":
        # decoders pad with EOS: the sequence classifier needs a pad id to find the last token
        assert getattr(getattr(full, "config", None) or full.backbone.config, "pad_token_id") == hub_model(name).eos_token_id

    lora = build(name, head, "lora")
    modules = dict(lora.named_modules())
    chosen = lora.lora_info["modules"]
    assert len(chosen) == len(linears)
    got = sorted((modules[n].lora_B["default"].weight.shape[0], modules[n].lora_A["default"].weight.shape[1])
                 for n in chosen)
    assert got == sorted(linears)                                          # the adapted layers are the known ones
    assert all(modules[n].lora_A["default"].weight.shape[0] == LORA_R for n in chosen)
    lora_closed = sum(LORA_R * (i + o) for o, i in linears)
    assert count_parameters(lora) == (lora_closed + expect_head, total + lora_closed)
    # The adapted backbone is the same under either head: run its forward once per model.
    if head == "pooling":
        assert _forward(lora, with_hidden=False).logits.shape == (B, C)

    rocoft = build(name, head, "rocoft")
    rocoft_closed = sum(min(ROCOFT_R, i) * o for o, i in linears)         # column axis: r input features each
    assert count_parameters(rocoft) == (rocoft_closed + expect_head, total)
    if head == "pooling":
        assert _forward(rocoft, with_hidden=False).logits.shape == (B, C)


# LoRA on the attention projections only: the names a user types in peft.target_modules.
ATTENTION_TARGETS = {"bert": ["query", "value"], "roberta": ["query", "value"], "distilbert": ["q_lin", "v_lin"],
                     "deberta-v2": ["query_proj", "value_proj"], "modernbert": ["Wqkv"], "gpt2": ["c_attn"],
                     "llama": ["q_proj", "v_proj"]}


@pytest.mark.parametrize("name", NON_SEQ2SEQ)
def test_lora_attention_target_names_exist(name):
    c = config_of(name)
    targets = ATTENTION_TARGETS[c.model_type]
    cfg = compose_config([f"model={name}", "peft=lora", f"peft.target_modules=[{','.join(targets)}]"])
    model = build_meta_model(cfg, TASK, c, tokenizer_ids(hub_model(name)))
    shapes = layer_linears(c)
    per_layer = {"bert": [0, 2], "roberta": [0, 2], "distilbert": [0, 2], "deberta-v2": [0, 2], "modernbert": [0],
                 "gpt2": [0], "llama": [0, 2]}[c.model_type]
    expected = num_layers(c) * sum(LORA_R * (shapes[i][0] + shapes[i][1]) for i in per_layer)
    assert len(model.lora_info["modules"]) == num_layers(c) * len(per_layer)
    assert count_parameters(model)[0] == expected + head_params(c, "pooling")


# ----------------------------------------------------------------------------- T5 v1.1


@pytest.mark.parametrize("name", SEQ2SEQ)
def test_t5_untied_head_logits_and_mi_term(name):
    from cmiexp.objectives.cot_mi import mi_loss_reference

    c = config_of(name)
    model = build_meta_model(compose_config([f"model={name}", "task=cot/svamp", "objective=cot_mi"]), TASK, c,
                             tokenizer_ids(hub_model(name)))
    # v1.1 keeps an LM head apart from the embedding (from_pretrained unties it from the checkpoint)
    assert model.lm_head.weight is not model.shared.weight
    h, v = c.d_model, c.vocab_size
    assert model.lm_head.weight.shape == (v, h)
    labels = torch.empty(B, 5, dtype=torch.long, device="meta")
    with MetaScalars():
        pred = model(**meta_batch(B, S), labels=labels, output_hidden_states=True)
        expl = model(**meta_batch(B, S), labels=torch.empty(B, 7, dtype=torch.long, device="meta"))
        term = mi_loss_reference(pred.logits, expl.logits)
    assert pred.logits.shape == (B, 5, v) and expl.logits.shape == (B, 7, v)   # what DSS / MI-CoT read
    assert pred.loss.shape == () and term.shape == ()
    assert len(pred.encoder_hidden_states) == c.num_layers + 1
    assert len(pred.decoder_hidden_states) == c.num_decoder_layers + 1


def test_seq2seq_refuses_peft_in_one_line():
    """The chain-of-thought adapter trains every weight; peft=lora there used to be ignored silently
    (results.json said peft: lora for a full fine-tuning run)."""
    from cmiexp.errors import ConfigError
    from cmiexp.train.adapters.cot import CotAdapter

    cfg = compose_config(["model=t5-v1_1-small", "task=cot/svamp", "objective=dss", "peft=lora"])
    with pytest.raises(ConfigError, match="peft=lora is not implemented for chain-of-thought"):
        build_meta_model(cfg, TASK, config_of("t5-v1_1-small"), tokenizer_ids(hub_model("t5-v1_1-small")))
    cfg = compose_config(["model=tiny-t5", "task=cot/svamp", "objective=dss", "peft=rocoft"])
    with pytest.raises(ConfigError) as e:
        CotAdapter().setup(SimpleNamespace(cfg=cfg, accelerator=None))  # refused before anything is loaded
    assert str(e.value) == "peft=rocoft is not implemented for chain-of-thought (seq2seq) tasks; use peft=none"


def test_model_without_the_needed_auto_class_is_one_line():
    """MobileLLM's hub code registers only AutoModelForCausalLM; a config transformers has no
    sequence classifier for must stop with one line, not a traceback."""
    from transformers import AutoConfig

    from cmiexp.errors import ConfigError

    model_cfg = compose_config(["model=mobilellm-125m"]).model
    with without_weights(AutoConfig.for_model("vit")), pytest.raises(ConfigError) as e:
        load_model("<meta>", model_cfg, TASK, kind="classification")
    assert "model=mobilellm-125m" in str(e.value) and "auto_map" in str(e.value) and "\n" not in str(e.value)


def test_check_hub_reports_differences(tmp_path, capsys):
    """scripts/hub_model_table.py --check-hub, against config.json files in a hub-layout cache."""
    import importlib.util
    import json

    from tests.conftest import REPO
    from tests.hub_cache import write_repo

    spec = importlib.util.spec_from_file_location("hub_model_table", REPO / "scripts" / "hub_model_table.py")
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    good = dict(hub_model("bert-base-uncased").config, model_type="bert", architectures=["BertForMaskedLM"])
    changed = dict(hub_model("gpt2-medium").config, model_type="gpt2", n_layer=25)
    changed.pop("activation_function")
    write_repo(tmp_path, "bert-base-uncased", {"config.json": json.dumps(good).encode()})
    write_repo(tmp_path, "openai-community/gpt2-medium", {"config.json": json.dumps(changed).encode()})
    rc = table.check_hub(["bert-base-uncased", "gpt2-medium"], cache_dir=tmp_path, local_files_only=True)
    out = capsys.readouterr().out.splitlines()
    assert rc == 1
    assert out[0] == "bert-base-uncased: matches the hub config.json"
    assert out[1] == ("gpt2-medium: n_layer: ours 24, hub 25 (not in the hub file, defaults apply: "
                      "activation_function)")
