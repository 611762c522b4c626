"""The process environment of a run: third-party logging kept quiet, peak memory read back."""

from __future__ import annotations

import logging

import torch


def quiet_libraries() -> None:
    """Silence transformers' and datasets' INFO chatter and progress bars (ours report progress)."""
    import datasets
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.utils.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    logging.getLogger("accelerate").setLevel(logging.WARNING)


def peak_memory_mb(device) -> float:
    """Peak memory of this process in MiB: CUDA allocator peak on a GPU, max RSS on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB
    except ImportError:  # pragma: no cover - non-POSIX
        return float("nan")


__all__ = ["peak_memory_mb", "quiet_libraries"]
