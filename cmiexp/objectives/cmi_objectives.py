"""``objective=cmi_min`` and ``objective=mcmi``: the CMI objectives wired into the training loop.

The math is in ``cmiexp.objectives.cmi`` (losses) and ``cmiexp.objectives.centroids`` (the
centroid estimator). This module only decides *when* the centroids Q_y are computed and feeds
them to the losses:

* ``cmi_min`` (CMI-constrained learning):  CE + lam * KL(P_x || Q_y) - beta * Gamma-hat
* ``mcmi``   (max-CMI teacher):            CE - lam * KL(P_x || Q_y), Q fixed from the start model

A centroid *full pass* runs the model (eval mode, no grad) over the unshuffled training loader,
sums P_x per class on every process and all-reduces the sums and counts. Distributed samplers
pad the last global batch with copies of the first samples; those copies are masked out with
``full_pass_valid_mask`` so the centroids are the same for 1 and N processes.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from cmiexp.errors import CmiexpError, ConfigError
from cmiexp.objectives.base import Objective, TrainContext, objective_number, register_objective
from cmiexp.objectives.centroids import MODES, CentroidEstimator
from cmiexp.objectives.cmi import cmi_min_loss, mcmi_loss

log = logging.getLogger("cmiexp")


# --------------------------------------------------------------------------------------------
# The full pass (pure helpers, testable without a training loop)
# --------------------------------------------------------------------------------------------
def full_pass_valid_mask(
    local_batch_index: int, process_index: int, num_processes: int, batch_size: int, batch_len: int, num_examples: int
) -> torch.Tensor:
    """Which rows of one local batch of the prepared, *unshuffled* full-pass loader are real.

    Accelerate's ``BatchSamplerShard`` (``split_batches=False``, ``even_batches=True``, the
    runner's settings) deals global batches round-robin: local batch ``j`` of rank ``r`` is
    global batch ``j * W + r``, i.e. dataset positions ``(j * W + r) * B + k``. Positions
    ``>= num_examples`` are the padding that wraps around to the dataset start, so they are
    the duplicates to drop. With one process there is no padding and the mask is all True.
    """
    start = (local_batch_index * num_processes + process_index) * batch_size
    return (start + torch.arange(batch_len)) < num_examples


def _model_inputs(batch: dict, input_keys) -> dict:
    if input_keys is None:
        return {k: v for k, v in batch.items() if k not in ("labels", "idx")}
    return {k: v for k, v in batch.items() if k in input_keys}


#: Model mode during a centroid full pass: eval (ours: deterministic, identical on 1 and N processes)
#: or train (the ICLRMCMI code: dropout active, so the centroids depend on the dropout draws).
FULL_PASS_MODES = ("eval", "train")


@torch.no_grad()
def full_pass_centroids(
    estimator: CentroidEstimator, model, loader, accelerator, num_examples: int, input_keys=None,
    mode: str = "eval",
) -> torch.Tensor:
    """One pass of ``model`` over ``loader`` (no grad; eval mode, or train mode with
    ``mode="train"``) that recomputes the centroids.

    Every process must call it (the per-class sums are all-reduced at the end). ``loader`` is
    the prepared, unshuffled training loader; ``num_examples`` the training-set size, used to
    mask the padded tail. The model's train/eval mode is restored afterwards. Returns the new
    centroids, placed on ``accelerator.device``.
    """
    if mode not in FULL_PASS_MODES:
        raise ValueError(f"full pass mode must be one of {', '.join(FULL_PASS_MODES)}, got {mode!r}")
    was_training = model.training
    model.train(mode == "train")
    world, rank = int(accelerator.num_processes), int(accelerator.process_index)
    estimator.reset_accumulators()
    batch_size = None
    try:
        for j, batch in enumerate(loader):
            labels = batch["labels"]
            n = int(labels.shape[0])
            if batch_size is None:
                # With W > 1 every local batch is full (even_batches pads the last one); with W = 1
                # only the last can be short. So the first batch's length is the loader's B.
                batch_size = n
            valid = full_pass_valid_mask(j, rank, world, batch_size, n, num_examples)
            logits = model(**_model_inputs(batch, input_keys)).logits
            estimator.accumulate(logits, labels, valid=valid.to(labels.device))
        centroids = estimator.finalize(lambda t: accelerator.reduce(t, "sum"))
    finally:
        estimator.reset_accumulators()
        model.train(was_training)
    seen = int(round(float(estimator.counts.sum())))
    if seen != int(num_examples):
        # Guards the padding mask against a sharding layout it was not written for.
        raise CmiexpError(
            f"centroid full pass counted {seen} training examples across {world} process(es), expected "
            f"{num_examples}; the data loader shards batches in an unsupported way (split_batches?)"
        )
    estimator.to(accelerator.device)
    return centroids


def centroid_spread(centroids: torch.Tensor) -> float:
    """Largest L1 distance between the centroid rows of two classes (0 = Q_y is class-independent)."""
    c = centroids.detach().double().cpu()
    return float(torch.cdist(c, c, p=1).max()) if c.shape[0] > 1 else 0.0


# --------------------------------------------------------------------------------------------
# Objectives
# --------------------------------------------------------------------------------------------
class _CentroidObjective(Objective):
    """Shared centroid bookkeeping: when to run full passes, EMA updates, checkpoint state."""

    requires_classification = True

    def __init__(self, cfg: Any, ctx: TrainContext):
        super().__init__(cfg, ctx)  # refuses regression tasks
        self.lam = objective_number(cfg, "lam", self.name)
        mode = str(cfg.centroids)
        if mode not in MODES:
            raise ConfigError(f"objective.centroids={mode!r}; valid choices: {', '.join(MODES)}")
        self.momentum = objective_number(cfg, "momentum", self.name, 0.0, 1.0, high_open=True)
        # null means eval (conf/objective/*.yaml: null keeps the content hash of older teachers).
        self.full_pass_mode = "eval" if cfg.full_pass_mode is None else str(cfg.full_pass_mode)
        if self.full_pass_mode not in FULL_PASS_MODES:
            raise ConfigError(f"objective.full_pass_mode={self.full_pass_mode!r}; valid choices: "
                              f"{', '.join(FULL_PASS_MODES)}")
        self.estimator = CentroidEstimator(ctx.num_labels, mode=mode, momentum=self.momentum)
        # Full passes over the whole run (checkpointed) and in this process's lifetime; the
        # second one shows that a resume reused the saved centroids instead of recomputing them.
        self.passes_total = 0
        self.passes_session = 0
        self.pass_seconds = 0.0  # wall time of this session's full passes (separates them from step time)
        # Epoch whose start the current centroids were computed at (-1 = none yet). Lets a
        # mid-epoch resume in ``epoch`` mode keep the centroids the interrupted epoch used.
        self.centroid_epoch = -1
        # online mode: the epoch whose training outputs the estimator's running sums hold (-1 = none).
        self.online_epoch = -1

    @property
    def mode(self) -> str:
        return self.estimator.mode

    def setup(self, ctx: TrainContext) -> None:
        self.estimator.to(ctx.accelerator.device)

    def _needs_pass(self, epoch: int) -> bool:
        if self.mode == "online":
            return False  # the centroids come from the training forward passes
        if not self.estimator.initialized:
            return True
        return self.mode == "epoch" and self.centroid_epoch != epoch

    def on_epoch_start(self, ctx: TrainContext, epoch: int) -> None:
        if self.mode == "online":
            self._online_epoch_start(epoch)
            return
        if not self._needs_pass(epoch):
            return
        import time

        t0 = time.time()
        full_pass_centroids(self.estimator, ctx.model, ctx.full_train_loader, ctx.accelerator,
                            ctx.num_train_examples, ctx.extra.get("input_keys"), mode=self.full_pass_mode)
        self.pass_seconds += time.time() - t0
        self.passes_total += 1
        self.passes_session += 1
        self.centroid_epoch = int(epoch)

    def _online_epoch_start(self, epoch: int) -> None:
        # The sums of the previous epoch become this epoch's Q; a resume in the middle of an epoch
        # (online_epoch == epoch) keeps the partial sums and the Q that epoch started with.
        if self.online_epoch == epoch:
            return
        if self.online_epoch >= 0 and self.estimator.online is not None:
            self.estimator.online_finish()
            self.centroid_epoch = int(epoch)
        self.estimator.online = None
        self.online_epoch = int(epoch)

    def _observe(self, logits: torch.Tensor, labels: torch.Tensor, ctx: TrainContext) -> None:
        """online mode: add this batch's outputs to the epoch's class sums. A process holding only
        padding rows of the last global batch (loss weight 0) adds nothing but joins the all-reduce."""
        if self.mode != "online":
            return
        valid = None
        if float(ctx.extra.get("batch_weight", 1.0)) == 0.0:
            valid = torch.zeros(labels.shape[0], dtype=torch.bool, device=labels.device)
        self.estimator.online_add(logits.detach(), labels, valid=valid,
                                  reduce_fn=lambda t: ctx.accelerator.reduce(t, "sum"))

    def _loss_centroids(self, logits: torch.Tensor, labels: torch.Tensor, ctx: TrainContext) -> torch.Tensor:
        """Q_y for this batch's loss. online mode: adds the batch to the epoch's sums first; before
        the first epoch has ended, Q is the running class mean (this batch included)."""
        if self.mode == "online":
            self._observe(logits, labels, ctx)
            if not self.estimator.initialized:
                return self.estimator.online_running().to(logits.device)
        return self._centroids(logits.device)

    def _centroids(self, device) -> torch.Tensor:
        if not self.estimator.initialized:
            raise RuntimeError(f"objective={self.name}: loss called before the centroid full pass (on_epoch_start)")
        c = self.estimator.centroids
        if c.device != device:  # normally placed once in setup/full pass; this is a fallback
            self.estimator.to(device)
            c = self.estimator.centroids
        return c

    def _ema(self, logits: torch.Tensor, labels: torch.Tensor, ctx: TrainContext) -> None:
        # After the loss is computed with the current centroids, move them towards this batch's
        # (process-summed) class means. Detached: centroids are constants of the objective.
        if self.mode == "ema":
            self.estimator.ema_update(logits.detach(), labels, reduce_fn=lambda t: ctx.accelerator.reduce(t, "sum"))

    # --- checkpoint ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {f"centroids.{k}": v for k, v in self.estimator.state_dict().items()}
        state["centroid_passes"] = torch.tensor(self.passes_total, dtype=torch.int64)
        state["centroid_epoch"] = torch.tensor(self.centroid_epoch, dtype=torch.int64)
        if self.mode == "online":
            state["online_epoch"] = torch.tensor(self.online_epoch, dtype=torch.int64)
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.estimator.load_state_dict({k[len("centroids."):]: v for k, v in state.items() if k.startswith("centroids.")})
        if "centroid_passes" in state:
            self.passes_total = int(state["centroid_passes"].reshape(-1)[0])
        if "centroid_epoch" in state:
            self.centroid_epoch = int(state["centroid_epoch"].reshape(-1)[0])
        if "online_epoch" in state:
            self.online_epoch = int(state["online_epoch"].reshape(-1)[0])

    def summary(self) -> dict:
        return {
            "lam": self.lam,
            "centroids": self.mode,
            "momentum": self.momentum if self.mode == "ema" else None,
            "centroid_passes": self.passes_total,
            "centroid_passes_this_session": self.passes_session,
            "centroid_pass_s": self.pass_seconds,
            "centroid_epoch": self.centroid_epoch,
            "full_pass_mode": self.full_pass_mode,
            "centroid_rows": (self.estimator.centroids.detach().float().cpu().tolist()
                              if self.estimator.initialized and self.estimator.num_classes <= 10 else None),
        }


@register_objective("cmi_min")
class CmiMin(_CentroidObjective):
    """CE + lam * KL(P_x || Q_y) - beta * Gamma-hat (Yang et al. 2023, CMI-constrained learning)."""


    def __init__(self, cfg: Any, ctx: TrainContext):
        super().__init__(cfg, ctx)
        self.beta = objective_number(cfg, "beta", self.name)
        clamp = cfg.get("gamma_clamp")
        self.gamma_clamp = None if clamp is None else objective_number(cfg, "gamma_clamp", self.name, 0.0, 1.0,
                                                               high_open=True)
        if self.gamma_clamp == 0.0:
            raise ConfigError(f"objective.gamma_clamp=0 must be in (0, 1) or null (objective={self.name})")

    def loss(self, batch, outputs, ctx):
        labels = batch["labels"]
        loss, parts = cmi_min_loss(outputs.logits, labels, self._loss_centroids(outputs.logits, labels, ctx), self.lam,
                                   self.beta, gamma_clamp=self.gamma_clamp, as_tensors=True)
        self._ema(outputs.logits, labels, ctx)
        return loss, {"ce": parts["ce"], "kl": parts["kl"], "lam_kl": self.lam * parts["kl"], "gamma": parts["gamma"],
                      "beta_gamma": self.beta * parts["gamma"]}

    def summary(self) -> dict:
        return {"objective": self.name, "beta": self.beta, "gamma_clamp": self.gamma_clamp, **super().summary()}


@register_objective("mcmi")
class MaxCmiTeacher(_CentroidObjective):
    """CE - lam * KL(P_x || Q_y) with centroids from the starting model (Ye et al., ICLR 2024)."""

    #: Below this spread (max L1 distance between two classes' centroids) Q_y carries no class
    #: information: the starting model has not learned the task (e.g. an untrained head).
    MIN_SPREAD = 0.02

    def on_epoch_start(self, ctx: TrainContext, epoch: int) -> None:
        computed = self._needs_pass(epoch)
        super().on_epoch_start(ctx, epoch)
        if computed:
            spread = centroid_spread(self.estimator.centroids)
            if spread < self.MIN_SPREAD:
                log.warning("objective=mcmi: the class centroids Q_y are (nearly) the same for every class "
                            "(spread %.4f): the starting model has not learned the task, so the KL term carries "
                            "no class information; start from a trained model (objective.start=ce or "
                            "trainer.init_from=PATH)", spread)

    def loss(self, batch, outputs, ctx):
        labels = batch["labels"]
        loss, parts = mcmi_loss(outputs.logits, labels, self._loss_centroids(outputs.logits, labels, ctx), self.lam,
                                as_tensors=True)
        self._ema(outputs.logits, labels, ctx)
        return loss, {"ce": parts["ce"], "kl": parts["kl"], "lam_kl": self.lam * parts["kl"]}

    def summary(self) -> dict:
        c = self.estimator.centroids.detach().float().cpu()
        return {"objective": self.name, **super().summary(), "centroid_spread": centroid_spread(c),
                "centroid_rows": c.tolist() if c.shape[0] <= 10 else None}
