"""Prediction heads: how a backbone's hidden states become class logits (or a regression score).

``build_classifier`` is the one place the runner asks for a trainable classifier; the ``head``
config group picks the head:

* ``pooling``: the standard Hugging Face sequence-classification head (CLS for encoders, last
  non-pad token for decoders): ``AutoModelForSequenceClassification``.
* ``masking``: a short prompt ending in the tokenizer's mask token is appended to every input at
  tokenisation (``input_suffix`` -> ``cmiexp.data.tokenize``); the final hidden state at the mask
  position feeds a small MLP head. The FlowNIB paper's "masking" prediction for encoders.
* ``generation``: (decoders) a short prompt is appended and the final hidden state at the last
  prompt position (the last attended token) feeds the MLP head: the single-token variant of
  "predicting through generation".

Mask and last-token positions are found per example from the input ids / attention mask in every
forward pass (never cached), so left and right padding both work. For decoders the position ids
are computed from the attention mask, which makes left-padded inputs see the same positions as
right-padded ones.

Differences from the authors' reference code (Kowsher/BidiVsUniLM ``modeling.py``): the MLP reads
the final *hidden state* (not the vocabulary-sized MLM/LM logits), and the mask position is found
per example (the reference caches the first batch's position, wrong for other lengths).

The prompt-head models are ``PromptHeadClassifier`` modules (plain ``nn.Module``s, not
``PreTrainedModel`` subclasses). Their ``save_pretrained(dir)`` writes::

    dir/backbone/          the backbone (its own save_pretrained: config.json + model.safetensors)
    dir/head.safetensors   the MLP head
    dir/cmiexp_head.json   what is needed to rebuild it (kind, num_labels, mask id, sizes, labels)

The backbone sits in a sub-folder on purpose: ``AutoModelForSequenceClassification`` on ``dir``
then fails loudly instead of silently loading a randomly initialised classifier. Load any
``checkpoint/best`` (pooling or prompt head) with ``load_classifier(dir)``.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from cmiexp.checks import HEAD_SCHEMA, check_number, optional_setting, setting
from cmiexp.errors import CheckpointError, ConfigError, DataError

HEADS = ("pooling", "masking", "generation")
DEFAULT_PROMPT = "The answer is"
HEAD_FORMAT = "cmiexp-prompt-head"
HEAD_CONFIG = "cmiexp_head.json"
HEAD_WEIGHTS = "head.safetensors"
BACKBONE_DIR = "backbone"


# ----------------------------------------------------------------------------- config


def head_name(cfg) -> str:
    # A run config without a head group (written before heads existed) used the pooled classifier.
    name = str(optional_setting(optional_setting(cfg, "head"), "name") or "pooling")
    if name not in HEADS:
        raise ConfigError(f"unknown head.name={name!r}; valid choices: {', '.join(HEADS)}")
    return name


def head_prompt(cfg) -> str:
    """The prompt text: ``head.prompt``, else the task's ``prompt``, else a generic one."""
    for value in (optional_setting(optional_setting(cfg, "head"), "prompt"),
                  optional_setting(optional_setting(cfg, "task"), "prompt")):
        if value is not None:
            return str(value)
    return DEFAULT_PROMPT


@dataclass(frozen=True)
class InputSuffix:
    """Text appended to every input at tokenisation.

    ``placement``: ``before_special`` inserts it before the tokenizer's trailing special tokens
    (``[CLS] a [SEP] b <prompt> [MASK] [SEP]``), ``end`` after everything (decoders: the prompt's
    last token is then the last attended token)."""

    text: str
    placement: str = "before_special"
    must_end_with_id: int | None = None  # the mask token for head=masking

    def cache_key(self) -> str:
        return f"{self.placement}|{self.must_end_with_id}|{self.text}"


def input_suffix(cfg, tokenizer) -> InputSuffix | None:
    """What the configured head needs appended to each input (None for ``pooling``)."""
    head = head_name(cfg)
    if head == "pooling":
        return None
    prompt = head_prompt(cfg).strip()
    if head == "masking":
        mask = getattr(tokenizer, "mask_token", None)
        if not mask or getattr(tokenizer, "mask_token_id", None) is None:
            model = optional_setting(optional_setting(cfg, "model"), "name") or "?"
            raise ConfigError(f"head=masking needs a tokenizer with a mask token, but model={model} has none; "
                              "use head=generation (decoders) or head=pooling")
        text = f" {prompt} {mask}" if prompt else f" {mask}"
        return InputSuffix(text, "before_special", int(tokenizer.mask_token_id))
    if not prompt:
        return None  # generation without a prompt: the last input token itself
    return InputSuffix(f" {prompt}", "end")


