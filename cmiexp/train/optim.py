"""Optimizer, learning-rate schedule, precision and step-interval settings of a training run."""

from __future__ import annotations

import torch

from cmiexp.errors import ConfigError


def resolve_mixed_precision(value: str) -> str:
    """trainer.mixed_precision: ``auto`` = bf16 on a GPU that has it, else fp16 on a GPU, else none."""
    if value != "auto":
        return value
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "no"


def parse_every(value, name: str, allowed: str = "'epoch'") -> int | None:
    """"epoch" -> None; a positive int -> steps (``allowed`` names the words the caller accepts)."""
    if value in (None, "epoch"):
        return None
    message = f"{name}={value!r} must be {allowed} or a positive number of steps"
    if isinstance(value, bool):
        raise ConfigError(message)
    try:
        v = int(value)
    except (TypeError, ValueError):
        raise ConfigError(message) from None
    if v <= 0 or v != value and str(v) != str(value).strip():
        raise ConfigError(message)
    return v


def build_optimizer(model, cfg, device="cpu"):
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # Biases and normalisation weights are not decayed (standard BERT recipe).
        (no_decay if p.ndim < 2 or "norm" in n.lower() else decay).append(p)
    t = cfg.trainer
    # On CUDA the fused AdamW kernel updates every parameter in one launch; elsewhere torch's default
    # (foreach where supported) is kept. Same update rule either way.
    fused = {"fused": True} if torch.device(device).type == "cuda" else {}
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": float(t.weight_decay)}, {"params": no_decay, "weight_decay": 0.0}],
        lr=float(t.lr), betas=tuple(t.adam_betas), eps=float(t.adam_eps), **fused,
    )


def build_scheduler(optimizer, cfg, total_steps: int, num_processes: int = 1):
    from transformers import get_scheduler

    t = cfg.trainer
    warmup = int(t.warmup_steps) if int(t.warmup_steps) > 0 else int(round(float(t.warmup_ratio) * total_steps))
    name = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}[t.scheduler]
    # Accelerate's prepared scheduler advances once per process at every optimizer step, so the
    # schedule is laid out in those units to keep the lr curve independent of the process count.
    return get_scheduler(name, optimizer=optimizer, num_warmup_steps=warmup * num_processes,
                         num_training_steps=total_steps * num_processes)


__all__ = ["build_optimizer", "build_scheduler", "parse_every", "resolve_mixed_precision"]
