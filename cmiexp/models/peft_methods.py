"""Parameter-efficient fine-tuning: ``peft=none | lora | rocoft``.

Both methods act on the *backbone* only; the prediction head (everything outside the backbone)
stays fully trainable.

* ``lora``: LoRA adapters injected with ``peft.inject_adapter_in_model`` into the backbone's
  linear layers (``nn.Linear`` and GPT-2's ``Conv1D``). The model keeps its class and forward
  signature; head parameters are simply left trainable (what ``modules_to_save`` achieves in a
  ``PeftModel``). ``save_pretrained`` writes the *merged* weights (W + scale * B A) under the
  original key names, so ``checkpoint/best`` is an ordinary full model.
* ``rocoft``: RoCoFT (Kowsher et al.): only ``r`` rows (output units) or ``r`` columns (input
  features) of every backbone linear weight are trained. Each weight is split into a trainable
  parameter (the first ``r`` rows/columns) and a frozen parameter (the rest); a forward pre-hook
  concatenates them into ``module.weight`` before every call. State-dict hooks merge the two
  parts back into ``<module>.weight`` on save and split it on load, so checkpoints keep the
  original layout. Embeddings, norms and (by default) biases are frozen. Because the split
  parts are real parameters, ``count_parameters`` sees exactly the closed-form number of
  trainable entries (``rocoft_trainable_count``) and the full total.

The AdamW weight decay of the runner acts only on trainable parameters, so frozen entries never
move (a gradient-mask hook would not protect them from decoupled weight decay).
"""

from __future__ import annotations

import types
from typing import Iterable

import torch
from torch import nn

from cmiexp.checks import PEFT_SCHEMA, check_flag, check_number, setting
from cmiexp.errors import ConfigError

PEFT_METHODS = ("none", "lora", "rocoft")
ROCOFT_AXES = ("row", "column")


# ----------------------------------------------------------------------------- structure


def _conv1d_type():
    try:
        from transformers.pytorch_utils import Conv1D

        return Conv1D
    except ImportError:  # pragma: no cover - very old transformers
        return None


def is_linear(module: nn.Module) -> bool:
    """``nn.Linear`` or GPT-2's ``Conv1D`` (a linear layer storing its weight as [in, out])."""
    conv1d = _conv1d_type()
    return isinstance(module, nn.Linear) or (conv1d is not None and isinstance(module, conv1d))


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of a linear layer, whatever its storage layout."""
    w = module.weight
    if isinstance(module, nn.Linear):
        return int(w.shape[0]), int(w.shape[1])
    return int(w.shape[1]), int(w.shape[0])  # Conv1D stores [in, out]


def backbone_prefix(model: nn.Module) -> str:
    """Name prefix (with trailing dot) of the backbone inside ``model``.

    Our prompt-head models keep it in ``model.backbone``; Hugging Face models in their base model
    (``model.base_model_prefix``). Parameters outside it form the head."""
    if hasattr(model, "backbone_prefix"):
        return str(model.backbone_prefix)
    prefix = getattr(model, "base_model_prefix", "")
    if prefix and isinstance(getattr(model, prefix, None), nn.Module):
        return prefix + "."
    raise ConfigError(f"cannot find the backbone of {type(model).__name__} to apply parameter-efficient fine-tuning")


def backbone_linears(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(full name, module) of every linear layer of the backbone, in module order."""
    prefix = backbone_prefix(model)
    return [(n, m) for n, m in model.named_modules() if n.startswith(prefix) and is_linear(m)]


def head_parameter_names(model: nn.Module) -> list[str]:
    prefix = backbone_prefix(model)
    return [n for n, _ in model.named_parameters() if not n.startswith(prefix)]


def _select_targets(names: Iterable[str], targets) -> list[str]:
    """Names of linear layers matching ``targets``: "all-linear" or a list of name suffixes."""
    names = list(names)
    if targets in (None, "all-linear", "all"):
        return names
    if isinstance(targets, str):
        targets = [targets]
    targets = [str(t) for t in targets]
    return [n for n in names if any(n == t or n.endswith("." + t) for t in targets)]