# ----------------------------------------------------------------------------- positions (pure)


def mask_positions(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, mask_token_id: int) -> torch.Tensor:
    """Per row, the index of the last attended mask token ([B] long).

    The appended prompt's mask is the last one, also when the text itself contains the mask string."""
    hit = input_ids.eq(int(mask_token_id))
    if attention_mask is not None:
        hit = hit & attention_mask.bool()
    missing = ~hit.any(dim=-1)
    # Meta tensors (the dry run, the real-size tests) carry no values to check.
    if not input_ids.is_meta and bool(missing.any()):
        rows = missing.nonzero().flatten().tolist()
        raise DataError(f"head=masking: no mask token (id {mask_token_id}) in batch rows {rows[:8]}; the prompt must "
                        "be appended at tokenisation (the runner passes heads.input_suffix to tokenize_split)")
    idx = torch.arange(input_ids.shape[-1], device=input_ids.device).expand_as(input_ids)
    return torch.where(hit, idx, torch.full_like(idx, -1)).max(dim=-1).values


def last_token_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Per row, the index of the last attended token ([B] long); right or left padding."""
    att = attention_mask.bool()
    if not att.is_meta and not bool(att.any(dim=-1).all()):
        raise DataError("an input row has no attended token (empty attention mask)")
    idx = torch.arange(att.shape[-1], device=att.device).expand_as(att)
    return torch.where(att, idx, torch.full_like(idx, -1)).max(dim=-1).values


def causal_position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over attended tokens only (0 for leading pads): left padding = right padding."""
    return (attention_mask.long().cumsum(dim=-1) - 1).clamp_min(0)


# ----------------------------------------------------------------------------- modules


class MLPHead(nn.Module):
    """dropout -> Linear(H, h) -> tanh -> dropout -> Linear(h, num_labels)."""

    def __init__(self, in_size: int, hidden_size: int, num_labels: int, dropout: float = 0.1):
        super().__init__()
        self.dropout = nn.Dropout(float(dropout))
        self.dense = nn.Linear(int(in_size), int(hidden_size))
        self.out_proj = nn.Linear(int(hidden_size), int(num_labels))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = self.dropout(features)
        x = torch.tanh(self.dense(x))
        return self.out_proj(self.dropout(x))


def _hidden_size(config) -> int:
    for key in ("hidden_size", "d_model", "n_embd", "dim"):
        v = getattr(config, key, None)
        if isinstance(v, int) and v > 0:
            return v
    raise ConfigError(f"cannot tell the hidden size of backbone config {type(config).__name__}")


def drop_unused_pooler(backbone: nn.Module) -> nn.Module:
    """BERT/RoBERTa base models carry a pooler the prompt heads never use; unused trainable
    parameters break DistributedDataParallel, so it is removed (their forward skips a None pooler)."""
    if isinstance(getattr(backbone, "pooler", None), nn.Module):
        backbone.pooler = None
    return backbone


