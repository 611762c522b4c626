"""Types and ranges of the training loop's settings (``trainer.*``, ``seed``), checked before
anything runs so a bad value names its key (``trainer.lr=abc``) instead of failing deep in torch."""

from __future__ import annotations

import math

from omegaconf import DictConfig, OmegaConf

from cmiexp.errors import ConfigError

# Types and ranges of the loop's settings, checked before anything runs so a bad value names its
# key (``trainer.lr=abc``) instead of failing deep inside torch. (kind, lower bound, lower bound
# inclusive, nullable); "int" refuses 2.5 and "abc", "float" refuses "abc", nan and inf.
TRAINER_SCHEMA = {
    "epochs": ("int", 1, True, False), "max_steps": ("int", None, True, False),
    "batch_size": ("int", 1, True, False), "eval_batch_size": ("int", 1, True, False),
    "grad_accum": ("int", 1, True, False), "lr": ("float", 0, False, False),
    "weight_decay": ("float", 0, True, False), "adam_eps": ("float", 0, False, False),
    "warmup_ratio": ("float", 0, True, False), "warmup_steps": ("int", 0, True, False),
    "max_grad_norm": ("float", 0, True, True), "eval_train_samples": ("int", 1, True, False),
    "num_workers": ("int", 0, True, False), "log_every": ("int", 1, True, False),
    "stop_after_steps": ("int", 1, True, True),
}
BOOL_KEYS = ("eval_on_train", "save_best", "progress_bar", "cpu", "group_by_length")
RETENTION_CHOICES = ("full", "weights", "none")


def _check_number(key: str, value, kind: str, low, low_inclusive: bool, nullable: bool) -> None:
    if value is None:
        if nullable:
            return
        raise ConfigError(f"{key}=null must be a{'n integer' if kind == 'int' else ' number'}")
    bad_type = isinstance(value, bool) or not isinstance(value, (int, float)) or (
        kind == "int" and isinstance(value, float) and not value.is_integer())
    if bad_type or not math.isfinite(float(value)):
        want = "an integer" if kind == "int" else "a finite number"
        raise ConfigError(f"{key}={value!r} must be {want}")
    if low is not None and (value < low or (value == low and not low_inclusive)):
        raise ConfigError(f"{key}={value!r} must be {'>=' if low_inclusive else '>'} {low}")


def check_config(cfg: DictConfig) -> None:
    """ConfigError naming the key for a trainer value of the wrong type or range (or a bad choice)."""
    t = cfg.trainer
    for key, spec in TRAINER_SCHEMA.items():
        if key in t:
            _check_number(f"trainer.{key}", t[key], *spec)
    for key in BOOL_KEYS:
        if key in t and not isinstance(t[key], bool):
            raise ConfigError(f"trainer.{key}={t[key]!r} must be true or false")
    betas = t.get("adam_betas")
    if not (OmegaConf.is_list(betas) and len(betas) == 2):
        raise ConfigError(f"trainer.adam_betas={betas!r} must be a pair [beta1, beta2]")
    for i, b in enumerate(betas):
        _check_number(f"trainer.adam_betas[{i}]", b, "float", 0, True, False)
        if b >= 1:
            raise ConfigError(f"trainer.adam_betas[{i}]={b!r} must be < 1")
    _check_number("seed", cfg.get("seed"), "int", 0, True, False)
    retention = t.checkpoint_retention
    if retention not in RETENTION_CHOICES:
        raise ConfigError(f"trainer.checkpoint_retention={retention!r}; valid choices: {', '.join(RETENTION_CHOICES)}")
    share = t.get("collapse_share")
    try:
        share_ok = share is None or 0.0 < float(share) <= 1.0
    except (TypeError, ValueError):
        share_ok = False
    if not share_ok:
        raise ConfigError(f"trainer.collapse_share={share!r} must be a fraction in (0, 1]")
    if str(t.pin_memory) not in ("auto", "True", "False", "true", "false"):
        raise ConfigError(f"trainer.pin_memory={t.pin_memory!r}; valid choices: auto, true, false")
    if t.scheduler not in ("linear", "cosine", "constant"):
        raise ConfigError(f"trainer.scheduler={t.scheduler!r}; valid choices: linear, cosine, constant")
    if str(t.resume) not in ("auto", "True", "False", "true", "false"):
        raise ConfigError(f"trainer.resume={t.resume!r}; valid choices: auto, true, false")


__all__ = ["BOOL_KEYS", "RETENTION_CHOICES", "TRAINER_SCHEMA", "check_config"]
