"""What a training step needs besides the model and the objective: the padded rows of the last
global batch kept out of the loss, and the loss read on the host only at log time (no
synchronisation per step)."""

from __future__ import annotations

import torch

from cmiexp.errors import TrainingDiverged


def batch_rows(batch: dict) -> int:
    return int(next(v for v in batch.values() if hasattr(v, "shape")).shape[0])


def drop_padded_rows(batch: dict, local_index: int, rank: int, world: int, batch_size: int,
                     num_examples: int) -> tuple[dict, float, int]:
    """Keep the duplicated rows of the last global batch out of the loss.

    With N processes Accelerate pads the last global batch with repeated examples (even batches),
    so every rank steps together. Returns (batch without its padded rows, loss weight, real rows in
    the global batch).
    The weight makes the ranks' mean losses, averaged by DDP, equal the mean over the real rows of
    the global batch, i.e. what one process with the whole batch computes. A rank holding only
    padding keeps its batch (it must still run forward/backward for the gradient all-reduce) with
    weight 0. One process: the batch unchanged, weight 1."""
    from cmiexp.objectives.cmi_objectives import full_pass_valid_mask

    n = batch_rows(batch)
    if world <= 1:
        return batch, 1.0, n
    real = int(full_pass_valid_mask(local_index, rank, world, batch_size, n, num_examples).sum())
    global_real = min(world * batch_size, max(num_examples - local_index * world * batch_size, 0))
    if real == n and global_real == world * batch_size:
        return batch, 1.0, global_real
    if real == 0 or global_real == 0:
        return batch, 0.0, global_real
    if real < n:  # the valid rows are a prefix: padding is appended at the end of a local batch
        batch = {k: (v[:real] if hasattr(v, "shape") and v.ndim > 0 and v.shape[0] == n else v)
                 for k, v in batch.items()}
    return batch, real * world / global_real, global_real


def logged_scalars(extra: dict) -> dict:
    """An objective's extra terms as floats, read once at log time (they may be device tensors)."""
    tensors = {k: v for k, v in extra.items() if isinstance(v, torch.Tensor)}
    out = {k: v for k, v in extra.items() if k not in tensors}
    if tensors:  # one host synchronisation for all of them
        values = torch.stack([v.detach().float().reshape(()) for v in tensors.values()]).tolist()
        out.update(zip(tensors, values))
    return out


class FiniteLossWatch:
    """Remembers, on the device, the first step whose loss was not finite; ``check`` (called at log,
    eval, checkpoint and epoch-end time, never per step) raises TrainingDiverged naming that step."""

    def __init__(self, device):
        self.step = torch.full((), -1, dtype=torch.long, device=device)
        self.epoch = torch.full((), -1, dtype=torch.long, device=device)
        self.value = torch.zeros((), device=device)

    def observe(self, loss: torch.Tensor, step: int, epoch: int) -> None:
        loss = loss.detach().float().reshape(())
        new = ~torch.isfinite(loss) & (self.step < 0)
        self.step = torch.where(new, torch.full_like(self.step, step), self.step)
        self.epoch = torch.where(new, torch.full_like(self.epoch, epoch), self.epoch)
        self.value = torch.where(new, loss, self.value)

    def check(self) -> None:
        step, epoch, value = torch.stack([self.step.double(), self.epoch.double(), self.value.double()]).tolist()
        if step >= 0:
            raise TrainingDiverged(f"loss is {value} at step {int(step)} (epoch {int(epoch)}); lower trainer.lr "
                                   "or check the objective's weights")


__all__ = ["FiniteLossWatch", "batch_rows", "drop_padded_rows", "logged_scalars"]
