"""Length-grouped, still shuffled and seeded, training order (``trainer.group_by_length``).

With dynamic padding every batch is padded to its longest row, so a batch mixing a 5-token and a
120-token sentence pays for 120 tokens per row. Grouping rows of similar length into the same
batch removes most of that padding without giving up a random order:

1. a random permutation of the training set, a function of (seed, epoch) only;
2. cut into "mega-chunks" of ``chunk_batches`` global batches, each sorted by length (longest first),
   and cut into global batches;
3. the full global batches are shuffled again (same generator), the one short tail batch, if any,
   stays last (the loop's handling of the padded last batch relies on it).

The sampler yields a flat index order and the DataLoader batches it with the per-process batch
size; Accelerate deals consecutive local batches to the processes round-robin, so global batch
``g`` (``global_batch`` = per-process batch x processes consecutive indices) holds the same rows
on 1 and on N processes: the loss, the optimizer steps and every metric stay the same.
Resuming mid-epoch is exact because the order depends on (seed, epoch) and nothing else, so
skipping the batches already trained reproduces the rest of the epoch.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch
from torch.utils.data import Sampler

#: Global batches per sorted mega-chunk: large enough to find rows of similar length, small enough
#: that an epoch still mixes short and long sentences across its steps.
DEFAULT_CHUNK_BATCHES = 50


def sequence_lengths(dataset, column: str = "input_ids") -> list[int]:
    """Token count of every row of a tokenised ``datasets.Dataset`` (read from its Arrow column)."""
    import pyarrow.compute as pc

    table = dataset.with_format(None).data  # the Arrow table, no Python rows materialised
    col = table.column(column)
    return [int(v) for v in pc.list_value_length(col).to_pylist()]


def length_grouped_order(lengths: Sequence[int], global_batch: int, seed: int, epoch: int,
                         chunk_batches: int = DEFAULT_CHUNK_BATCHES) -> list[int]:
    """The index order of one epoch (see the module docstring). Pure: the same arguments give the
    same list on every process."""
    if global_batch < 1 or chunk_batches < 1:
        raise ValueError(f"global_batch ({global_batch}) and chunk_batches ({chunk_batches}) must be >= 1")
    n = len(lengths)
    g = torch.Generator()
    g.manual_seed(int(seed) * 1_000_003 + int(epoch))
    perm = torch.randperm(n, generator=g).tolist()
    chunk = global_batch * chunk_batches
    batches: list[list[int]] = []
    for s in range(0, n, chunk):
        part = sorted(perm[s:s + chunk], key=lambda i: -lengths[i])  # stable: ties keep the random order
        batches.extend(part[b:b + global_batch] for b in range(0, len(part), global_batch))
    tail = [batches.pop()] if batches and len(batches[-1]) < global_batch else []
    order = torch.randperm(len(batches), generator=g).tolist()
    return [i for b in order for i in batches[b]] + [i for b in tail for i in b]


class LengthGroupedSampler(Sampler[int]):
    """Sampler over ``lengths`` yielding ``length_grouped_order`` for the current epoch.

    ``global_batch`` is the per-process batch size times the number of processes (the rows one
    optimizer micro-step sees in total). ``set_epoch`` (called through Accelerate's prepared loader)
    selects the epoch's order."""

    def __init__(self, lengths: Sequence[int], global_batch: int, seed: int,
                 chunk_batches: int = DEFAULT_CHUNK_BATCHES):
        self.lengths = list(lengths)
        self.global_batch = int(global_batch)
        self.seed = int(seed)
        self.chunk_batches = int(chunk_batches)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        return iter(length_grouped_order(self.lengths, self.global_batch, self.seed, self.epoch, self.chunk_batches))


def padded_tokens(lengths: Sequence[int], order: Sequence[int], batch_size: int) -> int:
    """Tokens a dynamically padded loader processes for ``order`` cut into ``batch_size`` batches
    (each batch costs its longest row times its rows): the quantity length grouping lowers."""
    total = 0
    for s in range(0, len(order), batch_size):
        b = [lengths[i] for i in order[s:s + batch_size]]
        total += max(b) * len(b)
    return total


__all__ = ["DEFAULT_CHUNK_BATCHES", "LengthGroupedSampler", "length_grouped_order", "padded_tokens",
           "sequence_lengths"]
