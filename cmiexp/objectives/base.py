"""Objective registry and the interface the training loop talks to.

An objective turns (batch, model outputs) into a scalar loss. The loop never knows which
objective it runs: it calls the hooks below, logs what ``loss`` returns, and checkpoints
``state_dict``. New objectives register by name and need no change to the loop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from cmiexp.errors import ConfigError

_REGISTRY: dict[str, type["Objective"]] = {}


def objective_number(cfg: Any, key: str, objective: str, low: float = 0.0, high: float | None = None,
                     high_open: bool = False) -> float:
    """``objective.<key>`` as a float, checked: a real number (not a string, not a bool), finite, in
    ``[low, high]`` (``[low, high)`` with ``high_open``). There is no default here on purpose:
    conf/objective/<objective>.yaml is the one home of every objective default."""
    if key not in cfg:
        raise ConfigError(f"objective.{key} is not set (objective={objective}; conf/objective/{objective}.yaml sets it)")
    raw = cfg[key]
    if isinstance(raw, bool) or not isinstance(raw, (int, float)):
        raise ConfigError(f"objective.{key}={raw!r} must be a number (objective={objective})")
    if not math.isfinite(raw) or raw < low or (high is not None and (raw >= high if high_open else raw > high)):
        rng = f">= {low}" if high is None else f"in [{low}, {high}{')' if high_open else ']'}"
        raise ConfigError(f"objective.{key}={raw!r} must be {rng} (objective={objective})")
    return float(raw)


def register_objective(name: str) -> Callable[[type["Objective"]], type["Objective"]]:
    def deco(cls: type[Objective]) -> type[Objective]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"objective {name!r} registered twice")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def available_objectives() -> list[str]:
    _import_builtin()
    return sorted(_REGISTRY)


def objective_class(name: str) -> type["Objective"] | None:
    """The registered class of objective ``name`` (None if there is none)."""
    _import_builtin()
    return _REGISTRY.get(name)


def build_objective(cfg: Any, ctx: "TrainContext") -> "Objective":
    """Instantiate the objective named by ``cfg.objective.name``."""
    _import_builtin()
    name = cfg.objective.name
    if name not in _REGISTRY:
        raise ConfigError(
            f"unknown objective.name={name!r}; valid choices: {', '.join(sorted(_REGISTRY))}"
        )
    return _REGISTRY[name](cfg.objective, ctx)


def _import_builtin() -> None:
    # Importing the modules runs their @register_objective decorators.
    import importlib

    for mod in ("ce", "cmi_objectives", "kd", "cot"):
        try:
            importlib.import_module(f"cmiexp.objectives.{mod}")
        except ModuleNotFoundError as e:  # a module another issue has not added yet
            if e.name != f"cmiexp.objectives.{mod}":
                raise


@dataclass
class TrainContext:
    """What an objective may look at. Filled by the training loop."""

    accelerator: Any  # accelerate.Accelerator
    model: Any  # the prepared (possibly wrapped) model
    task: Any  # cmiexp.data.base.TaskData
    cfg: Any  # the full resolved run config
    run_dir: Any  # pathlib.Path of the run directory
    # An unshuffled, prepared DataLoader over the training set (eval-size batches), for
    # objectives that need a full pass (centroids, teacher-logit caches).
    full_train_loader: Any = None
    num_train_examples: int = 0
    global_step: int = 0
    epoch: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_labels(self) -> int:
        return self.task.num_labels

    @property
    def is_regression(self) -> bool:
        return bool(getattr(self.task, "is_regression", False))


class Objective:
    """Base class. Subclasses implement ``loss``; the hooks are optional."""

    name: str = "?"
    #: True if the objective needs class probabilities (refuses regression tasks).
    requires_classification: bool = False

    def __init__(self, cfg: Any, ctx: TrainContext):
        self.cfg = cfg
        if self.requires_classification and ctx.is_regression:
            raise ConfigError(
                f"objective={self.name} needs class probabilities, but task={ctx.task.name} is a "
                "regression task; use objective=ce (or kd) for regression"
            )

    # --- hooks called by the loop -------------------------------------------------------
    def setup(self, ctx: TrainContext) -> None:
        """Once, after the model/optimizer/dataloaders are prepared and a checkpoint (if any) loaded."""

    def on_epoch_start(self, ctx: TrainContext, epoch: int) -> None:
        """At the start of every training epoch (also the first)."""

    def compute_loss(self, model, batch: dict, ctx: TrainContext) -> tuple[torch.Tensor, dict[str, float]]:
        """Forward pass(es) and loss. The default runs the model once on the batch's model inputs
        and calls ``loss``; objectives needing several passes (e.g. CoT branches) override this."""
        keys = ctx.extra.get("input_keys") or {"input_ids", "attention_mask", "token_type_ids"}
        outputs = model(**{k: v for k, v in batch.items() if k in keys})
        return self.loss(batch, outputs, ctx)

    def loss(self, batch: dict, outputs: Any, ctx: TrainContext) -> tuple[torch.Tensor, dict[str, float]]:
        """Return the scalar loss and a dict of extra scalars to log (detached floats)."""
        raise NotImplementedError

    def after_step(self, ctx: TrainContext) -> None:
        """After each optimizer step."""

    # --- checkpointed state (centroids, EMA buffers, ...) --------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors to save in the checkpoint (safetensors, so tensors only)."""
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        pass