class PromptHeadClassifier(nn.Module):
    """Backbone + MLP head reading the hidden state at the mask token (``masking``) or at the last
    attended token (``generation``). Forward returns an object with ``.logits`` [B, num_labels]."""

    backbone_prefix = "backbone."

    def __init__(self, backbone: nn.Module, *, kind: str, num_labels: int, mask_token_id: int | None = None,
                 head_hidden_size: int | None = None, dropout: float = 0.1, causal_positions: bool = False,
                 id2label: dict | None = None, problem_type: str | None = None):
        super().__init__()
        if kind not in ("masking", "generation"):
            raise ConfigError(f"PromptHeadClassifier kind={kind!r}; valid: masking, generation")
        if kind == "masking" and mask_token_id is None:
            raise ConfigError("head=masking needs the tokenizer's mask token id")
        check_number("head.dropout", dropout, HEAD_SCHEMA["dropout"])
        self.backbone = backbone
        hidden = _hidden_size(backbone.config)
        self.head = MLPHead(hidden, int(head_hidden_size or hidden), int(num_labels), float(dropout))
        self.kind = kind
        self.num_labels = int(num_labels)
        self.mask_token_id = None if mask_token_id is None else int(mask_token_id)
        self.causal_positions = bool(causal_positions)
        self.id2label = {int(k): str(v) for k, v in (id2label or {}).items()}
        self.problem_type = problem_type or ("regression" if num_labels == 1 else "single_label_classification")
        self._head_hidden_size = int(head_hidden_size or hidden)
        self._dropout = float(dropout)
        accepted = inspect.signature(backbone.forward).parameters
        self._backbone_accepts = set(accepted)

    # -- the runner feeds these keys from each batch (see ClassificationAdapter.setup)
    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, output_hidden_states: bool | None = None, **kwargs):
        from transformers.modeling_outputs import SequenceClassifierOutput

        if input_ids is None:
            raise DataError("PromptHeadClassifier needs input_ids (the head position is found from them)")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        acc = self._backbone_accepts
        kw = {"input_ids": input_ids}
        if "attention_mask" in acc:
            kw["attention_mask"] = attention_mask
        if token_type_ids is not None and "token_type_ids" in acc:
            kw["token_type_ids"] = token_type_ids
        if position_ids is None and self.causal_positions and "position_ids" in acc:
            position_ids = causal_position_ids(attention_mask)
        if position_ids is not None and "position_ids" in acc:
            kw["position_ids"] = position_ids
        if "use_cache" in acc:
            kw["use_cache"] = False
        if output_hidden_states:
            kw["output_hidden_states"] = True
        out = self.backbone(**kw)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        if self.kind == "masking":
            pos = mask_positions(input_ids, attention_mask, self.mask_token_id)
        else:
            pos = last_token_positions(attention_mask)
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        logits = self.head(hidden[rows, pos.to(hidden.device)])
        loss = None
        if labels is not None:
            if self.num_labels == 1:
                loss = nn.functional.mse_loss(logits.float().squeeze(-1), labels.float())
            else:
                loss = nn.functional.cross_entropy(logits.float(), labels.long())
        return SequenceClassifierOutput(loss=loss, logits=logits,
                                        hidden_states=getattr(out, "hidden_states", None) if output_hidden_states else None)

    # -- checkpoints
    def head_config(self) -> dict:
        return {"format": HEAD_FORMAT, "version": 1, "kind": self.kind, "num_labels": self.num_labels,
                "mask_token_id": self.mask_token_id, "head_hidden_size": self._head_hidden_size,
                "dropout": self._dropout, "causal_positions": self.causal_positions,
                "id2label": {str(k): v for k, v in self.id2label.items()}, "problem_type": self.problem_type}

    def save_merged_pretrained(self, save_directory, **kwargs):
        return self.save_pretrained(save_directory, **kwargs)

    def save_pretrained(self, save_directory, state_dict: dict | None = None, is_main_process: bool = True,
                        **kwargs) -> None:
        """Backbone via its own save_pretrained (LoRA merged, RoCoFT parts joined) + head + json."""
        from safetensors.torch import save_file

        from cmiexp.io import atomic_write_json
        from cmiexp.models.peft_methods import merged_state_dict

        if not is_main_process:
            return
        d = Path(save_directory)
        d.mkdir(parents=True, exist_ok=True)
        sd = merged_state_dict(self) if state_dict is None else state_dict
        pb, ph = self.backbone_prefix, "head."
        backbone_sd = {k[len(pb):]: v for k, v in sd.items() if k.startswith(pb)}
        head_sd = {k[len(ph):]: v.detach().cpu().contiguous() for k, v in sd.items() if k.startswith(ph)}
        self.backbone.save_pretrained(str(d / BACKBONE_DIR), state_dict=backbone_sd, **kwargs)
        save_file(head_sd, str(d / HEAD_WEIGHTS), metadata={"format": "pt"})
        atomic_write_json(d / HEAD_CONFIG, self.head_config())

    @classmethod
    def from_pretrained(cls, directory, **kwargs) -> "PromptHeadClassifier":
        from safetensors.torch import load_file
        from transformers import AutoModel

        d = Path(directory)
        try:
            meta = json.loads((d / HEAD_CONFIG).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"cannot read {d / HEAD_CONFIG}: {e}") from e
        if meta.get("format") != HEAD_FORMAT:
            raise CheckpointError(f"{d / HEAD_CONFIG} is not a {HEAD_FORMAT} file (format={meta.get('format')!r})")
        try:
            backbone = AutoModel.from_pretrained(str(d / BACKBONE_DIR), **kwargs)
        except OSError as e:
            raise CheckpointError(f"cannot load the backbone of {d}: {str(e).splitlines()[0] if str(e) else e}") from e
        drop_unused_pooler(backbone)
        model = cls(backbone, kind=meta["kind"], num_labels=meta["num_labels"], mask_token_id=meta.get("mask_token_id"),
                    head_hidden_size=meta.get("head_hidden_size"), dropout=meta.get("dropout", 0.1),
                    causal_positions=meta.get("causal_positions", False), id2label=meta.get("id2label"),
                    problem_type=meta.get("problem_type"))
        try:
            model.head.load_state_dict(load_file(str(d / HEAD_WEIGHTS)))
        except (OSError, RuntimeError) as e:
            raise CheckpointError(f"cannot load the head weights {d / HEAD_WEIGHTS}: {str(e).splitlines()[0]}") from e
        return model


