"""How a run is spread over processes (DDP, FSDP), as recorded in results.json, and the check that
an FSDP launch really got FSDP.

``accelerate launch --config_file conf/accelerate/fsdp.yaml`` only sets environment variables
(``ACCELERATE_USE_FSDP`` and ``FSDP_*``); the Accelerator applies them only on accelerators. On
CPU processes Accelerate 1.x picks plain data parallel over gloo and ignores the FSDP settings
without a word, so a run that asked for sharding would silently hold the whole model on every
process. ``check_fsdp_applied`` turns that into an error naming the config.
"""

from __future__ import annotations

import os

from cmiexp.errors import ConfigError


def fsdp_requested() -> bool:
    """Whether the launcher asked for FSDP (what ``accelerate launch`` with an FSDP config sets)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def check_fsdp_applied(accelerator) -> None:
    """Refuse a run launched with an FSDP config whose Accelerator is not sharding."""
    from accelerate.utils import DistributedType

    if fsdp_requested() and accelerator.distributed_type != DistributedType.FSDP:
        raise ConfigError(
            f"accelerate launch asked for FSDP (ACCELERATE_USE_FSDP=true, e.g. conf/accelerate/fsdp.yaml) but "
            f"Accelerate set up {accelerator.distributed_type.value}: FSDP needs GPUs (Accelerate never shards "
            "CPU/gloo processes); on CPU use `accelerate launch --multi_gpu --num_processes N -m cmiexp ...` "
            "(data parallel), on GPUs check that CUDA is visible")


def fsdp_units(model) -> list[str]:
    """Class names of the modules that FSDP wrapped (each one is gathered and freed as a unit);
    empty when the model is not FSDP-wrapped. Covers FSDP2 (``fully_shard``) and FSDP1."""
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    names = []
    for module in model.modules():
        if isinstance(module, FullyShardedDataParallel):
            names.append(type(module.module).__name__)
        elif isinstance(module, FSDPModule):
            # fully_shard swaps the class for a new FSDP<cls>(FSDPModule, cls): name the original.
            names.append(next(c for c in type(module).__mro__ if not issubclass(c, FSDPModule)).__name__)
    return names


def distributed_fields(accelerator, model) -> dict:
    """results.json fields: the distributed type (NO, MULTI_CPU, MULTI_GPU, FSDP, ...) and, under
    FSDP, its version, state-dict type and the wrapped units (read from the prepared model)."""
    from accelerate.utils import DistributedType

    fields = {"distributed_type": accelerator.distributed_type.value}
    if accelerator.distributed_type == DistributedType.FSDP:
        plugin = accelerator.state.fsdp_plugin
        units = fsdp_units(model)
        fields["fsdp"] = {
            "version": int(getattr(plugin, "fsdp_version", 1)),
            "state_dict_type": getattr(plugin.state_dict_type, "name", str(plugin.state_dict_type)),
            "num_units": len(units),
            "unit_classes": sorted(set(units)),
        }
    return fields


def uses_fsdp(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


__all__ = ["check_fsdp_applied", "distributed_fields", "fsdp_requested", "fsdp_units", "uses_fsdp"]
