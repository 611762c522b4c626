"""Probes that read information-theoretic quantities off trained models (FlowNIB).

The FlowNIB API (``cmiexp.probes.flownib``) is handed on lazily, so that importing
``cmiexp.probes.inputs`` (the probe job's file-only checks) does not import torch."""

from importlib import import_module

# The names of cmiexp.probes.flownib's API (a test checks the two lists agree).
__all__ = [
    "FlowNIBResult", "POOLINGS", "alpha_schedule", "as_result_dict", "check_estimates", "check_pool_inputs",
    "cls_pool", "compare_runs", "covariance_eigenvalues", "effective_dims", "extract_activations",
    "last_token_pool", "masked_mean_pool", "participation_ratio", "plot_deff", "plot_information_plane",
    "plot_oic_by_layer", "pool", "select_oic", "shannon_effective_dim", "summary_line", "train_flownib",
    "train_flownib_single_layer", "write_outputs",
]


def __getattr__(name):
    if name in __all__:  # anything else (a submodule being imported, say) must not load torch
        return getattr(import_module("cmiexp.probes.flownib"), name)
    raise AttributeError(f"module 'cmiexp.probes' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
