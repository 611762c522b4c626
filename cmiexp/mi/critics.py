"""Critics f(x, y) that return the full ``[B, B]`` score matrix of a batch.

Every critic here is *stacked*: it holds ``num_critics`` independent networks whose weights
carry a leading critic dimension, and evaluates all of them with batched matmuls (einsum). A
FlowNIB probe uses one critic per network layer and trains all layers in one computation; the
plain :class:`ConcatCritic` / :class:`SeparableCritic` are the ``num_critics=1`` case with 2-D
inputs and a ``[B, B]`` output.

Each critic k is initialised from its own generator seeded with ``seeds[k]`` (uniform
+-1/sqrt(fan_in), like ``torch.nn.Linear``), so critic k of a stack is bit-identical at
initialisation to a single critic built with seed ``seeds[k]``.

* concat: f(x, y) = w^T relu(g(x) + h(y)) + c, with g, h MLPs. The first joint layer of an MLP on
  [x; y] is additive (W [x; y] = W_x x + W_y y), so all B*B pairs are evaluated by broadcasting a
  [B, 1, H] and a [1, B, H] tensor: O(B^2 H) instead of O(B^2 H (dx + dy)). With
  ``side_layers=0`` (g, h linear) this is exactly a one-hidden-layer MLP on the concatenation,
  hence a universal approximator; ``side_layers > 0`` adds per-input nonlinear features first
  (cheap: O(B)), ``pair_layers > 0`` adds hidden layers on the pairs (expensive: O(B^2 H^2)).
* separable: f(x, y) = g(x)^T h(y), O(B^2 E) with one matmul.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn

from cmiexp.errors import ConfigError, DataError


#: largest pair tensor (elements) a concat critic slice builds at once: 4M floats = 16 MB
PAIR_CHUNK_ELEMS = 1 << 22


def _uniform(shape, bound: float, gen: torch.Generator) -> torch.Tensor:
    return (torch.rand(shape, generator=gen) * 2.0 - 1.0) * bound


class StackedMLP(nn.Module):
    """``num_critics`` independent MLPs with sizes ``sizes`` (ReLU between layers, linear output)."""

    def __init__(self, num_critics: int, sizes: Sequence[int], gens: Sequence[torch.Generator]):
        super().__init__()
        if len(sizes) < 2:
            raise ConfigError(f"an MLP needs at least input and output sizes, got {list(sizes)}")
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
            bound = 1.0 / math.sqrt(fan_in)
            w = torch.stack([_uniform((fan_in, fan_out), bound, g) for g in gens])
            b = torch.stack([_uniform((fan_out,), bound, g) for g in gens])
            self.weights.append(nn.Parameter(w))
            self.biases.append(nn.Parameter(b))
        self.num_critics = num_critics

    def forward_slice(self, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """The MLPs of critics start..stop-1 on x [stop - start, B, d]."""
        n = len(self.weights)
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            x = torch.einsum("kbi,kio->kbo", x, w[start:stop]) + b[start:stop, None, :]
            if i < n - 1:
                x = torch.relu(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, d] (shared by all critics) or [K, B, d]
        n = len(self.weights)
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            if x.dim() == 2:
                x = torch.einsum("bi,kio->kbo", x, w)
            else:
                x = torch.einsum("kbi,kio->kbo", x, w)
            x = x + b[:, None, :]
            if i < n - 1:
                x = torch.relu(x)
        return x


def _generators(num_critics: int, seeds: Sequence[int] | None, seed: int) -> list[torch.Generator]:
    if seeds is None:
        seeds = [seed + k for k in range(num_critics)]
    if len(seeds) != num_critics:
        raise ConfigError(f"seeds must have one entry per critic ({num_critics}), got {len(seeds)}")
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


def _check_inputs(x: torch.Tensor, y: torch.Tensor, k: int):
    for name, t in (("x", x), ("y", y)):
        if t.dim() not in (2, 3) or (t.dim() == 3 and t.shape[0] != k):
            raise DataError(f"critic input {name} must be [B, d] or [{k}, B, d], got {tuple(t.shape)}")
    if x.shape[-2] != y.shape[-2]:
        raise DataError(f"critic inputs x and y have different batch sizes {x.shape[-2]} vs {y.shape[-2]}")


class StackedConcatCritic(nn.Module):
    """K concat critics f_k(x, y) = w_k^T relu(g_k(x) + h_k(y)) + c_k; returns [K, B, B]."""

    def __init__(self, num_critics: int, dx: int, dy: int, hidden: int = 128, side_layers: int = 1,
                 pair_layers: int = 0, seeds: Sequence[int] | None = None, seed: int = 0):
        super().__init__()
        if hidden < 1 or side_layers < 0 or pair_layers < 0:
            raise ConfigError(f"critic sizes must be positive: hidden={hidden}, side_layers={side_layers}, "
                              f"pair_layers={pair_layers}")
        gens = _generators(num_critics, seeds, seed)
        self.num_critics = num_critics
        self.g = StackedMLP(num_critics, [dx] + [hidden] * (side_layers + 1), gens)
        self.h = StackedMLP(num_critics, [dy] + [hidden] * (side_layers + 1), gens)
        self.pair = StackedMLP(num_critics, [hidden] * (pair_layers + 1), gens) if pair_layers else None
        bound = 1.0 / math.sqrt(hidden)
        self.w_out = nn.Parameter(torch.stack([_uniform((hidden,), bound, g) for g in gens]))
        self.b_out = nn.Parameter(torch.stack([_uniform((), bound, g) for g in gens]))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        _check_inputs(x, y, self.num_critics)
        a = self.g(x)  # [K, B, H]
        b = self.h(y)  # [K, B, H]
        k, bsz, hdim = a.shape
        # The [K, B, B, H] pair tensor of all critics at once (54M floats for 26 critics of a
        # BERT-base probe) runs from main memory; a slice of a few critics stays in cache, so the
        # stacked critics are evaluated in slices of at most PAIR_CHUNK_ELEMS elements each.
        step = max(1, PAIR_CHUNK_ELEMS // max(1, bsz * b.shape[1] * hdim))
        outs = []
        for s in range(0, k, step):
            pairs = torch.relu(a[s:s + step, :, None, :] + b[s:s + step, None, :, :])
            if self.pair is not None:
                kc, b1, b2, _ = pairs.shape
                pairs = torch.relu(self.pair.forward_slice(pairs.reshape(kc, b1 * b2, hdim), s, s + kc)).reshape(
                    kc, b1, b2, hdim)
            outs.append(torch.einsum("kijh,kh->kij", pairs, self.w_out[s:s + step]) + self.b_out[s:s + step, None, None])
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def pair_scores(self, x: torch.Tensor, y: torch.Tensor, block: int = 256) -> torch.Tensor:
        """Scores [K, Bx, By] of every x row against every y row (the two sizes may differ),
        built block by block so the [*, *, H] pair tensor never exceeds block^2 * H per critic."""
        a, b = self.g(x), self.h(y)  # [K, Bx, H], [K, By, H]
        rows = []
        for i in range(0, a.shape[1], block):
            cols = []
            for j in range(0, b.shape[1], block):
                pairs = torch.relu(a[:, i:i + block, None, :] + b[:, None, j:j + block, :])
                if self.pair is not None:
                    k, bi, bj, hdim = pairs.shape
                    pairs = torch.relu(self.pair(pairs.reshape(k, bi * bj, hdim))).reshape(k, bi, bj, hdim)
                cols.append(torch.einsum("kijh,kh->kij", pairs, self.w_out) + self.b_out[:, None, None])
            rows.append(torch.cat(cols, dim=2))
        return torch.cat(rows, dim=1)


class StackedSeparableCritic(nn.Module):
    """K separable critics f_k(x, y) = g_k(x)^T h_k(y); returns [K, B, B]."""

    def __init__(self, num_critics: int, dx: int, dy: int, hidden: int = 128, embed_dim: int = 32,
                 side_layers: int = 1, seeds: Sequence[int] | None = None, seed: int = 0):
        super().__init__()
        if hidden < 1 or embed_dim < 1 or side_layers < 0:
            raise ConfigError(f"critic sizes must be positive: hidden={hidden}, embed_dim={embed_dim}, "
                              f"side_layers={side_layers}")
        gens = _generators(num_critics, seeds, seed)
        self.num_critics = num_critics
        self.g = StackedMLP(num_critics, [dx] + [hidden] * side_layers + [embed_dim], gens)
        self.h = StackedMLP(num_critics, [dy] + [hidden] * side_layers + [embed_dim], gens)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        _check_inputs(x, y, self.num_critics)
        return torch.einsum("kie,kje->kij", self.g(x), self.h(y))

    def pair_scores(self, x: torch.Tensor, y: torch.Tensor, block: int = 0) -> torch.Tensor:
        """Scores [K, Bx, By] of every x row against every y row (one matmul; ``block`` unused)."""
        return torch.einsum("kie,kje->kij", self.g(x), self.h(y))


CRITICS = ("concat", "separable")


def make_stacked_critic(kind: str, num_critics: int, dx: int, dy: int, *, hidden: int = 128,
                        side_layers: int = 1, pair_layers: int = 0, embed_dim: int = 32,
                        seeds: Sequence[int] | None = None, seed: int = 0) -> nn.Module:
    if kind == "concat":
        return StackedConcatCritic(num_critics, dx, dy, hidden, side_layers, pair_layers, seeds, seed)
    if kind == "separable":
        return StackedSeparableCritic(num_critics, dx, dy, hidden, embed_dim, side_layers, seeds, seed)
    raise ConfigError(f"critic={kind!r} is unknown; choose one of {', '.join(CRITICS)}")


class _Single(nn.Module):
    """A one-critic stack used with [B, d] inputs, returning [B, B]."""

    def __init__(self, stacked: nn.Module):
        super().__init__()
        self.stacked = stacked

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or y.dim() != 2:
            raise DataError(f"critic inputs must be [B, d], got x {tuple(x.shape)} and y {tuple(y.shape)}")
        return self.stacked(x, y)[0]


class ConcatCritic(_Single):
    """f(x, y) = w^T relu(g(x) + h(y)) + c evaluated on all B x B pairs -> [B, B]."""

    def __init__(self, dx: int, dy: int, hidden: int = 128, side_layers: int = 1, pair_layers: int = 0,
                 seed: int = 0):
        super().__init__(StackedConcatCritic(1, dx, dy, hidden, side_layers, pair_layers, seeds=[seed]))


class SeparableCritic(_Single):
    """f(x, y) = g(x)^T h(y) -> [B, B]."""

    def __init__(self, dx: int, dy: int, hidden: int = 128, embed_dim: int = 32, side_layers: int = 1,
                 seed: int = 0):
        super().__init__(StackedSeparableCritic(1, dx, dy, hidden, embed_dim, side_layers, seeds=[seed]))
