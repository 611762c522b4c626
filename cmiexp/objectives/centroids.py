"""Class-centroid estimator Q_y = E[P_X | Y=y] for the CMI objectives.

Modes
-----
``fixed``  centroids come from one full pass over the training set with the starting model
           and never change (the MCMI-teacher recipe).
``epoch``  a full pass at the start of every epoch recomputes them from the current model.
``ema``    one full pass initialises them; afterwards every training batch moves them by
           Q_y <- m * Q_y + (1 - m) * mean_{x in batch, y_x = y} P_x (classes absent from the
           batch keep their centroid).
``online`` no full pass at all: the softmax outputs of the training forward passes (already
           computed for the loss) are summed per class over the epoch, and at the epoch's end
           their class means become the next epoch's Q_y. In the first epoch Q_y is the running
           class mean of the outputs seen so far in that epoch, this batch included (on the first
           batch that is the batch's own class means, i.e. the mini-batch CMI). The batch sums
           are all-reduced every step (a [C, C+1] tensor, no host synchronisation), so every
           process, and the checkpoint rank 0 writes, holds the global sums.

Distributed use: each process accumulates per-class *sums* and *counts* over its own shard;
``finalize(reduce_fn)`` SUMs both across processes before dividing, so every rank ends with
identical centroids (a mean of per-rank means would weight shards wrongly). Accumulation is
in float64 so the result does not depend on how the data was split across ranks; centroids
are stored as fp32.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from cmiexp.errors import CheckpointError, DataError

ReduceFn = Callable[[torch.Tensor], Optional[torch.Tensor]]

MODES = ("fixed", "epoch", "ema", "online")


def class_sums(probs: torch.Tensor, labels: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class sums of probability rows and per-class counts.

    ``probs`` [N, C], ``labels`` [N] ints in [0, num_classes). Returns (sums [num_classes, C]
    in the dtype of ``probs``, counts [num_classes] in the same dtype so both can be reduced
    in one collective).
    """
    if probs.dim() != 2 or labels.dim() != 1 or probs.shape[0] != labels.shape[0]:
        raise ValueError(f"class_sums needs probs [N, C] and labels [N], got {tuple(probs.shape)} and {tuple(labels.shape)}")
    labels = labels.long()
    sums = torch.zeros(num_classes, probs.shape[1], dtype=probs.dtype, device=probs.device)
    sums.index_add_(0, labels, probs)
    counts = torch.bincount(labels, minlength=num_classes).to(probs.dtype)
    return sums, counts