# ----------------------------------------------------------------------------- closed forms


def rocoft_trainable_count(shapes: Iterable[tuple[int, int]], rank: int, axis: str,
                           bias_sizes: Iterable[int] = ()) -> int:
    """Trainable entries RoCoFT leaves in linear weights of logical shapes (out, in).

    rows: min(r, out) * in per weight; columns: min(r, in) * out; plus trained biases."""
    if axis not in ROCOFT_AXES:
        raise ConfigError(f"peft.axis={axis!r}; valid choices: {', '.join(ROCOFT_AXES)}")
    total = 0
    for out_f, in_f in shapes:
        total += min(rank, out_f) * in_f if axis == "row" else min(rank, in_f) * out_f
    return total + sum(int(b) for b in bias_sizes)


def lora_trainable_count(shapes: Iterable[tuple[int, int]], rank: int) -> int:
    """LoRA's A [r, in] and B [out, r] per adapted weight: r * (in + out)."""
    return sum(rank * (in_f + out_f) for out_f, in_f in shapes)


# ----------------------------------------------------------------------------- RoCoFT


def _rocoft_dim(module: nn.Module, axis: str) -> int:
    """Storage dimension that indexes rows (output units) or columns (input features)."""
    linear = isinstance(module, nn.Linear)
    if axis == "row":
        return 0 if linear else 1
    return 1 if linear else 0


def _rocoft_weight(module: nn.Module) -> torch.Tensor:
    return torch.cat([module.rocoft_trainable, module.rocoft_frozen], dim=module.rocoft_dim)


def _rocoft_forward_pre_hook(module, args):
    # Rebuilt on every call so the gradient reaches the trainable slice (and the right device).
    module.weight = _rocoft_weight(module)


def _rocoft_state_dict_post_hook(module, state_dict, prefix, local_metadata):
    # Checkpoints keep the original layout: one merged `weight` tensor.
    state_dict.pop(prefix + "rocoft_trainable", None)
    state_dict.pop(prefix + "rocoft_frozen", None)
    state_dict[prefix + "weight"] = _rocoft_weight(module).detach()


def _rocoft_load_pre_hook(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                          error_msgs):
    key = prefix + "weight"
    if key in state_dict:
        w = state_dict.pop(key)
        k = module.rocoft_trainable.shape[module.rocoft_dim]
        if w.shape[module.rocoft_dim] < k:
            error_msgs.append(f"{key}: shape {tuple(w.shape)} is too small for RoCoFT rank {k}")
            return
        a, b = w.split([k, w.shape[module.rocoft_dim] - k], dim=module.rocoft_dim)
        state_dict[prefix + "rocoft_trainable"] = a
        state_dict[prefix + "rocoft_frozen"] = b


def rocoft_wrap(module: nn.Module, rank: int, axis: str) -> None:
    """Split ``module.weight`` into a trainable first-``rank`` slice and a frozen rest, in place."""
    dim = _rocoft_dim(module, axis)
    w = module.weight.detach()
    k = min(int(rank), int(w.shape[dim]))
    train, frozen = w.split([k, w.shape[dim] - k], dim=dim)
    del module._parameters["weight"]
    module.register_parameter("rocoft_trainable", nn.Parameter(train.contiguous().clone()))
    module.register_parameter("rocoft_frozen", nn.Parameter(frozen.contiguous().clone(), requires_grad=False))
    module.rocoft_dim = dim
    module.weight = _rocoft_weight(module)
    module.register_forward_pre_hook(_rocoft_forward_pre_hook)
    module.register_state_dict_post_hook(_rocoft_state_dict_post_hook)
    module.register_load_state_dict_pre_hook(_rocoft_load_pre_hook)


