"""``cmiexp <overrides> --dry-run``: sizes, memory and step count of a run, without loading weights.

The model is built exactly as a run builds it (``build_classifier`` + ``apply_peft`` for
classification, the seq2seq LM for chain-of-thought tasks) but on PyTorch's meta device, from the
model's ``config.json`` only: from the hub (one small file), a local folder, a tiny model, or,
when none of these can be read (offline), the published values in
``cmiexp/models/hub_configs.py``. Nothing is allocated.

Memory per process (all on the accelerator):

* weights: every parameter in fp32 (Accelerate's mixed precision keeps fp32 master weights);
  with RoCoFT also the full weight of each adapted layer, which it rebuilds as a plain tensor;
* gradients: fp32, trainable parameters only;
* AdamW state: two fp32 moments per trainable parameter;
* activations: *measured*, not guessed: one training forward at the configured per-process batch
  and the longest sequence (``task.max_length``; chain-of-thought: input and target lengths, and
  both branches when the objective trains the rationale) runs on meta tensors while a
  saved-tensors hook adds up every tensor autograd keeps for the backward pass (distinct storages,
  parameters excluded). For ``bf16``/``fp16`` the forward runs under an emulation of CUDA autocast
  (matrix products in half precision, normalisation, softmax and losses in fp32; half-precision
  weight copies are counted under activations, as autocast keeps them for the backward pass). The
  B x heads x S x S attention probabilities are reported separately: fused SDPA attention (flash /
  memory-efficient, the default on GPUs) does not keep them.

Not included: the CUDA context and allocator slack (typically 0.5-2 GiB), temporary buffers of the
backward pass, a KD teacher (it runs without gradients, or from its cache), evaluation batches.
FLOPs per optimizer step use the usual 6 x parameters x tokens (forward 2, backward 4).

Also ``python -m cmiexp.dry_run <overrides>``.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode  # the documented hook for dispatch-level modes

from cmiexp.errors import CmiexpError, ConfigError

GIB = 2 ** 30


# ----------------------------------------------------------------------------- meta execution


class MetaScalars(TorchDispatchMode):
    """Lets a forward pass run on meta tensors.

    transformers and our heads read a few values back to Python (``mask.all()`` to skip building an
    attention mask, ``pad_token_id in input_ids`` for a warning, ``bool(missing.any())`` for a
    check). A meta tensor has no value, so those reads answer "no": False / 0. That takes the
    general path everywhere (the attention mask is built, no check fires), which is the path a
    padded batch takes on a real device."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._local_scalar_dense.default and args and args[0].is_meta:
            t = args[0]
            if t.dtype == torch.bool:
                return False
            return 0.0 if t.dtype.is_floating_point else 0
        return func(*args, **kwargs)


_F = torch.nn.functional
# CUDA autocast's lists, the entries that matter for transformers: matrix products run in half
# precision; normalisation, softmax and losses in fp32 (other ops follow their inputs).
_HALF_OPS = {_F.linear, torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.bmm, torch.baddbmm,
             torch.addmm, torch.mm, torch.einsum, _F.scaled_dot_product_attention, torch.Tensor.bmm,
             torch.Tensor.mm}
_FP32_OPS = {_F.layer_norm, _F.softmax, _F.log_softmax, _F.cross_entropy, _F.mse_loss, _F.nll_loss,
             torch.softmax, torch.log_softmax, torch.Tensor.softmax, torch.Tensor.log_softmax}
if hasattr(_F, "rms_norm"):
    _FP32_OPS.add(_F.rms_norm)


def _storage_key(t: torch.Tensor) -> int:
    # Meta tensors have no data pointer; the storage object's handle identifies shared storage
    # (views of one tensor, a tensor saved by several ops).
    return t.untyped_storage()._cdata


class AutocastEmulation(TorchFunctionMode):
    """CUDA autocast for meta tensors (torch.autocast does not apply to the meta device)."""

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype
        self.weight_copies: set[int] = set()
        self._alive: list[torch.Tensor] = []

    def _cast(self, x, dtype):
        if isinstance(x, torch.Tensor) and x.is_floating_point() and x.dtype != dtype:
            y = x.to(dtype)
            if isinstance(x, torch.nn.Parameter):
                self.weight_copies.add(_storage_key(y))
                self._alive.append(y)  # a freed storage's handle could be reused by a later tensor
            return y
        if isinstance(x, (list, tuple)):
            return type(x)(self._cast(v, dtype) for v in x)
        return x

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _HALF_OPS:
            args, kwargs = self._cast(args, self.dtype), {k: self._cast(v, self.dtype) for k, v in kwargs.items()}
        elif func in _FP32_OPS:
            args = self._cast(args, torch.float32)
            kwargs = {k: (self._cast(v, torch.float32) if k != "dtype" else v) for k, v in kwargs.items()}
        return func(*args, **kwargs)