def torch_distributed_sum(t: torch.Tensor) -> torch.Tensor:
    """All-reduce (SUM) ``t`` in place over the default process group and return it.

    A no-op when torch.distributed is unavailable, not initialised, or has one process.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def _reduce(t: torch.Tensor, reduce_fn: ReduceFn | None) -> torch.Tensor:
    if reduce_fn is None:
        return t
    out = reduce_fn(t)
    # torch.distributed.all_reduce works in place and returns None; accelerator.reduce returns.
    return t if out is None else out


def _absent_message(absent: list[int]) -> str:
    if len(absent) == 1:
        return f"class {absent[0]} has no training examples; CMI centroids need every class"
    ids = ", ".join(str(a) for a in absent)
    return f"classes {ids} have no training examples; CMI centroids need every class"


class CentroidEstimator:
    """Holds ``centroids`` [C, C] fp32 (row y = Q_y) and the running per-class accumulators."""

    def __init__(self, num_classes: int, mode: str = "fixed", momentum: float = 0.9):
        if mode not in MODES:
            raise ValueError(f"centroid mode must be one of {', '.join(MODES)}, got {mode!r}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"centroid momentum must be in [0, 1), got {momentum}")
        if num_classes < 2:
            raise ValueError(f"CMI centroids need at least 2 classes, got {num_classes}")
        self.num_classes = int(num_classes)
        self.mode = mode
        self.momentum = float(momentum)
        # Until a full pass, uniform placeholders; ``initialized`` says whether they are real.
        self.centroids = torch.full((num_classes, num_classes), 1.0 / num_classes, dtype=torch.float32)
        self.counts = torch.zeros(num_classes, dtype=torch.float64)
        self.initialized = False
        self._sums: torch.Tensor | None = None
        self._counts: torch.Tensor | None = None
        # online mode: [C, C + 1] float64, per-class probability sums and (last column) counts of
        # the current epoch, summed over processes. None = nothing seen yet this epoch.
        self.online: torch.Tensor | None = None

    # --- schedule ---------------------------------------------------------------------------
    def needs_full_pass(self, epoch: int) -> bool:
        """Whether the caller must run ``accumulate``/``finalize`` over the training set before
        training epoch ``epoch``: every epoch in ``epoch`` mode; otherwise only while there are
        no centroids yet (a fresh run's epoch 0 -- never after a resume restored the state)."""
        if self.mode == "epoch":
            return True
        if self.mode == "online":
            return False
        return not self.initialized

    # --- full pass ----------------------------------------------------------------------------
    def reset_accumulators(self) -> None:
        self._sums = None
        self._counts = None

    @torch.no_grad()
    def accumulate(self, logits: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """Add one batch of the full pass. ``valid`` [N] bool marks rows to keep (False for the
        duplicated samples a distributed sampler pads its last batch with)."""
        probs = F.softmax(logits.detach().float(), dim=-1)
        labels = labels.detach().long()
        if valid is not None:
            valid = valid.to(device=probs.device, dtype=torch.bool)
            if valid.shape != labels.shape:
                raise ValueError(f"valid mask shape {tuple(valid.shape)} does not match labels {tuple(labels.shape)}")
            probs, labels = probs[valid], labels[valid]
        if probs.shape[1] != self.num_classes:
            raise ValueError(f"logits have {probs.shape[1]} classes, estimator has {self.num_classes}")
        sums, counts = class_sums(probs.double(), labels, self.num_classes)
        if self._sums is None:
            self._sums, self._counts = sums, counts
        else:
            self._sums += sums.to(self._sums.device)
            self._counts += counts.to(self._counts.device)

    @torch.no_grad()
    def finalize(self, reduce_fn: ReduceFn | None = None) -> torch.Tensor:
        """Finish a full pass: SUM the per-class sums and counts over processes with
        ``reduce_fn`` (e.g. ``torch_distributed_sum`` or ``lambda t: accelerator.reduce(t, "sum")``;
        every rank must call it, even one that accumulated nothing), then divide. Raises
        DataError if some class was never seen. Returns the new centroids."""
        if self._sums is None:
            # A rank with an empty shard still has to join the collective.
            dev = self.centroids.device
            self._sums = torch.zeros(self.num_classes, self.num_classes, dtype=torch.float64, device=dev)
            self._counts = torch.zeros(self.num_classes, dtype=torch.float64, device=dev)
        packed = torch.cat([self._sums, self._counts.unsqueeze(1)], dim=1).contiguous()
        packed = _reduce(packed, reduce_fn)
        sums, counts = packed[:, :-1], packed[:, -1]
        self.reset_accumulators()
        absent = [int(i) for i in torch.nonzero(counts == 0).flatten().tolist()]
        if absent:
            raise DataError(_absent_message(absent))
        self.centroids = (sums / counts.unsqueeze(1)).float()
        self.counts = counts.clone()
        self.initialized = True
        return self.centroids

    # --- EMA ----------------------------------------------------------------------------------
    @torch.no_grad()
    def ema_update(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        reduce_fn: ReduceFn | None = None,
        valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Move each centroid towards its class mean in this batch (summed over processes with
        ``reduce_fn`` first, so ranks stay identical). Classes absent from the (global) batch
        keep their centroid. Needs initialised centroids (a full pass first)."""
        if self.mode != "ema":
            raise RuntimeError(f"ema_update called on a centroid estimator in {self.mode!r} mode")
        if not self.initialized:
            raise RuntimeError("ema_update before the centroids were initialised by a full pass")
        probs = F.softmax(logits.detach().float(), dim=-1)
        labels = labels.detach().long()
        if valid is not None:
            valid = valid.to(device=probs.device, dtype=torch.bool)
            probs, labels = probs[valid], labels[valid]
        sums, counts = class_sums(probs.double(), labels, self.num_classes)
        packed = _reduce(torch.cat([sums, counts.unsqueeze(1)], dim=1).contiguous(), reduce_fn)
        sums, counts = packed[:, :-1], packed[:, -1]
        present = counts > 0
        means = sums / counts.clamp_min(1).unsqueeze(1)
        c = self.centroids.to(device=means.device, dtype=torch.float64)
        new = torch.where(present.unsqueeze(1), self.momentum * c + (1 - self.momentum) * means, c)
        self.centroids = new.float().to(self.centroids.device)
        return self.centroids

    # --- online -------------------------------------------------------------------------------
    @torch.no_grad()
    def online_add(self, logits: torch.Tensor, labels: torch.Tensor, reduce_fn: ReduceFn | None = None,
                   valid: torch.Tensor | None = None) -> None:
        """Add one training batch's softmax outputs to this epoch's per-class sums (summed over
        processes with ``reduce_fn`` first; every rank must call it every step). ``valid`` marks the
        rows to count (False: duplicated padding rows)."""
        probs = F.softmax(logits.detach().float(), dim=-1).double()
        labels = labels.detach().long()
        if valid is not None:
            valid = valid.to(device=probs.device, dtype=torch.bool)
            probs, labels = probs[valid], labels[valid]
        sums, counts = class_sums(probs, labels, self.num_classes)
        packed = _reduce(torch.cat([sums, counts.unsqueeze(1)], dim=1).contiguous(), reduce_fn)
        self.online = packed.clone() if self.online is None else self.online + packed.to(self.online.device)

    def online_running(self) -> torch.Tensor:
        """Class means of the outputs seen so far this epoch ([C, C] fp32); a class not seen yet gets
        the uniform row (it is used by no row of the loss until one of its examples arrives)."""
        if self.online is None:
            return self.centroids
        sums, counts = self.online[:, :-1], self.online[:, -1:]
        uniform = torch.full_like(sums, 1.0 / self.num_classes)
        return torch.where(counts > 0, sums / counts.clamp_min(1), uniform).float()

    @torch.no_grad()
    def online_finish(self) -> torch.Tensor:
        """End of an epoch: its class means become the centroids. Raises DataError if a class was
        never seen in the epoch."""
        if self.online is None:
            raise RuntimeError("online_finish called before any online_add")
        counts = self.online[:, -1]
        absent = [int(i) for i in torch.nonzero(counts == 0).flatten().tolist()]
        if absent:
            raise DataError(_absent_message(absent))
        self.centroids = (self.online[:, :-1] / counts.unsqueeze(1)).float().to(self.centroids.device)
        self.counts = counts.detach().cpu().clone()
        self.initialized = True
        self.online = None
        return self.centroids

    # --- device / checkpoint ------------------------------------------------------------------
    def to(self, device: torch.device | str) -> "CentroidEstimator":
        """Move the centroids (used every step by the loss) to ``device``."""
        self.centroids = self.centroids.to(device)
        if self.online is not None:
            self.online = self.online.to(device)
        return self

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors only (safetensors-friendly): centroids, counts, initialized (0/1 int64)."""
        state = {
            "centroids": self.centroids.detach().cpu().contiguous().clone(),
            "counts": self.counts.detach().cpu().contiguous().clone(),
            "initialized": torch.tensor(int(self.initialized), dtype=torch.int64),
        }
        if self.online is not None:  # a mid-epoch checkpoint keeps the epoch's partial sums
            state["online"] = self.online.detach().cpu().contiguous().clone()
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for key in ("centroids", "counts", "initialized"):
            if key not in state:
                raise CheckpointError(f"centroid state is missing the key {key!r}")
        c = self.num_classes
        if tuple(state["centroids"].shape) != (c, c):
            raise CheckpointError(
                f"checkpoint key 'centroids' has shape {tuple(state['centroids'].shape)}, expected ({c}, {c})"
            )
        if tuple(state["counts"].shape) != (c,):
            raise CheckpointError(f"checkpoint key 'counts' has shape {tuple(state['counts'].shape)}, expected ({c},)")
        cent = state["centroids"].to(dtype=torch.float32)
        if not bool(torch.isfinite(cent).all()):
            raise CheckpointError("checkpoint key 'centroids' holds non-finite values")
        self.centroids = cent.to(self.centroids.device).clone()
        self.counts = state["counts"].to(torch.float64).clone()
        self.initialized = bool(int(state["initialized"].reshape(-1)[0]))
        self.reset_accumulators()
        online = state.get("online")
        if online is not None and tuple(online.shape) != (c, c + 1):
            raise CheckpointError(f"checkpoint key 'online' has shape {tuple(online.shape)}, expected ({c}, {c + 1})")
        self.online = None if online is None else online.to(dtype=torch.float64, device=self.centroids.device).clone()
