"""Types and ranges of the numeric settings a run reads (``task.*``, ``model.*``, ``head.*``,
``peft.*``; ``trainer.*`` in ``cmiexp.train.settings``), with one rule and one message format for all of them.

They are checked before anything runs, so a bad value names its key (``task.max_length=0 must be
>= 1``) instead of failing deep inside a tokenizer or torch, or, worse, running: a zero truncation
length used to train on empty inputs. The YAML under ``conf/`` is the one home of every default;
these tables hold types and bounds only, and a key a config does not have is not checked (each
task loader has its own keys).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

from cmiexp.errors import ConfigError


@dataclass(frozen=True)
class Number:
    """An int or a finite float, optionally bounded; ``null_means`` (nullable settings) says what
    null selects, for the message."""

    kind: str  # "int" (refuses 2.5, "3", true) or "float" (refuses "abc", nan, inf, true)
    low: float | None = None
    low_inclusive: bool = True
    high: float | None = None
    high_inclusive: bool = True
    nullable: bool = False
    null_means: str = ""


def _range_text(spec: Number) -> str:
    if spec.high is None:
        return f"{'>=' if spec.low_inclusive else '>'} {spec.low}"
    left = "[" if spec.low_inclusive else "("
    right = "]" if spec.high_inclusive else ")"
    return f"in {left}{spec.low}, {spec.high}{right}"


def check_number(key: str, value: Any, spec: Number) -> Any:
    """``value`` when it fits ``spec`` (an int for an "int" setting, so a whole ``2.0`` comes back as
    ``2``), None for an allowed null; a ConfigError naming ``key`` otherwise."""
    want = "an integer" if spec.kind == "int" else "a finite number"
    or_null = f", or null ({spec.null_means})" if spec.nullable and spec.null_means else ""
    if value is None:
        if spec.nullable:
            return None
        raise ConfigError(f"{key}=null must be {want}")
    bad_type = isinstance(value, bool) or not isinstance(value, (int, float)) or (
        spec.kind == "int" and isinstance(value, float) and not value.is_integer())
    if bad_type or not math.isfinite(float(value)):
        raise ConfigError(f"{key}={value!r} must be {want}{or_null}")
    low, high = spec.low, spec.high
    if (low is not None and (value < low or (value == low and not spec.low_inclusive))) or (
            high is not None and (value > high or (value == high and not spec.high_inclusive))):
        raise ConfigError(f"{key}={value!r} must be {_range_text(spec)}{or_null}")
    return int(value) if spec.kind == "int" else value


def optional_setting(node: Any, key: str) -> Any:
    """``node[key]`` of a config node, a mapping or an attribute object; None when it has no such
    key (for the keys whose null means "the dataset's own" or "all rows")."""
    if node is None:
        return None
    if isinstance(node, Mapping) or hasattr(node, "keys"):
        return node[key] if key in node else None
    return getattr(node, key, None)


def setting(node: Any, key: str, prefix: str) -> Any:
    """``node[key]`` (may be null); a ConfigError naming ``prefix.key`` when the node has no such key.

    The YAML under ``conf/`` is the one home of every default: code does not carry a second copy
    that a hand-written config would silently fall back to."""
    present = node is not None and (
        key in node if isinstance(node, Mapping) or hasattr(node, "keys") else hasattr(node, key))
    if not present:
        raise ConfigError(f"{prefix}.{key} is not set: add it to your {prefix} config "
                          f"(every shipped config under conf/{prefix}/ that reads it sets it)")
    return optional_setting(node, key)


def check_flag(key: str, value: Any) -> bool:
    """``value`` when it is a boolean; a ConfigError naming ``key`` otherwise (``"false"`` is a string,
    and ``bool("false")`` would be True)."""
    if not isinstance(value, bool):
        raise ConfigError(f"{key}={value!r} must be true or false")
    return value


def check_group(group: Mapping | None, prefix: str, schema: Mapping[str, Number]) -> None:
    """Check every key of ``schema`` that ``group`` (a config node such as ``cfg.task``) holds."""
    if group is None:
        return
    for key, spec in schema.items():
        if key in group:
            check_number(f"{prefix}.{key}", group[key], spec)


# The bounds most settings share, named once so that the same kind of setting has the same rule.
POSITIVE_INT = Number("int", 1)
NON_NEGATIVE_INT = Number("int", 0)
SEED = NON_NEGATIVE_INT
ALL_ROWS = Number("int", 1, nullable=True, null_means="all rows")
POSITIVE = Number("float", 0, False)        # learning rates, scales, temperatures
NON_NEGATIVE = Number("float", 0)           # weight decay, loss weights
FRACTION = Number("float", 0, False, 1, False)  # a share of the rows: (0, 1)
BELOW_ONE = Number("float", 0, True, 1, False)  # [0, 1): dropout probabilities, Adam's betas

# Keys of conf/task/**: the common ones first, then those of particular loaders.
TASK_SCHEMA: dict[str, Number] = {
    "max_length": POSITIVE_INT, "max_train_samples": ALL_ROWS, "max_eval_samples": ALL_ROWS,
    "subsample_seed": SEED,
    # chain-of-thought tasks (data/cot.py, train/adapters/cot.py)
    "max_input_length": POSITIVE_INT, "max_target_length": POSITIVE_INT, "generation_max_length": POSITIVE_INT,
    "valid_fraction": FRACTION, "split_seed": SEED,
    # hub tasks whose source may lack a validation split (data/hub_tasks.py): null carves none, and
    # such a source is then refused by the loader with a line asking for a fraction
    "validation_fraction": Number(
        "float", 0, False, 1, False, nullable=True, null_means="carve no validation split"),
    # the generated default task (data/synthetic.py)
    "num_train": POSITIVE_INT, "num_eval": POSITIVE_INT, "num_test": POSITIVE_INT,
    "num_classes": Number("int", 2), "label_noise": Number("float", 0, True, 1, True), "generator_seed": SEED,
}
# Keys of conf/model/*.yaml.
MODEL_SCHEMA: dict[str, Number] = {
    "lr": POSITIVE,
    "dropout": Number("float", 0, True, 1, False, nullable=True, null_means="keep the architecture's"),
}
# Keys of model.tiny (the offline tiny models' spec, read by models/tiny.py). That the heads divide the
# hidden size is left to transformers, whose error names both numbers.
TINY_SCHEMA: dict[str, Number] = {
    "vocab_size": POSITIVE_INT, "hidden_size": POSITIVE_INT, "num_layers": POSITIVE_INT,
    "num_heads": POSITIVE_INT, "intermediate_size": POSITIVE_INT, "max_position_embeddings": POSITIVE_INT,
    "init_seed": SEED,
}
# Keys of conf/head/*.yaml (masking, generation; pooling has none).
HEAD_SCHEMA: dict[str, Number] = {
    "hidden_size": Number("int", 1, nullable=True, null_means="the backbone's hidden size"),
    "dropout": BELOW_ONE,
}
# Keys of conf/peft/*.yaml (LoRA, RoCoFT).
PEFT_SCHEMA: dict[str, Number] = {
    "rank": POSITIVE_INT, "alpha": POSITIVE, "dropout": BELOW_ONE,
}


# The true/false settings of those groups (trust_remote_code above all: "false" as a string must
# not switch on running a model repository's code).
FLAGS: dict[str, tuple[str, ...]] = {
    "task": ("with_passage", "require_train"), "model": ("trust_remote_code",), "peft": ("train_bias",),
}


def check_task(task: Mapping | None) -> None:
    check_group(task, "task", TASK_SCHEMA)


def check_settings(cfg: Mapping) -> None:
    """The ``task.*``, ``model.*``, ``head.*`` and ``peft.*`` numbers of a composed run config (the
    training loop's own ``trainer.*`` are checked by ``cmiexp.train.settings.check_config``, which
    calls this)."""
    check_task(cfg.get("task"))
    model = cfg.get("model")
    check_group(model, "model", MODEL_SCHEMA)
    if model is not None:
        check_group(model.get("tiny"), "model.tiny", TINY_SCHEMA)
    check_group(cfg.get("head"), "head", HEAD_SCHEMA)
    check_group(cfg.get("peft"), "peft", PEFT_SCHEMA)
    for group, keys in FLAGS.items():
        node = cfg.get(group)
        for key in keys:
            if node is not None and key in node:
                check_flag(f"{group}.{key}", node[key])


__all__ = [
    "ALL_ROWS", "BELOW_ONE", "FLAGS", "FRACTION", "HEAD_SCHEMA", "MODEL_SCHEMA", "NON_NEGATIVE", "NON_NEGATIVE_INT", "Number",
    "PEFT_SCHEMA", "POSITIVE", "POSITIVE_INT", "SEED", "TASK_SCHEMA", "TINY_SCHEMA", "check_flag", "check_group", "check_number",
    "check_settings", "check_task", "optional_setting", "setting",
]
