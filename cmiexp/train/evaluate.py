"""Evaluation: gather predictions from every process (without the duplicated tail samples
that distributed samplers add) and compute the task's metrics plus CMI diagnostics."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def model_inputs(batch: dict, input_keys: set[str]) -> dict:
    return {k: v for k, v in batch.items() if k in input_keys}


@torch.no_grad()
def predict(model, loader, accelerator, input_keys: set[str]) -> dict[str, torch.Tensor]:
    """Run ``model`` over ``loader``; return gathered fp32 ``logits``, ``labels`` and ``idx`` on CPU."""
    was_training = model.training
    model.eval()
    logits, labels, idx = [], [], []
    for batch in loader:
        out = model(**model_inputs(batch, input_keys))
        lg, lb, ix = accelerator.gather_for_metrics((out.logits.float(), batch["labels"], batch["idx"]))
        logits.append(lg.cpu())
        labels.append(lb.cpu())
        idx.append(ix.cpu())
    model.train(was_training)
    return {"logits": torch.cat(logits), "labels": torch.cat(labels), "idx": torch.cat(idx)}


def metrics_from_predictions(pred: dict[str, torch.Tensor], task) -> dict[str, float]:
    from cmiexp.metrics import compute_metrics

    logits, labels = pred["logits"], pred["labels"]
    out: dict[str, float] = {"num_samples": int(labels.shape[0])}
    if task.is_regression:
        preds, labels = logits.squeeze(-1), labels.float()
        out["loss"] = float(F.mse_loss(preds, labels))  # in the training scale
        scale = (getattr(task, "extra", None) or {}).get("target_scale")
        if scale:  # targets were normalised for training: report metrics in the original units
            from cmiexp.data.targets import denormalize

            preds, labels = denormalize(preds.double(), scale), denormalize(labels.double(), scale)
        out.update(compute_metrics(task.metrics, preds.numpy(), labels.numpy()))
        return out
    out["loss"] = float(F.cross_entropy(logits, labels.long()))
    preds = logits.argmax(-1)
    out.update(compute_metrics(task.metrics, preds.numpy(), labels.numpy()))
    # Predicted-class histogram (in label order): a run predicting one class is detected from it.
    out["pred_counts"] = [int(c) for c in torch.bincount(preds.long(), minlength=int(task.num_labels)).tolist()]
    out.update(cmi_diagnostics_safe(logits, labels, task.num_labels))
    return out


def cmi_diagnostics_safe(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict[str, float]:
    """CMI, Γ and NCMI of the output distribution on this split (every classification run)."""
    from cmiexp.objectives.cmi import cmi_diagnostics

    present = torch.unique(labels.long())
    if present.numel() < 2:  # Γ needs two classes; a one-class subset has no separation
        return {}
    return {k: float(v) for k, v in cmi_diagnostics(logits, labels.long(), num_classes).items()}


def evaluate(model, loaders: dict, accelerator, task, input_keys: set[str]) -> dict[str, float]:
    """Metrics of every eval split; the first split's keys are plain, the others prefixed ``<alias>_``."""
    out: dict[str, float] = {}
    for i, (alias, loader) in enumerate(loaders.items()):
        m = metrics_from_predictions(predict(model, loader, accelerator, input_keys), task)
        prefix = "" if i == 0 else f"{alias}_"
        out.update({f"{prefix}{k}": v for k, v in m.items()})
    return out


def collapse_check(metrics: dict | None, label_names, share: float) -> dict | None:
    """Whether the predictions behind ``metrics`` (a dev evaluation with ``pred_counts``) are (nearly)
    all one class, or for a generation task (``top_prediction_share``) (nearly) all the same output
    text. None when the metrics hold neither (regression)."""
    counts = (metrics or {}).get("pred_counts")
    if not isinstance(counts, list) or not counts or sum(counts) <= 0:
        top_share, n = (metrics or {}).get("top_prediction_share"), (metrics or {}).get("num_samples")
        if top_share is None or not n:
            return None
        top = int(round(float(top_share) * int(n)))
        return {"collapsed": float(top_share) >= share, "majority_class": "the most common output",
                "majority_share": float(top_share),
                "histogram": {"most common output": top, "other outputs": int(n) - top}}
    total = sum(counts)
    top = max(range(len(counts)), key=lambda i: counts[i])
    names = list(label_names) if label_names and len(label_names) == len(counts) else [str(i) for i in range(len(counts))]
    return {"collapsed": counts[top] / total >= share, "majority_class": names[top],
            "majority_share": counts[top] / total, "histogram": dict(zip(names, counts))}


def collapse_fields(best: dict | None, final: dict | None, label_names, share: float) -> dict:
    """results.json fields: ``collapsed`` (the best or the final dev predictions are one class),
    ``collapsed_at`` (which of the two) and the ``predicted_class_histogram`` of each."""
    checks = {k: c for k, c in (("best", collapse_check(best, label_names, share)),
                                ("final", collapse_check(final, label_names, share))) if c is not None}
    if not checks:
        return {}
    return {"collapsed": any(c["collapsed"] for c in checks.values()),
            "collapsed_at": [k for k, c in checks.items() if c["collapsed"]],
            "predicted_class_histogram": {k: c["histogram"] for k, c in checks.items()},
            "collapse_share": share}
