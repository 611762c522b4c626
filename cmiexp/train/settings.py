"""Types and ranges of the training loop's settings (``trainer.*``, ``seed``), checked before
anything runs so a bad value names its key (``trainer.lr=abc``) instead of failing deep in torch."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from cmiexp.checks import (
    BELOW_ONE, NON_NEGATIVE, NON_NEGATIVE_INT, POSITIVE, POSITIVE_INT, SEED, Number, check_flag, check_group,
    check_number, check_settings,
)
from cmiexp.errors import ConfigError

# In cmiexp.checks' one format (kind, low, low inclusive, high, high inclusive, nullable): "int"
# refuses 2.5 and "abc", "float" refuses "abc", nan and inf.
TRAINER_SCHEMA = {
    "epochs": POSITIVE_INT, "max_steps": Number("int", None), "batch_size": POSITIVE_INT,
    "eval_batch_size": POSITIVE_INT, "grad_accum": POSITIVE_INT, "lr": POSITIVE,
    "weight_decay": NON_NEGATIVE, "adam_eps": POSITIVE, "warmup_ratio": NON_NEGATIVE,
    "warmup_steps": NON_NEGATIVE_INT, "max_grad_norm": Number("float", 0, nullable=True),
    "eval_train_samples": POSITIVE_INT, "num_workers": NON_NEGATIVE_INT, "log_every": POSITIVE_INT,
    "stop_after_steps": Number("int", 1, nullable=True),
    "collapse_share": Number("float", 0, False, 1, True),
}
BOOL_KEYS = ("eval_on_train", "save_best", "progress_bar", "cpu", "group_by_length")
RETENTION_CHOICES = ("full", "weights", "none")


def check_config(cfg: DictConfig) -> None:
    """ConfigError naming the key for a trainer value of the wrong type or range (or a bad choice)."""
    t = cfg.trainer
    check_group(t, "trainer", TRAINER_SCHEMA)
    for key in BOOL_KEYS:
        if key in t:
            check_flag(f"trainer.{key}", t[key])
    betas = t.get("adam_betas")
    if not (OmegaConf.is_list(betas) and len(betas) == 2):
        raise ConfigError(f"trainer.adam_betas={betas!r} must be a pair [beta1, beta2]")
    for i, b in enumerate(betas):
        check_number(f"trainer.adam_betas[{i}]", b, BELOW_ONE)
    check_number("seed", cfg.get("seed"), SEED)
    check_settings(cfg)
    retention = t.checkpoint_retention
    if retention not in RETENTION_CHOICES:
        raise ConfigError(f"trainer.checkpoint_retention={retention!r}; valid choices: {', '.join(RETENTION_CHOICES)}")
    if str(t.pin_memory) not in ("auto", "True", "False", "true", "false"):
        raise ConfigError(f"trainer.pin_memory={t.pin_memory!r}; valid choices: auto, true, false")
    if t.scheduler not in ("linear", "cosine", "constant"):
        raise ConfigError(f"trainer.scheduler={t.scheduler!r}; valid choices: linear, cosine, constant")
    if str(t.resume) not in ("auto", "True", "False", "true", "false"):
        raise ConfigError(f"trainer.resume={t.resume!r}; valid choices: auto, true, false")


__all__ = ["BOOL_KEYS", "RETENTION_CHOICES", "TRAINER_SCHEMA", "check_config"]
