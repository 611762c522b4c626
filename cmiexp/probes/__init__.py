"""Probes that read information-theoretic quantities off trained models (FlowNIB)."""

from cmiexp.probes.flownib import (
    FlowNIBResult,
    alpha_schedule,
    cls_pool,
    compare_runs,
    extract_activations,
    last_token_pool,
    masked_mean_pool,
    participation_ratio,
    select_oic,
    shannon_effective_dim,
    train_flownib,
    train_flownib_single_layer,
    write_outputs,
)

__all__ = [
    "FlowNIBResult", "alpha_schedule", "cls_pool", "compare_runs", "extract_activations", "last_token_pool",
    "masked_mean_pool", "participation_ratio", "select_oic", "shannon_effective_dim", "train_flownib",
    "train_flownib_single_layer", "write_outputs",
]