@dataclass
class ActivationMeasure:
    total_bytes: int = 0
    attention_prob_bytes: int = 0
    weight_copy_bytes: int = 0
    rebuilt_weight_bytes: int = 0
    num_tensors: int = 0
    output: object = None

    @property
    def fused_attention_bytes(self) -> int:
        return self.total_bytes - self.attention_prob_bytes


def measure_forward(model: torch.nn.Module, forward, precision: str = "no", seq_lens=()) -> ActivationMeasure:
    """Run ``forward(model)`` (returning a scalar loss or outputs) on meta tensors and add up what
    autograd saves for the backward pass. ``seq_lens``: sequence lengths whose L x L' score
    matrices count as attention probabilities."""
    params = {_storage_key(p) for p in model.parameters()} | {_storage_key(b) for b in model.buffers()}
    saved: dict[int, tuple[int, bool]] = {}

    def pack(t: torch.Tensor):
        if t.is_meta:
            key = _storage_key(t)
            if key not in params:
                nbytes = t.untyped_storage().nbytes()
                is_scores = (t.dim() == 4 and t.is_floating_point() and t.shape[1] > 1
                             and t.shape[-1] in seq_lens and t.shape[-2] in seq_lens)
                prev = saved.get(key, (0, False))
                saved[key] = (max(prev[0], nbytes), prev[1] or is_scores)
        return t

    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    autocast = AutocastEmulation(half) if half is not None else None
    with MetaScalars(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        if autocast is not None:
            with autocast:
                out = forward(model)
        else:
            out = forward(model)
    m = ActivationMeasure(output=out, num_tensors=len(saved))
    # RoCoFT keeps each adapted layer's full weight as a plain tensor attribute, rebuilt from its
    # trainable and frozen parts before every forward (cmiexp/models/peft_methods.py): memory held
    # from step to step, counted on its own and not as an activation.
    rebuilt = {}
    for mod in model.modules():
        w = getattr(mod, "weight", None)
        if hasattr(mod, "rocoft_trainable") and isinstance(w, torch.Tensor) and not isinstance(w, torch.nn.Parameter):
            rebuilt[_storage_key(w)] = w.untyped_storage().nbytes()
    m.rebuilt_weight_bytes = sum(rebuilt.values())
    for key in rebuilt:
        saved.pop(key, None)
    m.num_tensors = len(saved)
    for key, (nbytes, is_scores) in saved.items():
        m.total_bytes += nbytes
        if is_scores:
            m.attention_prob_bytes += nbytes
        if autocast is not None and key in autocast.weight_copies:
            m.weight_copy_bytes += nbytes
    return m


def meta_batch(batch: int, length: int, with_token_types: bool = False) -> dict:
    """A meta batch of ``batch`` x ``length`` token ids with a full attention mask."""
    ids = torch.empty(batch, length, dtype=torch.long, device="meta")
    out = {"input_ids": ids, "attention_mask": torch.empty(batch, length, dtype=torch.long, device="meta")}
    if with_token_types:
        out["token_type_ids"] = torch.empty(batch, length, dtype=torch.long, device="meta")
    return out


# ----------------------------------------------------------------------------- building without weights


def tokenizer_ids(entry) -> SimpleNamespace:
    """Stand-in for a tokenizer that cannot be downloaded: the special ids building a model needs
    (pad falls back to EOS as in ``load_tokenizer``)."""
    pad = entry.pad_token_id if entry.pad_token_id is not None else entry.eos_token_id
    return SimpleNamespace(pad_token_id=pad, mask_token_id=entry.mask_token_id, eos_token_id=entry.eos_token_id,
                           mask_token="<mask>" if entry.mask_token_id is not None else None, source="published ids")


def build_meta_model(cfg, task, config, tokenizer):
    """The model a run with ``cfg`` trains, on the meta device, from ``config``."""
    from cmiexp.models.factory import load_model, without_weights
    from cmiexp.models.heads import apply_peft, build_classifier

    with without_weights(config):
        if str(cfg.model.get("family")) == "seq2seq" or str(task_loader(cfg)) == "cot":
            peft = str(cfg.peft.name or "none")
            if peft != "none":  # as CotAdapter.setup
                raise ConfigError(f"peft={peft} is not implemented for chain-of-thought (seq2seq) tasks; use peft=none")
            return load_model("<meta>", cfg.model, task, kind="seq2seq", tokenizer=tokenizer)
        model = build_classifier("<meta>", cfg, task, tokenizer)
    # The prompt heads' MLP is built outside the backbone's loader (on the CPU); a run moves the
    # whole model to its device, here that device is meta.
    return apply_peft(model.to("meta"), cfg)


def task_loader(cfg) -> str:
    return str(cfg.task.get("loader"))


@dataclass
class Estimate:
    model: str
    config_source: str
    tokenizer_source: str
    model_class: str
    head: str
    peft: str
    total_params: int
    trainable_params: int
    precision: str
    processes: int
    batch_size: int
    grad_accum: int
    seq_desc: str
    tokens_per_step: int
    activations: ActivationMeasure
    num_train_samples: int | None
    steps_per_epoch: int | None
    optimizer_steps: int | None
    epochs: int | None
    data_error: str | None = None
    notes: list = field(default_factory=list)

    @property
    def weight_bytes(self) -> int:
        return 4 * self.total_params

    @property
    def grad_bytes(self) -> int:
        return 4 * self.trainable_params

    @property
    def optimizer_bytes(self) -> int:
        return 8 * self.trainable_params

    def total_bytes(self, fused_attention: bool) -> int:
        act = self.activations.fused_attention_bytes if fused_attention else self.activations.total_bytes
        return self.weight_bytes + self.activations.rebuilt_weight_bytes + self.grad_bytes + self.optimizer_bytes + act


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def resolve_config(cfg, task):
    """(config, tokenizer or stand-in, config source, tokenizer source) for ``cfg.model``."""
    from transformers import AutoConfig

    from cmiexp.models.factory import default_cache_dir, load_tokenizer, resolve_model_path
    from cmiexp.models.hub_configs import find_by_path, published_config

    path = resolve_model_path(cfg.model, task, default_cache_dir(cfg.paths))
    common = dict(revision=cfg.model.get("revision"), trust_remote_code=bool(cfg.model.trust_remote_code))
    entry = find_by_path(path) if not cfg.model.get("tiny") else None
    try:
        config = AutoConfig.from_pretrained(path, **common)
        config_source = f"{path} (config.json)"
    except (OSError, ValueError) as e:
        if entry is None:
            raise CmiexpError(f"cannot read the configuration of model {path!r} ({_first_line(e)}); "
                              "set model.name_or_path to a local folder with a config.json") from e
        config = published_config(entry.name)
        config_source = (f"published values in cmiexp/models/hub_configs.py ({entry.hub_id}: hub not reachable)")
    try:
        tokenizer = load_tokenizer(path, cfg.model)
        tok_source = path
    except CmiexpError:
        if entry is None:
            raise
        tokenizer = tokenizer_ids(entry)
        tok_source = "special token ids from cmiexp/models/hub_configs.py (tokenizer not reachable)"
    return config, tokenizer, config_source, tok_source


def _load_task_for_estimate(cfg):
    """The task's data (for the number of training examples), or (None, error line)."""
    from omegaconf import OmegaConf

    from cmiexp.data import load_task

    task_cfg = cfg.task
    if task_loader(cfg) == "cot":
        from cmiexp.objectives.cot import cot_data_spec

        spec = cot_data_spec(cfg.objective)
        if spec.label_source is not None:
            task_cfg = OmegaConf.merge(task_cfg, {"label_source": spec.label_source})
    try:
        return load_task(task_cfg), None
    except CmiexpError as e:
        return None, _first_line(e)


def optimizer_steps(num_train: int, batch_size: int, processes: int, grad_accum: int, epochs: int,
                    max_steps: int) -> tuple[int, int, int]:
    """(updates per epoch, total optimizer steps, epochs), as ``Run.execute`` counts them."""
    steps_per_epoch_global = math.ceil(num_train / (batch_size * processes))
    updates_per_epoch = math.ceil(steps_per_epoch_global / grad_accum)
    total = max_steps if max_steps > 0 else updates_per_epoch * epochs
    return updates_per_epoch, total, math.ceil(total / updates_per_epoch)


def estimate(cfg, processes: int | None = None) -> Estimate:
    from cmiexp.models.factory import count_parameters
    from cmiexp.train.optim import resolve_mixed_precision

    t = cfg.trainer
    processes = int(processes or os.environ.get("WORLD_SIZE", "1") or 1)
    task, data_error = _load_task_for_estimate(cfg)
    if task is None and cfg.model.get("tiny"):
        raise CmiexpError(f"a tiny model builds its tokenizer from the task's training text: {data_error}")
    if task is None:
        # Without data only the label count is missing; take it from the task config.
        task = _task_stub(cfg)
    config, tokenizer, config_source, tok_source = resolve_config(cfg, task)
    model = build_meta_model(cfg, task, config, tokenizer)
    trainable, total = count_parameters(model)
    precision = resolve_mixed_precision(str(t.mixed_precision))
    bs = int(t.batch_size)
    notes = []
    if task_loader(cfg) == "cot":
        from cmiexp.objectives.cot import cot_data_spec

        spec = cot_data_spec(cfg.objective)
        s_in = int(cfg.task.max_input_length)
        s_out = int(cfg.task.max_target_length)
        branches = 2 if spec.rationale else 1

        def forward(m):
            loss = 0
            for _ in range(branches):
                b = meta_batch(bs, s_in)
                labels = torch.empty(bs, s_out, dtype=torch.long, device="meta")
                loss = loss + m(**b, labels=labels).loss
            return loss

        seq_lens = (s_in, s_out)
        seq_desc = f"{branches} branch(es) x (input {s_in} + target {s_out} tokens)"
        tokens = bs * branches * (s_in + s_out)
    else:
        from cmiexp.models.heads import model_input_keys

        s = int(cfg.task.max_length)
        keys = model_input_keys(model)
        use_tt = "token_type_ids" in keys and int(getattr(config, "type_vocab_size", 0) or 0) > 1

        def forward(m):
            logits = m(**meta_batch(bs, s, with_token_types=use_tt)).logits
            labels = torch.empty(bs, dtype=torch.long if not task.is_regression else torch.float, device="meta")
            if task.is_regression:
                return _F.mse_loss(logits.float().squeeze(-1), labels)
            return _F.cross_entropy(logits.float(), labels)

        seq_lens = (s,)
        seq_desc = f"{s} tokens (task.max_length; batches are padded to their longest row, so this is the peak)"
        tokens = bs * s
    model.train()  # as in the training loop: dropout masks are kept for the backward pass
    acts = measure_forward(model, forward, precision, seq_lens)
    n_train = len(task.train) if getattr(task, "train", None) is not None and data_error is None else None
    per_epoch = total_steps = epochs = None
    if n_train:
        per_epoch, total_steps, epochs = optimizer_steps(n_train, bs, processes, int(t.grad_accum), int(t.epochs),
                                                         int(t.max_steps))
    elif int(t.max_steps) > 0:
        total_steps = int(t.max_steps)
    if str(cfg.objective.get("name")) == "kd":
        notes.append("objective=kd: the teacher's memory is not included (it runs without gradients, or from its cache)")
    return Estimate(
        model=str(cfg.model.name), config_source=config_source, tokenizer_source=tok_source,
        model_class=type(getattr(model, "backbone", model)).__name__ + (
            f" + {type(model).__name__}" if hasattr(model, "backbone") else ""),
        head=str(cfg.head.name) if task_loader(cfg) != "cot" else "seq2seq LM",
        peft=str(cfg.peft.name), total_params=total, trainable_params=trainable,
        precision=precision, processes=processes, batch_size=bs, grad_accum=int(t.grad_accum), seq_desc=seq_desc,
        tokens_per_step=tokens * int(t.grad_accum) * processes, activations=acts, num_train_samples=n_train,
        steps_per_epoch=per_epoch, optimizer_steps=total_steps, epochs=epochs, data_error=data_error, notes=notes)


def _task_stub(cfg):
    """Label count and type from the task config alone (when its data cannot be read)."""
    from cmiexp.data.glue import GLUE_TASKS

    info = GLUE_TASKS.get(str(cfg.task.get("dataset") or "")) if task_loader(cfg) == "glue" else None
    if info is None:
        raise ConfigError(f"cannot estimate task={cfg.task.name} without its data; set task.data_dir to a local copy")
    labels = list(info.label_names or [])
    n = len(labels) if labels else 1
    return SimpleNamespace(num_labels=n, is_regression=not labels, id2label=dict(enumerate(labels)) if labels else {0: "score"},
                           train=None, name=cfg.task.name)


def _gib(n: int) -> str:
    return f"{n / GIB:8.2f} GiB"


def _count(n: int) -> str:
    return f"{n:,} ({n / 1e6:.1f}M)"


def format_estimate(e: Estimate) -> str:
    a = e.activations
    lines = [
        f"cmiexp dry run: model={e.model} ({e.model_class}), head={e.head}, peft={e.peft}",
        f"  config:             {e.config_source}",
        f"  tokenizer:          {e.tokenizer_source}",
        f"  parameters:         {_count(e.total_params)}",
        f"  trainable:          {_count(e.trainable_params)} ({100 * e.trainable_params / max(e.total_params, 1):.2f}%)",
        f"  batch:              {e.batch_size} per process x {e.processes} process(es) x grad_accum {e.grad_accum}, "
        f"{e.seq_desc}",
        f"  precision:          {e.precision} (weights, gradients and AdamW state in fp32)",
        "  memory per process:",
        f"    weights           {_gib(e.weight_bytes)}",
        *([f"    RoCoFT full weights {_gib(a.rebuilt_weight_bytes).strip()} (rebuilt from the trainable and frozen parts "
             "and kept between steps)"] if a.rebuilt_weight_bytes else []),
        f"    gradients         {_gib(e.grad_bytes)}",
        f"    AdamW state       {_gib(e.optimizer_bytes)}",
        f"    activations       {_gib(a.total_bytes)}  measured: {a.num_tensors} tensors kept for backward"
        + (f", incl. {_gib(a.weight_copy_bytes).strip()} half-precision copies of parameters" if a.weight_copy_bytes else ""),
        f"      of which attention probabilities {_gib(a.attention_prob_bytes).strip()} (not kept by fused SDPA "
        "attention, the GPU default)",
        f"    total             {_gib(e.total_bytes(False))}  (eager attention); "
        f"{_gib(e.total_bytes(True)).strip()} with fused attention; plus CUDA context and allocator slack",
    ]
    if e.num_train_samples is not None:
        lines.append(f"  optimizer steps:    {e.optimizer_steps:,} ({e.steps_per_epoch:,} per epoch x {e.epochs} "
                     f"epoch(s); {e.num_train_samples:,} training examples)")
    elif e.optimizer_steps is not None:
        lines.append(f"  optimizer steps:    {e.optimizer_steps:,} (trainer.max_steps)")
    else:
        lines.append("  optimizer steps:    unknown: the training data could not be read")
    if e.optimizer_steps is not None:
        flops = 6 * e.total_params * e.tokens_per_step
        lines.append(f"  compute:            {flops:.2e} FLOPs per optimizer step (6 x params x {e.tokens_per_step:,} "
                     f"tokens at the peak length), {flops * e.optimizer_steps:.2e} in all")
    for n in e.notes:
        lines.append(f"  note: {n}")
    if e.data_error:
        lines.append(f"  data: {e.data_error}")
    lines.append("  no weights were loaded (meta device)")
    return "\n".join(lines)


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from cmiexp.config import CONF_DIR
    from cmiexp.resolvers import register_resolvers

    register_resolvers()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides))


def main(argv: list[str] | None = None) -> int:
    """``cmiexp <overrides> --dry-run``: print the estimate; 1 with a one-line error on bad input."""
    import logging

    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    argv = [a for a in (sys.argv[1:] if argv is None else argv) if a != "--dry-run"]
    if any(a == "-m" or a == "--multirun" for a in argv):
        print("cmiexp: error: --dry-run estimates one run; drop -m and give one value per key", file=sys.stderr)
        return 1
    for name in ("transformers", "datasets", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        cfg = compose(argv)
        e = estimate(cfg)
    except (HydraException, OmegaConfBaseException) as err:
        print(f"cmiexp: error: {_first_line(err)}", file=sys.stderr)
        return 1
    except CmiexpError as err:
        print(f"cmiexp: error: {_first_line(err)}", file=sys.stderr)
        return 1
    print(format_estimate(e))
    return 1 if e.data_error and e.optimizer_steps is None else 0


if __name__ == "__main__":
    sys.exit(main())
