"""Chain-of-thought distillation objectives for seq2seq students (T5).

Four objectives, all trained on batches built by ``cmiexp.train.adapters.cot``:

- ``dss``  Distilling Step-by-Step (Hsieh et al. 2023): one student, two tasks sharing the
  weights, ``"predict: " + x -> label`` and ``"explain: " + x -> rationale``::

      L = alpha * L_label + (1 - alpha) * L_rationale          (alpha = 0.5)

  each a token-mean cross-entropy over the non-padding target tokens of its branch; two
  forward passes per step. The label is the task's ``label_source`` (``llm`` by default:
  the teacher's answer; ``task.label_source=gold`` gives DSS with human labels).
- ``cot_mi``  MI-CoT (Chen et al. 2024): ``L = L_dss + beta * L_MI`` (beta = 0.1) with
  ``mi_variant=reference`` (the public code's term, ``cmiexp.objectives.cot_mi.mi_loss_reference``)
  or ``masked`` (``mi_loss_masked``: padding masked, proper distributions). ``beta=0`` is DSS.
- ``cot_finetune``  DSS paper baseline "standard fine-tuning": no task prefix, no rationale
  branch, GOLD labels (overrides ``task.label_source``).
- ``cot_distill``  DSS paper baseline "standard distillation": no task prefix, no rationale
  branch, the teacher LLM's labels (overrides ``task.label_source``).

How the data is built for an objective (prefix, which branches, label source) is given by
``cot_data_spec(objective_cfg)``; the adapter reads it, so an objective and its batches can
never disagree. The math is in pure functions (``token_mean_ce``, ``dss_loss``, ``mi_term``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cmiexp.objectives.cot_mi import mi_loss_masked, mi_loss_reference
from cmiexp.errors import ConfigError
from cmiexp.objectives.base import Objective, objective_number, register_objective

IGNORE_INDEX = -100  # label padding, as in Hugging Face seq2seq collators
MI_VARIANTS = ("reference", "masked")


# ---------------------------------------------------------------------------------------------
# Pure math


def token_mean_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the target tokens that are not ``-100`` (the HF seq2seq loss).

    ``logits [B, T, V]``, ``labels [B, T]``. Computed in fp32 so autocast cannot overflow.
    The mean is over tokens of the whole batch, not per sequence (as ``model(labels=...).loss``).
    """
    if logits.shape[:2] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not match labels {tuple(labels.shape)}")
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX)


def dss_loss(label_loss: torch.Tensor, rationale_loss: torch.Tensor, alpha: float) -> torch.Tensor:
    """alpha * L_label + (1 - alpha) * L_rationale."""
    return alpha * label_loss + (1.0 - alpha) * rationale_loss


def mi_term(variant: str, pred_logits, expl_logits, pred_labels, expl_labels) -> torch.Tensor:
    """The MI-CoT term on the two branches' decoder logits; gradient reaches ``expl_logits`` only.

    ``reference`` pools over every decoder position (padding included, as the public code);
    ``masked`` pools over the real target tokens only (``labels != -100``)."""
    if variant == "reference":
        return mi_loss_reference(pred_logits.float(), expl_logits.float())
    if variant == "masked":
        return mi_loss_masked(pred_logits.float(), expl_logits.float(),
                              pred_labels != IGNORE_INDEX, expl_labels != IGNORE_INDEX)
    raise ConfigError(f"objective.mi_variant={variant!r}; valid choices: {', '.join(MI_VARIANTS)}")


# ---------------------------------------------------------------------------------------------
# What data an objective trains on


@dataclass(frozen=True)
class CotDataSpec:
    """How the adapter builds batches for an objective."""

    rationale: bool  # also build the "explain: " -> rationale branch
    task_prefix: bool  # "predict: " / "explain: " prefixes (False: raw input -> label)
    label_source: str | None  # "gold" / "llm" overrides task.label_source; None keeps it

    @property
    def predict_prefix(self) -> str:
        return "predict: " if self.task_prefix else ""


def cot_data_spec(objective_cfg) -> CotDataSpec:
    """The data spec of a CoT objective; ConfigError for objectives that are not CoT ones."""
    from cmiexp.objectives.base import available_objectives, objective_class

    name = objective_cfg.get("name")
    cls = objective_class(name)
    if cls is None or not issubclass(cls, CotObjective):
        cot = sorted(n for n in available_objectives() if issubclass(objective_class(n), CotObjective))
        raise ConfigError(f"objective={name} cannot train a chain-of-thought task (task.loader=cot); "
                          f"use one of {', '.join(cot)}")
    return CotDataSpec(rationale=cls.uses_rationale, task_prefix=cls.task_prefix, label_source=cls.label_source)


