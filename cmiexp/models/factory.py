"""Load models and tokenizers by config: hub ids, local folders, or offline tiny models.

All three go through ``from_pretrained``; a tiny model is first materialised into the cache.
"""

from __future__ import annotations

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
            path, revision=model_cfg.get("revision"), trust_remote_code=bool(model_cfg.get("trust_remote_code", False))
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


def load_model(path: str, model_cfg, task=None, kind: str = "classification", tokenizer=None):
    """Load the model for ``kind``: ``classification`` (sequence classification / regression head),
    ``seq2seq`` (encoder-decoder LM), ``causal_lm`` or ``base`` (no head)."""
    import transformers as tf

    common = dict(revision=model_cfg.get("revision"), trust_remote_code=bool(model_cfg.get("trust_remote_code", False)))
    try:
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
            model = tf.AutoModelForSequenceClassification.from_pretrained(path, **kw, **common)
        elif kind == "seq2seq":
            model = tf.AutoModelForSeq2SeqLM.from_pretrained(path, **common)
        elif kind == "causal_lm":
            model = tf.AutoModelForCausalLM.from_pretrained(path, **common)
        elif kind == "base":
            model = tf.AutoModel.from_pretrained(path, **common)
        else:
            raise ConfigError(f"unknown model kind {kind!r}")
    except OSError as e:
        raise _hub_error(path, e) from e
    if tokenizer is not None and getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total