# ----------------------------------------------------------------------------- entry points


def build_classifier(path: str, cfg, task, tokenizer):
    """Return a model whose forward gives ``.logits`` of shape [batch, num_labels]."""
    from cmiexp.models.factory import load_model

    head = head_name(cfg)
    if head == "pooling":
        return load_model(path, cfg.model, task, kind="classification", tokenizer=tokenizer)
    family = str(setting(cfg.model, "family", "model"))
    if family == "seq2seq":
        raise ConfigError(f"head={head} needs an encoder or decoder model, not the encoder-decoder "
                          f"model={cfg.model.name}; use head=pooling")
    mask_id = None
    if head == "masking":
        mask_id = getattr(tokenizer, "mask_token_id", None)
        if mask_id is None:
            raise ConfigError(f"head=masking needs a tokenizer with a mask token, but model={cfg.model.name} has none; "
                              "use head=generation (decoders) or head=pooling")
    backbone = drop_unused_pooler(load_model(path, cfg.model, task, kind="base", tokenizer=tokenizer))
    hc = cfg.head
    return PromptHeadClassifier(
        backbone, kind=head, num_labels=task.num_labels, mask_token_id=mask_id,
        head_hidden_size=setting(hc, "hidden_size", "head"), dropout=float(setting(hc, "dropout", "head")),
        causal_positions=family == "decoder", id2label=task.id2label,
        problem_type="regression" if task.is_regression else "single_label_classification",
    )


def load_classifier(directory, **kwargs):
    """Load any ``checkpoint/best``: a prompt-head model or a Hugging Face sequence classifier."""
    d = Path(directory)
    if (d / HEAD_CONFIG).is_file():
        return PromptHeadClassifier.from_pretrained(d, **kwargs)
    from transformers import AutoModelForSequenceClassification

    try:
        return AutoModelForSequenceClassification.from_pretrained(str(d), **kwargs)
    except OSError as e:
        raise CheckpointError(f"cannot load a classifier from {d}: {str(e).splitlines()[0] if str(e) else e}") from e


def apply_peft(model, cfg):
    """Parameter-efficient fine-tuning chosen by the ``peft`` group (``none`` = full fine-tuning)."""
    from cmiexp.models.peft_methods import apply_peft_config

    return apply_peft_config(model, optional_setting(cfg, "peft"))


# The batch keys a classifier can be fed, in the order a batch lists them.
MODEL_INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")


def model_input_keys(model) -> set[str]:
    """Batch keys the model's forward accepts (works for prompt heads and PEFT-injected models)."""
    return set(inspect.signature(model.forward).parameters) & set(MODEL_INPUT_KEYS)


__all__ = [
    "HEADS", "InputSuffix", "MODEL_INPUT_KEYS", "MLPHead", "PromptHeadClassifier", "apply_peft", "build_classifier",
    "causal_position_ids", "drop_unused_pooler", "head_name", "head_prompt", "input_suffix",
    "last_token_positions", "load_classifier", "mask_positions", "model_input_keys",
]
