"""Prediction heads: how a backbone's hidden states become class logits (or a regression score).

``build_classifier`` is the one place the runner asks for a trainable classifier; the ``head``
config group picks the head. ``pooling`` is the standard Hugging Face sequence-classification
head (CLS for encoders, last non-pad token for decoders).
"""

from __future__ import annotations

from cmiexp.errors import ConfigError

HEADS = ("pooling",)


def build_classifier(path: str, cfg, task, tokenizer):
    """Return a model whose forward gives ``.logits`` of shape [batch, num_labels]."""
    from cmiexp.models.factory import load_model

    head = str(cfg.get("head", {}).get("name", "pooling")) if cfg.get("head") is not None else "pooling"
    if head == "pooling":
        return load_model(path, cfg.model, task, kind="classification", tokenizer=tokenizer)
    raise ConfigError(f"unknown head.name={head!r}; valid choices: {', '.join(HEADS)}")


def apply_peft(model, cfg):
    """Parameter-efficient fine-tuning wrapper chosen by the ``peft`` group (``none`` = full fine-tuning)."""
    name = str(cfg.get("peft", {}).get("name", "none")) if cfg.get("peft") is not None else "none"
    if name == "none":
        return model
    raise ConfigError(f"unknown peft.name={name!r}; valid choices: none")