# ---------------------------------------------------------------------------------------------
# Objectives


class CotObjective(Objective):
    """Base of the CoT objectives: branch forward passes on a seq2seq model."""

    uses_rationale: bool = True
    task_prefix: bool = True
    label_source: str | None = None

    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        task_cfg = ctx.cfg.get("task") if ctx is not None and ctx.cfg is not None else None
        if task_cfg is not None and task_cfg.get("loader") != "cot":
            # Without this the classification adapter's batches would fail with a KeyError.
            raise ConfigError(f"objective={self.name} trains chain-of-thought tasks (task=cot/svamp, cot/cqa, "
                              f"cot/anli1, cot/esnli); task={task_cfg.get('name')} is not one")

    @staticmethod
    def branch_logits(model, batch: dict, branch: str, ctx=None) -> torch.Tensor:
        """Decoder logits ``[B, T, V]`` of one branch (``pred`` or ``expl``), teacher-forced.

        The decoder input is the right-shifted target (the model's own helper), so no loss is
        computed inside the model; losses are taken from the logits here."""
        inner = ctx.accelerator.unwrap_model(model) if ctx is not None and ctx.accelerator is not None else model
        labels = batch[f"{branch}_labels"]
        decoder_input_ids = inner.prepare_decoder_input_ids_from_labels(labels=labels)
        out = model(input_ids=batch[f"{branch}_input_ids"], attention_mask=batch[f"{branch}_attention_mask"],
                    decoder_input_ids=decoder_input_ids)
        return out.logits

    def branch_losses(self, model, batch: dict, ctx=None) -> dict[str, torch.Tensor]:
        """Per-term losses (tensors with graph) plus the branch logits, for logging and tests."""
        raise NotImplementedError

    def compute_loss(self, model, batch, ctx):
        parts = self.branch_losses(model, batch, ctx)
        loss = parts["loss"]
        logs = {k: float(v.detach()) for k, v in parts.items() if k not in ("loss",) and v.dim() == 0}
        return loss, logs


class _LabelOnly(CotObjective):
    """Single branch, no prefix: the DSS paper's standard fine-tuning / distillation."""

    uses_rationale = False
    task_prefix = False

    def branch_losses(self, model, batch, ctx=None):
        pred_logits = self.branch_logits(model, batch, "pred", ctx)
        label_loss = token_mean_ce(pred_logits, batch["pred_labels"])
        return {"loss": label_loss, "label_loss": label_loss, "pred_logits": pred_logits}


@register_objective("cot_finetune")
class StandardFinetune(_LabelOnly):
    label_source = "gold"


@register_objective("cot_distill")
class StandardDistill(_LabelOnly):
    label_source = "llm"


@register_objective("dss")
class DistillingStepByStep(CotObjective):
    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        self.alpha = objective_number(cfg, "alpha", self.name, 0.0, 1.0)

    def branch_losses(self, model, batch, ctx=None):
        pred_logits = self.branch_logits(model, batch, "pred", ctx)
        expl_logits = self.branch_logits(model, batch, "expl", ctx)
        label_loss = token_mean_ce(pred_logits, batch["pred_labels"])
        rationale_loss = token_mean_ce(expl_logits, batch["expl_labels"])
        return {"loss": dss_loss(label_loss, rationale_loss, self.alpha), "label_loss": label_loss,
                "rationale_loss": rationale_loss, "pred_logits": pred_logits, "expl_logits": expl_logits}


@register_objective("cot_mi")
class MiCot(DistillingStepByStep):
    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        self.beta = objective_number(cfg, "beta", self.name)
        self.mi_variant = str(cfg.mi_variant)
        if self.mi_variant not in MI_VARIANTS:
            raise ConfigError(f"objective.mi_variant={self.mi_variant!r}; valid choices: {', '.join(MI_VARIANTS)}")

    def branch_losses(self, model, batch, ctx=None):
        parts = super().branch_losses(model, batch, ctx)
        mi = mi_term(self.mi_variant, parts["pred_logits"], parts["expl_logits"], batch["pred_labels"],
                     batch["expl_labels"])
        # beta * mi is added even for beta = 0 (mi is always finite), so the logged term exists
        # and the total is exactly the DSS loss: x + 0.0 == x in floating point.
        parts["loss"] = parts["loss"] + self.beta * mi
        parts["mi"] = mi
        return parts
