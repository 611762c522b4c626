"""``objective=ce``: plain fine-tuning, the baseline of every table."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cmiexp.objectives.base import Objective, register_objective


def supervised_loss(logits: torch.Tensor, labels: torch.Tensor, is_regression: bool) -> torch.Tensor:
    """Cross-entropy (classification) or MSE (regression), computed in fp32 so autocast cannot overflow."""
    if is_regression:
        return F.mse_loss(logits.float().squeeze(-1), labels.float())
    return F.cross_entropy(logits.float(), labels.long())


@register_objective("ce")
class CrossEntropy(Objective):
    def loss(self, batch, outputs, ctx):
        loss = supervised_loss(outputs.logits, batch["labels"], ctx.is_regression)
        return loss, {}
