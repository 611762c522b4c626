"""Negative sampling helpers.

The bounds in :mod:`cmiexp.mi.bounds` use every off-diagonal pair of a batch. When a method can
afford only one negative per sample (y_{sigma(i)} paired with x_i), sigma must be a derangement:
a plain random permutation leaves about one fixed point per batch, i.e. a *positive* pair
silently counted as a negative.
"""

from __future__ import annotations

import torch

from cmiexp.errors import ConfigError


def derangement(n: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """A uniformly random permutation of ``range(n)`` with no fixed points (n >= 2).

    Rejection sampling: a random permutation is a derangement with probability ~1/e, so the
    expected number of draws is ~2.7. After 64 failures (probability < 1e-12) we fall back to a
    random n-cycle, which is always a derangement.
    """
    if n < 2:
        raise ConfigError(f"derangement needs n >= 2 (a single element cannot move), got n={n}")
    ar = torch.arange(n)
    for _ in range(64):
        p = torch.randperm(n, generator=generator)
        if not bool((p == ar).any()):
            return p.to(device) if device is not None else p
    order = torch.randperm(n, generator=generator)
    p = torch.empty(n, dtype=torch.long)
    p[order] = order.roll(-1)
    return p.to(device) if device is not None else p


def shuffled_pairs(y: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Rows of ``y`` reordered by a derangement: row i of the result is never y_i."""
    return y[derangement(y.shape[0], generator=generator, device=y.device)]