ROCOFT_HEAD = ("full", "rocoft")
ROCOFT_CONV1D = ("rocoft", "full")


def apply_rocoft(model: nn.Module, rank: int = 3, axis: str = "column", targets="all-linear",
                 train_bias: bool = False, head: str = "full", conv1d: str = "rocoft") -> nn.Module:
    """RoCoFT on the backbone's linear layers. Parity switches (our choice first):

    * ``head``: ``full`` trains the whole prediction head; ``rocoft`` restricts the head's linear
      layers to the same ``rank`` rows/columns, as the authors' code does (their biases follow
      ``train_bias``; other head parameters stay trainable).
    * ``conv1d``: ``rocoft`` treats GPT-2's ``Conv1D`` like ``nn.Linear``; ``full`` leaves those
      layers (weight and bias) fully trainable, as the authors' code does (it replaces only ``nn.Linear``).
    """
    if axis not in ROCOFT_AXES:
        raise ConfigError(f"peft.axis={axis!r}; valid choices: {', '.join(ROCOFT_AXES)}")
    if head not in ROCOFT_HEAD:
        raise ConfigError(f"peft.head={head!r}; valid choices: {', '.join(ROCOFT_HEAD)}")
    if conv1d not in ROCOFT_CONV1D:
        raise ConfigError(f"peft.conv1d={conv1d!r}; valid choices: {', '.join(ROCOFT_CONV1D)}")
    check_number("peft.rank", rank, PEFT_SCHEMA["rank"])
    prefix = backbone_prefix(model)
    linears = dict(backbone_linears(model))
    chosen = _select_targets(linears, targets)
    if not chosen:
        raise ConfigError(f"peft.target_modules={targets!r} matches no linear layer of the backbone "
                          f"(it has e.g. {', '.join(list(linears)[:4])})")
    # Freeze the whole backbone first; the head stays as it is (trainable).
    for n, p in model.named_parameters():
        if n.startswith(prefix):
            p.requires_grad_(False)
    conv1d_type = _conv1d_type()
    wrapped, full = [], []
    for name in chosen:
        mod = linears[name]
        if conv1d == "full" and conv1d_type is not None and isinstance(mod, conv1d_type):
            mod.requires_grad_(True)  # the authors' code never touches Conv1D: fully trainable
            full.append(name)
            continue
        rocoft_wrap(mod, rank, axis)
        wrapped.append(name)
        if train_bias and getattr(mod, "bias", None) is not None:
            mod.bias.requires_grad_(True)
    head_wrapped = []
    if head == "rocoft":
        for name, mod in [(n, m) for n, m in model.named_modules() if not n.startswith(prefix) and is_linear(m)]:
            if not name:
                continue
            rocoft_wrap(mod, rank, axis)
            head_wrapped.append(name)
            if getattr(mod, "bias", None) is not None:
                mod.bias.requires_grad_(bool(train_bias))
    model.rocoft_info = {"rank": rank, "axis": axis, "modules": wrapped + head_wrapped, "train_bias": bool(train_bias),
                         "head": head, "conv1d": conv1d, "head_modules": head_wrapped, "full_modules": full}
    return model


# ----------------------------------------------------------------------------- LoRA


