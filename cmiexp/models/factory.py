"""Load models and tokenizers by config: hub ids, local folders, or offline tiny models.

All three go through ``from_pretrained``; a tiny model is first materialised into the cache.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from pathlib import Path

from cmiexp.errors import CmiexpError, ConfigError

log = logging.getLogger(__name__)

TINY_MODELS_HINT = "tiny-bert, tiny-distilbert, tiny-roberta, tiny-gpt2, tiny-t5"


def default_cache_dir(cfg_paths=None) -> Path:
    import os

    d = None
    if cfg_paths is not None:
        d = cfg_paths.get("cache_dir")
    d = d or os.environ.get("CMIEXP_CACHE_DIR") or "~/.cache/cmiexp"
    return Path(d).expanduser()


def resolve_model_path(model_cfg, task=None, cache_dir: str | Path | None = None) -> str:
    """Return what to pass to ``from_pretrained``: a hub id, a local folder, or the built tiny model."""
    if model_cfg.get("tiny"):
        if task is None or task.train is None:
            raise ConfigError(f"model={model_cfg.name} builds its tokenizer from the task's training text, "
                              "but the task has no training split")
        from cmiexp.models.tiny import ensure_tiny_model

        texts = list(task.train_texts)
        return str(ensure_tiny_model(cache_dir or default_cache_dir(), model_cfg.name, model_cfg.tiny, texts))
    path = model_cfg.get("name_or_path")
    if not path:
        raise ConfigError(f"model.name_or_path is empty for model={model_cfg.get('name')}; "
                          f"give a hub id or a local folder, or use a tiny model ({TINY_MODELS_HINT})")
    return str(path)


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def _hub_error(path: str, err: Exception) -> CmiexpError:
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if Path(path).expanduser().exists():
        return CmiexpError(f"cannot load model from local folder {path}: {first}")
    return CmiexpError(
        f"cannot load {path!r} from the Hugging Face hub (offline or unknown id: {first}); "
        f"set model.name_or_path=/path/to/local/model or use an offline tiny model (model={TINY_MODELS_HINT.split(',')[0]}; "
        f"also {TINY_MODELS_HINT})"
    )


def load_tokenizer(path: str, model_cfg):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(
            path, revision=model_cfg.get("revision"), trust_remote_code=bool(model_cfg.trust_remote_code)
        )
    except (OSError, ValueError) as e:
        raise _hub_error(path, e) from e
    if tok.pad_token is None:
        # Decoder-only models (GPT-2, SmolLM) ship without a pad token; padding with EOS is the
        # usual choice and the sequence-classification heads find the last non-pad token.
        tok.pad_token = tok.eos_token
    side = model_cfg.get("padding_side")
    if side:
        tok.padding_side = side
    return tok


_DROPOUT_KEYS = ("hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout", "dropout",
                 "attention_dropout", "seq_classif_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop",
                 "summary_first_dropout", "dropout_rate")


def dropout_overrides(path: str, model_cfg, common: dict) -> dict:
    """``model.dropout=x`` sets every dropout probability the architecture's config has (e.g. 0.0
    for bitwise-comparable runs across process counts, whose dropout masks otherwise differ)."""
    p = model_cfg.get("dropout")
    if p is None:
        return {}
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, **common)
    return {k: float(p) for k in _DROPOUT_KEYS if getattr(config, k, None) is not None}


# Set by ``without_weights(config)``: load_model then builds the architecture from that config on
# the meta device instead of reading weights (the dry run and the real-size tests), while every
# caller (heads, PEFT) runs unchanged.
_META_CONFIG: contextvars.ContextVar = contextvars.ContextVar("cmiexp_meta_config", default=None)


@contextlib.contextmanager
def without_weights(config):
    """Inside this block ``load_model`` returns meta-device models built from ``config`` (no weights,
    no memory): the same classes and keyword arguments as ``from_pretrained`` would use."""
    token = _META_CONFIG.set(config)
    try:
        yield
    finally:
        _META_CONFIG.reset(token)


def _from_config_on_meta(auto_cls, config, kwargs: dict):
    import copy

    import torch

    config = copy.deepcopy(config)
    trust = bool(kwargs.pop("trust_remote_code", False))
    kwargs.pop("revision", None)
    for key, value in kwargs.items():  # what from_pretrained would set on the config
        setattr(config, key, value)
    with torch.device("meta"):
        model = auto_cls.from_config(config, trust_remote_code=trust)
        if getattr(config, "model_type", "") == "t5" and getattr(config, "scale_decoder_outputs", True) is False:
            # T5 v1.1 checkpoints (tie_word_embeddings: false) hold an LM head apart from the
            # embedding. transformers 5 always builds T5 tied and unties at load time when the
            # checkpoint has both, so from_pretrained gives two matrices; so does this.
            head = model.get_output_embeddings()
            if head is not None and head.weight is model.get_input_embeddings().weight:
                head.weight = torch.nn.Parameter(torch.empty_like(head.weight))
    return model


def _build(auto_cls, path: str, meta_config, *args, **kwargs):
    if meta_config is None:
        return auto_cls.from_pretrained(path, *args, **kwargs)
    return _from_config_on_meta(auto_cls, meta_config, kwargs)


def load_model(path: str, model_cfg, task=None, kind: str = "classification", tokenizer=None):
    """Load the model for ``kind``: ``classification`` (sequence classification / regression head),
    ``seq2seq`` (encoder-decoder LM), ``causal_lm`` or ``base`` (no head)."""
    import transformers as tf

    common = dict(revision=model_cfg.get("revision"), trust_remote_code=bool(model_cfg.trust_remote_code))
    meta_config = _META_CONFIG.get()
    if meta_config is not None:
        p = model_cfg.get("dropout")
        if p is not None:
            common.update({k: float(p) for k in _DROPOUT_KEYS if getattr(meta_config, k, None) is not None})
    try:
        if meta_config is None:
            common.update(dropout_overrides(path, model_cfg, common))
        if kind == "classification":
            if task is None:
                raise ValueError("a task is needed for a classification head")
            kw = dict(num_labels=task.num_labels)
            if task.is_regression:
                kw["problem_type"] = "regression"
            else:
                kw["id2label"] = task.id2label
                kw["label2id"] = {v: k for k, v in task.id2label.items()}
            model = _build(tf.AutoModelForSequenceClassification, path, meta_config, **kw, **common)
        elif kind == "seq2seq":
            model = _build(tf.AutoModelForSeq2SeqLM, path, meta_config, **common)
        elif kind == "causal_lm":
            model = _build(tf.AutoModelForCausalLM, path, meta_config, **common)
        elif kind == "base":
            model = _build(tf.AutoModel, path, meta_config, **common)
        else:
            raise ConfigError(f"unknown model kind {kind!r}")
    except OSError as e:
        raise _hub_error(path, e) from e
    except ValueError as e:
        if "Unrecognized configuration class" not in str(e):
            raise
        # e.g. MobileLLM: its hub code registers only AutoModelForCausalLM (config.json auto_map),
        # so no sequence-classification or base-model class exists for it.
        raise ConfigError(f"model={model_cfg.get('name')}: {path} provides no {kind} model class "
                          f"({_first_line(e)}); check the auto_map of its config.json") from e
    if tokenizer is not None and getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total
