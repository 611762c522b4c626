"""Published configurations of the hub models in ``conf/model/``, for building them without weights.

Nothing on our machines reaches the model hub, yet users start with the hub models at their real
size. Each entry below holds the architecture values of the model's hub ``config.json`` (only the
keys that shape the network; the rest keep the transformers defaults, which match), the special
token ids of its tokenizer, and the parameter count its authors publish, each with its source.
``published_config(name)`` turns an entry into a transformers config; the meta-device tests
(``tests/test_hub_models.py``), the per-model table (``scripts/hub_model_table.py``) and the dry
run (``cmiexp ... --dry-run``, ``cmiexp.dry_run``) build the real architectures from it.

``scripts/hub_model_table.py --check-hub`` compares every entry with the live ``config.json``
(run it once on a machine with hub access; it prints each differing key).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

from cmiexp.errors import ConfigError


@dataclass(frozen=True)
class HubModel:
    name: str                  # the conf/model/<name>.yaml option
    hub_id: str                # model.name_or_path
    family: str                # encoder | decoder | seq2seq (as in conf/model)
    model_type: str            # transformers model_type used to build it here
    config: dict               # architecture values of the hub config.json
    published_params: int      # the size the authors publish
    params_source: str         # where that number is stated
    config_source: str         # where the config values come from
    tokenizer: str             # tokenizer family (what tests/test_tokenizer_families.py builds)
    pad_token_id: int | None   # None: the tokenizer has no pad token (cmiexp pads with EOS)
    mask_token_id: int | None  # None: no mask token (head=masking does not apply)
    eos_token_id: int | None = None
    # Which module the published count covers: "base" (AutoModel, the backbone: what papers and
    # model cards count) or "seq2seq" (T5ForConditionalGeneration: v1.1 has an untied LM head).
    counted: str = "base"
    note: str = ""
    hub_model_type: str = ""   # the hub config's model_type when we build a stand-in architecture
    extra: dict = field(default_factory=dict)


def _hub(repo: str) -> str:
    return f"https://huggingface.co/{repo}/blob/main/config.json"


_BERT_BASE = dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                  intermediate_size=3072, max_position_embeddings=512, type_vocab_size=2, hidden_act="gelu",
                  layer_norm_eps=1e-12, pad_token_id=0)

_DEBERTA_V3 = dict(vocab_size=128100, max_position_embeddings=512, relative_attention=True, position_buckets=256,
                   norm_rel_ebd="layer_norm", share_att_key=True, pos_att_type="p2c|c2p", layer_norm_eps=1e-7,
                   max_relative_positions=-1, position_biased_input=False, type_vocab_size=0, hidden_act="gelu",
                   pad_token_id=0)

_MODERNBERT = dict(vocab_size=50368, max_position_embeddings=8192, global_attn_every_n_layers=3, local_attention=128,
                   global_rope_theta=160000.0, local_rope_theta=10000.0, norm_eps=1e-5, norm_bias=False,
                   attention_bias=False, mlp_bias=False, hidden_activation="gelu", classifier_pooling="mean",
                   classifier_bias=False, classifier_activation="gelu", tie_word_embeddings=True,
                   pad_token_id=50283, bos_token_id=50281, eos_token_id=50282, cls_token_id=50281,
                   sep_token_id=50282)

_GPT2 = dict(vocab_size=50257, n_positions=1024, activation_function="gelu_new", layer_norm_epsilon=1e-5,
             bos_token_id=50256, eos_token_id=50256)

_SMOLLM2 = dict(vocab_size=49152, max_position_embeddings=8192, rope_theta=100000.0,
                rms_norm_eps=1e-5, hidden_act="silu", tie_word_embeddings=True, attention_bias=False, mlp_bias=False,
                bos_token_id=0, eos_token_id=0)

# MobileLLM's hub repos ship their own modelling code (model_type "mobilellm", auto_map with only
# AutoConfig and AutoModelForCausalLM). The network is Llama's (SwiGLU, grouped-query attention,
# RMSNorm, RoPE) with the input embedding shared with the output layer (share_embedding: true),
# so it is built here as a LlamaConfig with the same values and tied embeddings.
_MOBILELLM = dict(vocab_size=32000, max_position_embeddings=2048, rope_theta=10000.0, rms_norm_eps=1e-5,
                  hidden_act="silu", tie_word_embeddings=True, attention_bias=False, mlp_bias=False, head_dim=64,
                  bos_token_id=1, eos_token_id=2)

_T5_V1_1 = dict(vocab_size=32128, d_kv=64, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                relative_attention_num_buckets=32, relative_attention_max_distance=128, layer_norm_epsilon=1e-6,
                dropout_rate=0.1, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)

_T5_NOTE = " (v1.1: untied LM head, gated-GELU; the T5 paper's 60M/220M/770M are v1.0, tied embeddings)"

_MOBILELLM_NOTE = ("hub config model_type 'mobilellm' (remote code, auto_map: AutoConfig + AutoModelForCausalLM "
                   "only); built here as Llama with tied embeddings (share_embedding: true)")

MODELS: dict[str, HubModel] = {m.name: m for m in [
    HubModel("bert-base-uncased", "bert-base-uncased", "encoder", "bert", dict(_BERT_BASE), 110_000_000,
             "Devlin et al. 2019 (arXiv 1810.04805) sec. 3: BERT-BASE total parameters 110M",
             _hub("google-bert/bert-base-uncased"), "wordpiece", 0, 103, None),
    HubModel("distilbert-base-uncased", "distilbert-base-uncased", "encoder", "distilbert",
             dict(vocab_size=30522, dim=768, n_layers=6, n_heads=12, hidden_dim=3072, max_position_embeddings=512,
                  activation="gelu", sinusoidal_pos_embds=False, pad_token_id=0), 66_000_000,
             "Sanh et al. 2019 (arXiv 1910.01108) Table 3: DistilBERT 66M parameters",
             _hub("distilbert/distilbert-base-uncased"), "wordpiece", 0, 103, None),
    HubModel("roberta-base", "FacebookAI/roberta-base", "encoder", "roberta",
             dict(vocab_size=50265, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                  intermediate_size=3072, max_position_embeddings=514, type_vocab_size=1, layer_norm_eps=1e-5,
                  pad_token_id=1, bos_token_id=0, eos_token_id=2), 125_000_000,
             "fairseq examples/roberta/README.md model table: roberta.base 125M",
             _hub("FacebookAI/roberta-base"), "bpe-mask", 1, 50264, 2),
    HubModel("roberta-large", "FacebookAI/roberta-large", "encoder", "roberta",
             dict(vocab_size=50265, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                  intermediate_size=4096, max_position_embeddings=514, type_vocab_size=1, layer_norm_eps=1e-5,
                  pad_token_id=1, bos_token_id=0, eos_token_id=2), 355_000_000,
             "fairseq examples/roberta/README.md model table: roberta.large 355M",
             _hub("FacebookAI/roberta-large"), "bpe-mask", 1, 50264, 2),
    HubModel("deberta-v3-base", "microsoft/deberta-v3-base", "encoder", "deberta-v2",
             dict(_DEBERTA_V3, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
             184_000_000,
             "microsoft/deberta-v3-base model card: 86M backbone parameters + 98M in the embedding layer",
             _hub("microsoft/deberta-v3-base"), "sentencepiece-deberta", 0, 128000, 2),
    HubModel("deberta-v3-large", "microsoft/deberta-v3-large", "encoder", "deberta-v2",
             dict(_DEBERTA_V3, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                  intermediate_size=4096), 435_000_000,
             "microsoft/deberta-v3-large model card: 304M backbone parameters + 131M in the embedding layer",
             _hub("microsoft/deberta-v3-large"), "sentencepiece-deberta", 0, 128000, 2),
    HubModel("modernbert-base", "answerdotai/ModernBERT-base", "encoder", "modernbert",
             dict(_MODERNBERT, hidden_size=768, intermediate_size=1152, num_hidden_layers=22, num_attention_heads=12),
             149_000_000, "answerdotai/ModernBERT-base model card: 149 million parameters",
             _hub("answerdotai/ModernBERT-base"), "bpe-mask", 50283, 50284, 50282),
    HubModel("modernbert-large", "answerdotai/ModernBERT-large", "encoder", "modernbert",
             dict(_MODERNBERT, hidden_size=1024, intermediate_size=2624, num_hidden_layers=28, num_attention_heads=16),
             395_000_000, "answerdotai/ModernBERT-large model card: 395 million parameters",
             _hub("answerdotai/ModernBERT-large"), "bpe-mask", 50283, 50284, 50282),
    HubModel("gpt2-medium", "openai-community/gpt2-medium", "decoder", "gpt2",
             dict(_GPT2, n_embd=1024, n_layer=24, n_head=16), 355_000_000,
             "openai-community/gpt2-medium model card: the 355M parameter version of GPT-2",
             _hub("openai-community/gpt2-medium"), "bpe-nomask", None, None, 50256),
    HubModel("gpt2-large", "openai-community/gpt2-large", "decoder", "gpt2",
             dict(_GPT2, n_embd=1280, n_layer=36, n_head=20), 774_000_000,
             "openai-community/gpt2-large model card: the 774M parameter version of GPT-2",
             _hub("openai-community/gpt2-large"), "bpe-nomask", None, None, 50256),
    HubModel("smollm2-135m", "HuggingFaceTB/SmolLM2-135M", "decoder", "llama",
             dict(_SMOLLM2, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                  num_key_value_heads=3), 135_000_000, "HuggingFaceTB/SmolLM2-135M model card: 135M parameters",
             _hub("HuggingFaceTB/SmolLM2-135M"), "bpe-nomask", None, None, 0),
    HubModel("smollm2-360m", "HuggingFaceTB/SmolLM2-360M", "decoder", "llama",
             dict(_SMOLLM2, hidden_size=960, intermediate_size=2560, num_hidden_layers=32, num_attention_heads=15,
                  num_key_value_heads=5), 360_000_000, "HuggingFaceTB/SmolLM2-360M model card: 360M parameters",
             _hub("HuggingFaceTB/SmolLM2-360M"), "bpe-nomask", None, None, 0),
    HubModel("mobilellm-125m", "facebook/MobileLLM-125M", "decoder", "llama",
             dict(_MOBILELLM, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                  num_key_value_heads=3), 125_000_000,
             "Liu et al. 2024, MobileLLM (arXiv 2402.14905), model configurations: 125M (30 layers, 9 heads, 3 KV heads, dim 576)",
             _hub("facebook/MobileLLM-125M"), "sentencepiece-llama", None, None, 2, note=_MOBILELLM_NOTE,
             hub_model_type="mobilellm"),
    HubModel("mobilellm-350m", "facebook/MobileLLM-350M", "decoder", "llama",
             dict(_MOBILELLM, hidden_size=960, intermediate_size=2560, num_hidden_layers=32, num_attention_heads=15,
                  num_key_value_heads=5), 350_000_000,
             "Liu et al. 2024, MobileLLM (arXiv 2402.14905), model configurations: 350M (32 layers, 15 heads, 5 KV heads, dim 960)",
             _hub("facebook/MobileLLM-350M"), "sentencepiece-llama", None, None, 2, note=_MOBILELLM_NOTE,
             hub_model_type="mobilellm"),
    HubModel("mobilellm-600m", "facebook/MobileLLM-600M", "decoder", "llama",
             dict(_MOBILELLM, hidden_size=1152, intermediate_size=3072, num_hidden_layers=40, num_attention_heads=18,
                  num_key_value_heads=6), 600_000_000,
             "Liu et al. 2024, MobileLLM (arXiv 2402.14905), model configurations: 600M (40 layers, 18 heads, 6 KV heads, dim 1152)",
             _hub("facebook/MobileLLM-600M"), "sentencepiece-llama", None, None, 2, note=_MOBILELLM_NOTE,
             hub_model_type="mobilellm"),
    HubModel("t5-v1_1-small", "google/t5-v1_1-small", "seq2seq", "t5",
             dict(_T5_V1_1, d_model=512, d_ff=1024, num_heads=6, num_layers=8, num_decoder_layers=8), 77_000_000,
             "size of the released google/t5-v1_1-small checkpoint as commonly quoted, 77M" + _T5_NOTE,
             _hub("google/t5-v1_1-small"), "sentencepiece-t5", 0, None, 1, counted="seq2seq"),
    HubModel("t5-v1_1-base", "google/t5-v1_1-base", "seq2seq", "t5",
             dict(_T5_V1_1, d_model=768, d_ff=2048, num_heads=12, num_layers=12, num_decoder_layers=12), 248_000_000,
             "size of the released google/t5-v1_1-base checkpoint as commonly quoted, 248M" + _T5_NOTE,
             _hub("google/t5-v1_1-base"), "sentencepiece-t5", 0, None, 1, counted="seq2seq"),
    HubModel("t5-v1_1-large", "google/t5-v1_1-large", "seq2seq", "t5",
             dict(_T5_V1_1, d_model=1024, d_ff=2816, num_heads=16, num_layers=24, num_decoder_layers=24),
             783_000_000,
             "size of the released google/t5-v1_1-large checkpoint as commonly quoted, 783M" + _T5_NOTE,
             _hub("google/t5-v1_1-large"), "sentencepiece-t5", 0, None, 1, counted="seq2seq"),
]}


def hub_model(name: str) -> HubModel:
    try:
        return MODELS[name]
    except KeyError:
        raise ConfigError(f"no published configuration for model={name!r} in cmiexp/models/hub_configs.py; "
                          f"known: {', '.join(MODELS)}") from None


def find_by_path(path: str) -> HubModel | None:
    """The entry whose hub id (or conf name) is ``path``, if any."""
    for m in MODELS.values():
        if path in (m.hub_id, m.name) or path.split("/")[-1].lower() == m.hub_id.split("/")[-1].lower():
            return m
    return None


def published_config(name: str):
    """A transformers config with the published architecture values of ``name``."""
    from transformers import AutoConfig

    entry = hub_model(name)
    values = copy.deepcopy(entry.config)
    config = AutoConfig.for_model(entry.model_type, **values)
    config.name_or_path = entry.hub_id
    return config


def num_layers(config) -> int:
    for key in ("num_hidden_layers", "n_layers", "n_layer", "num_layers"):
        v = getattr(config, key, None)
        if isinstance(v, int):
            return v
    raise ConfigError(f"cannot tell the number of layers of {type(config).__name__}")


__all__ = ["HubModel", "MODELS", "find_by_path", "hub_model", "num_layers", "published_config"]
