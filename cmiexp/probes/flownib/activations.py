"""FlowNIB activations: pooling of hidden states and the one forward pass that caches
(X, Z_1..Z_L, Y) for the critics."""

from __future__ import annotations

import torch

from cmiexp.errors import ConfigError, DataError
from cmiexp.probes.flownib.progress import progress as progress_bar


def check_pool_inputs(hidden: torch.Tensor, attention_mask: torch.Tensor | None):
    if hidden.dim() != 3:
        raise DataError(f"hidden states must be [B, L, D], got shape {tuple(hidden.shape)}")
    if attention_mask is not None:
        if tuple(attention_mask.shape) != tuple(hidden.shape[:2]):
            raise DataError(f"attention_mask shape {tuple(attention_mask.shape)} does not match hidden "
                            f"states {tuple(hidden.shape[:2])}")
        if bool((attention_mask.sum(1) == 0).any()):
            raise DataError("attention_mask has an example with no tokens")


def masked_mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean over the positions where attention_mask == 1 (padding never enters the average)."""
    check_pool_inputs(hidden, attention_mask)
    m = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(1) / m.sum(1)


def cls_pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The first real token of each example (position 0 for right padding or no mask; the first
    position with mask 1 for left padding)."""
    check_pool_inputs(hidden, attention_mask)
    if attention_mask is None:
        return hidden[:, 0]
    first = attention_mask.long().argmax(1)  # argmax returns the first maximal index
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), first]


def last_token_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The last real token of each example, found per example from the mask (works for left-
    and right-padded batches)."""
    check_pool_inputs(hidden, attention_mask)
    length = attention_mask.shape[1]
    last = length - 1 - attention_mask.long().flip(1).argmax(1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


POOLINGS = {"mean": masked_mean_pool, "cls": cls_pool, "last": last_token_pool}


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    if pooling not in POOLINGS:
        raise ConfigError(f"pooling={pooling!r} is unknown; choose one of {', '.join(POOLINGS)}")
    return POOLINGS[pooling](hidden, attention_mask)


def _hidden_states(out) -> tuple:
    """All hidden states of a forward output: ``hidden_states``, or the encoder's for
    encoder-decoder classifiers (T5), whose decoder reads only a start token."""
    hs = getattr(out, "hidden_states", None)
    if hs is None:
        hs = getattr(out, "encoder_hidden_states", None)
    if hs is None or len(hs) < 2:
        raise DataError("extract_activations: the model returned no hidden states")
    return hs


@torch.no_grad()
def extract_activations(model, dataloader, pooling: str = "mean", device: str = "cpu",
                        head_positions=None, progress: bool = False) -> dict[str, torch.Tensor]:
    """Run ``model`` once over ``dataloader`` and cache pooled (X, Z_1..Z_L, Y).

    Batches are dicts with input_ids, attention_mask, labels, idx (token_type_ids passed on when
    present). X is hidden_states[0] (embedding output), always attention-masked mean pooled (a
    CLS or last-token slice of the embedding output is nearly the same vector for every
    example); Z_l = hidden_states[l] pooled by ``pooling``: mean | cls | last, or ``head`` = the
    token at ``head_positions(input_ids, attention_mask)`` ([B] long), e.g. the mask token a
    prompt head reads. Returns float32 CPU tensors x [N, D], z [L, N, D], y [N], idx [N].
    """
    if pooling == "head":
        if head_positions is None:
            raise ConfigError("pooling='head' needs head_positions (a function of input_ids and attention_mask)")
    elif pooling not in POOLINGS:
        raise ConfigError(f"pooling={pooling!r} is unknown; choose one of {', '.join(POOLINGS)}, head")
    dev = torch.device(device)
    model.to(dev)
    was_training = model.training
    model.eval()
    xs, zs, ys, ids = [], [], [], []
    try:
        total = len(dataloader)
    except TypeError:  # an iterable without a length: the bar counts without a total
        total = 0
    bar = progress_bar(total, progress, "FlowNIB activations")
    try:
        for i, batch in enumerate(dataloader):
            bar.update(1)
            for key in ("input_ids", "attention_mask", "labels", "idx"):
                if key not in batch:
                    raise DataError(f"extract_activations: batch {i} has no {key!r} field")
            mask = batch["attention_mask"].to(dev)
            inputs = {"input_ids": batch["input_ids"].to(dev), "attention_mask": mask}
            if "token_type_ids" in batch:
                inputs["token_type_ids"] = batch["token_type_ids"].to(dev)
            hs = _hidden_states(model(**inputs, output_hidden_states=True))
            xs.append(masked_mean_pool(hs[0].float(), mask).cpu())
            if pooling == "head":
                check_pool_inputs(hs[-1], mask)
                pos = torch.as_tensor(head_positions(inputs["input_ids"], mask)).to(dev).long()
                rows = torch.arange(mask.shape[0], device=dev)
                zs.append(torch.stack([h.float()[rows, pos].cpu() for h in hs[1:]]))
            else:
                zs.append(torch.stack([pool(h.float(), mask, pooling).cpu() for h in hs[1:]]))
            ys.append(torch.as_tensor(batch["labels"]).cpu())
            ids.append(torch.as_tensor(batch["idx"]).cpu().long())
    finally:
        model.train(was_training)
        bar.close()
    if not xs:
        raise DataError("extract_activations: the dataloader yielded no batches")
    return {"x": torch.cat(xs), "z": torch.cat(zs, dim=1), "y": torch.cat(ys), "idx": torch.cat(ids)}


__all__ = ["POOLINGS", "check_pool_inputs", "cls_pool", "extract_activations", "last_token_pool", "masked_mean_pool", "pool"]