def _is_lora_layer(module: nn.Module) -> bool:
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # pragma: no cover
        return False
    return isinstance(module, LoraLayer)


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with LoRA merged: W + scale * B A under the original key names.

    The model is not modified (no in-place merge/unmerge round trip, which would perturb training).
    Models without LoRA layers get their plain state dict."""
    sd = model.state_dict()
    lora = {n: m for n, m in model.named_modules() if _is_lora_layer(m)}
    if not lora:
        return sd
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if ".lora_" in key:  # adapter tensors (lora_A, lora_B, ...) are folded into the weight below
            continue
        out[key.replace(".base_layer.", ".")] = value
    with torch.no_grad():
        for name, mod in lora.items():
            key = f"{name}.weight"
            delta = sum(mod.get_delta_weight(a) for a in mod.active_adapters)
            out[key] = (out[key].float() + delta.float()).to(out[key].dtype)
    return out


def _save_pretrained_merged(self, save_directory, *args, **kwargs):
    """``save_pretrained`` of a LoRA-injected Hugging Face model: a full model with merged weights."""
    if kwargs.get("state_dict") is None:
        kwargs["state_dict"] = merged_state_dict(self)
    return type(self).save_pretrained(self, save_directory, *args, **kwargs)


def apply_lora(model: nn.Module, rank: int = 8, alpha: float = 16, dropout: float = 0.05,
               targets="all-linear") -> nn.Module:
    import peft

    check_number("peft.rank", rank, PEFT_SCHEMA["rank"])
    check_number("peft.alpha", alpha, PEFT_SCHEMA["alpha"])
    check_number("peft.dropout", dropout, PEFT_SCHEMA["dropout"])
    prefix = backbone_prefix(model)
    names = [n for n, _ in backbone_linears(model)]
    chosen = _select_targets(names, targets)
    if not chosen:
        raise ConfigError(f"peft.target_modules={targets!r} matches no linear layer of the backbone "
                          f"(it has e.g. {', '.join(names[:4])})")
    head = [n for n, _ in model.named_parameters() if not n.startswith(prefix)]
    config = peft.LoraConfig(r=rank, lora_alpha=float(alpha), lora_dropout=float(dropout),
                             target_modules=chosen, bias="none")
    import warnings

    with warnings.catch_warnings():
        # GPT-2's Conv1D: peft sets fan_in_fan_out itself and warns about it.
        warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")
        model = peft.inject_adapter_in_model(config, model)
    # inject_adapter_in_model freezes everything but the adapters: the head must keep training.
    params = dict(model.named_parameters())
    for n in head:
        params[n].requires_grad_(True)
    model.lora_info = {"rank": rank, "alpha": float(alpha), "dropout": float(dropout), "modules": chosen}
    if not hasattr(type(model), "save_merged_pretrained"):
        # Hugging Face classes: make save_pretrained (used for checkpoint/best) write merged weights.
        # Our prompt-head models merge in their own save_pretrained.
        model.save_pretrained = types.MethodType(_save_pretrained_merged, model)
    return model


# ----------------------------------------------------------------------------- dispatcher


def _targets(node):
    t = setting(node, "target_modules", "peft")
    if t is None or isinstance(t, str):
        return t
    return [str(x) for x in t]


def apply_peft_config(model: nn.Module, peft_cfg) -> nn.Module:
    """Apply the method named by ``peft_cfg.name`` (None or name none = full fine-tuning)."""
    if peft_cfg is None:
        return model
    name = str(setting(peft_cfg, "name", "peft"))

    def get(key):
        return setting(peft_cfg, key, "peft")

    if name == "none":
        return model
    if name == "lora":
        return apply_lora(model, rank=get("rank"), alpha=get("alpha"), dropout=get("dropout"),
                          targets=_targets(peft_cfg))
    if name == "rocoft":
        # null head / conv1d: the whole head trains / Conv1D is restricted like nn.Linear (conf/peft/rocoft.yaml)
        return apply_rocoft(model, rank=get("rank"), axis=str(get("axis")), targets=_targets(peft_cfg),
                            train_bias=check_flag("peft.train_bias", get("train_bias")), head=str(get("head") or "full"),
                            conv1d=str(get("conv1d") or "rocoft"))
    raise ConfigError(f"unknown peft.name={name!r}; valid choices: {', '.join(PEFT_METHODS)}")


__all__ = [
    "PEFT_METHODS", "apply_peft_config", "apply_lora", "apply_rocoft", "backbone_linears", "backbone_prefix",
    "head_parameter_names", "is_linear", "linear_shape", "lora_trainable_count", "merged_state_dict",
    "rocoft_trainable_count",
]
