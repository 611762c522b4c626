"""One training run: data -> model -> Accelerate loop -> checkpoints, metrics and results.

The loop knows nothing about objectives beyond the ``Objective`` interface; the math lives in
``cmiexp/objectives``. Every file a run writes lives in its run directory.
"""

from __future__ import annotations

import inspect
import logging
import math
import os
import signal
import time
from dataclasses import asdict
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from cmiexp.errors import CmiexpError, ConfigError, DataError, TrainingDiverged
from cmiexp.io import append_jsonl, atomic_write_text
# RESULTS, SCHEMA and read_results stay importable from here for the probe runner.
from cmiexp.runs import (RESULTS, SCHEMA, RunLock, RunRefused, check_resume_compatible, read_results,
                         run_config_record, write_results, write_run_config)
from cmiexp.train.checkpoint import (
    TrainerState,
    apply_retention,
    has_checkpoint,
    latest_dir,
    load_training_state,
    recover_latest,
    save_best,
    save_training_state,
)
from cmiexp.train.distributed import check_fsdp_applied, distributed_fields
from cmiexp.train.environment import peak_memory_mb, quiet_libraries
from cmiexp.train.settings import check_config
from cmiexp.train.step import FiniteLossWatch, drop_padded_rows, logged_scalars
from cmiexp.train.evaluate import evaluate
from cmiexp.runs.logs import EVAL_LOG as METRICS, TRAIN_LOG  # file names: the run-directory contract

log = logging.getLogger("cmiexp")

# Run directories whose results.json this process wrote: a failure may update only those, never
# a result left by an earlier invocation (e.g. a checkpoint of another task in the same folder).
STARTED_RUN_DIRS: set[str] = set()


class Preempted(CmiexpError):
    """SIGTERM/SIGINT arrived; a checkpoint was saved and the run can be resumed."""


class _StopFlag:
    """Set by SIGTERM/SIGINT; the loop checks it between steps and checkpoints before exiting."""

    def __init__(self):
        self.signum = None
        self._old = {}

    def install(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not in the main thread (e.g. some launchers): no handler
                pass

    def _handle(self, signum, frame):
        if self.signum is not None:  # second signal: give up immediately
            raise KeyboardInterrupt
        self.signum = signum

    def restore(self):
        for sig, h in self._old.items():
            signal.signal(sig, h)


def resolve_mixed_precision(value: str) -> str:
    if value != "auto":
        return value
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "no"


def _parse_every(value, name: str) -> int | None:
    """"epoch" -> None; a positive int -> steps."""
    if value in (None, "epoch"):
        return None
    try:
        v = int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}={value!r} must be 'epoch' or a positive number of steps") from None
    if v <= 0:
        raise ConfigError(f"{name}={value!r} must be 'epoch' or a positive number of steps")
    return v


def _optimizer(model, cfg, device="cpu"):
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # Biases and normalisation weights are not decayed (standard BERT recipe).
        (no_decay if p.ndim < 2 or "norm" in n.lower() else decay).append(p)
    t = cfg.trainer
    # On CUDA the fused AdamW kernel updates every parameter in one launch; elsewhere torch's default
    # (foreach where supported) is kept. Same update rule either way.
    fused = {"fused": True} if torch.device(device).type == "cuda" else {}
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": float(t.weight_decay)}, {"params": no_decay, "weight_decay": 0.0}],
        lr=float(t.lr), betas=tuple(t.adam_betas), eps=float(t.adam_eps), **fused,
    )


def _scheduler(optimizer, cfg, total_steps: int, num_processes: int = 1):
    from transformers import get_scheduler

    t = cfg.trainer
    warmup = int(t.warmup_steps) if int(t.warmup_steps) > 0 else int(round(float(t.warmup_ratio) * total_steps))
    name = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}[t.scheduler]
    # Accelerate's prepared scheduler advances once per process at every optimizer step, so the
    # schedule is laid out in those units to keep the lr curve independent of the process count.
    return get_scheduler(name, optimizer=optimizer, num_warmup_steps=warmup * num_processes,
                         num_training_steps=total_steps * num_processes)


def loader_pin_memory(t, device) -> bool:
    """trainer.pin_memory: auto = on for CUDA (host-to-device copies overlap compute), off on CPU."""
    value = t.get("pin_memory", "auto")
    if str(value) == "auto":
        return torch.device(device).type == "cuda"
    return bool(value)


def train_sampler(train_ds, cfg, num_processes: int):
    """The training sampler: length-grouped (trainer.group_by_length, default) or None for the plain
    seeded shuffle (Accelerate's seedable sampler). Grouping is over global batches (per-process batch
    x processes), so 1 and N processes train on the same batches."""
    t = cfg.trainer
    if not bool(t.get("group_by_length", False)):
        return None
    from cmiexp.data.length_grouping import LengthGroupedSampler, sequence_lengths

    return LengthGroupedSampler(sequence_lengths(train_ds), int(t.batch_size) * int(num_processes), int(cfg.seed))


class ClassificationAdapter:
    """Sequence classification / regression with a Hugging Face head (encoders and decoders).

    An adapter owns what differs between task families: data, model kind, batches and
    evaluation. The loop, checkpoints and outputs are shared (see ``register_adapter``)."""

    task_type = "classification"

    def setup(self, run):
        from cmiexp.data import load_task
        from cmiexp.data.tokenize import tokenize_split
        from cmiexp.models.factory import default_cache_dir, load_tokenizer, resolve_model_path
        from cmiexp.data.targets import normalize_task_targets
        from cmiexp.models.heads import apply_peft, build_classifier, input_suffix, load_classifier
        from cmiexp.train.init_from import load_init_weights, resolve_init

        cfg, acc = run.cfg, run.accelerator
        cache_dir = default_cache_dir(cfg.paths)
        # Rank 0 builds caches (tiny model, tokenised splits) first; the others then read them.
        with acc.main_process_first():
            task = load_task(cfg.task)
            # Regression targets: normalised with train statistics, metrics un-normalised (evaluate.py).
            normalize_task_targets(task, cfg.task.get("normalize_targets"))
            if task.train is None or len(task.train) == 0:
                raise DataError(f"task={task.name} has no training data; choose a task with a train split")
            if not task.eval_splits:
                raise DataError(f"task={task.name} has no labelled dev split to evaluate on")
            path = resolve_model_path(cfg.model, task, cache_dir)
            init = resolve_init(cfg, task)  # trainer.init_from: checked before anything is trained
            # A run started from a checkpoint reads text through that checkpoint's own tokenizer.
            tokenizer = load_tokenizer(str(init.checkpoint_dir) if init else path, cfg.model)
            max_len = int(cfg.task.get("max_length", 128))
            suffix = input_suffix(cfg, tokenizer)  # head=masking/generation: prompt appended to every input
            train = tokenize_split(task.train, task, tokenizer, max_len, cache_dir, "train", suffix=suffix)
            evals = {a: tokenize_split(d, task, tokenizer, max_len, cache_dir, a, suffix=suffix)
                     for a, d in task.eval_splits.items()}
        for alias, d in {"train": train, **evals}.items():
            if len(d) == 0:
                raise DataError(f"task={task.name} split {alias!r} is empty")
        with torch.random.fork_rng(devices=[]):
            # The head's initialisation depends on the run seed only, not on what ran before.
            torch.manual_seed(int(cfg.seed))
            model = build_classifier(path, cfg, task, tokenizer)
            if init is not None:
                load_init_weights(model, init, load_classifier)
            model = apply_peft(model, cfg)
        run.task, run.tokenizer, run.model_path = task, tokenizer, path
        run.train_ds, run.eval_ds = train, evals
        run.model = model
        run.input_keys = set(inspect.signature(model.forward).parameters) & {
            "input_ids", "attention_mask", "token_type_ids", "position_ids"}

    def loaders(self, run):
        from torch.utils.data import DataLoader
        from transformers import DataCollatorWithPadding

        t = run.cfg.trainer
        cols = ["input_ids", "attention_mask", "labels", "idx"] + (
            ["token_type_ids"] if "token_type_ids" in run.input_keys and "token_type_ids" in run.train_ds.column_names else [])
        collate = DataCollatorWithPadding(run.tokenizer, pad_to_multiple_of=None)

        workers = int(t.num_workers)
        # Pinned host memory lets the copy to a GPU overlap compute; it only costs on CPU.
        pin = loader_pin_memory(t, run.accelerator.device)

        def make(ds, shuffle, bs, sampler=None):
            ds = ds.with_format(columns=[c for c in cols if c in ds.column_names])
            g = torch.Generator()
            g.manual_seed(int(run.cfg.seed))
            return DataLoader(ds, batch_size=bs, shuffle=shuffle if sampler is None else False, sampler=sampler,
                              collate_fn=collate, num_workers=workers, generator=g, pin_memory=pin,
                              persistent_workers=workers > 0)

        run.train_loader = make(run.train_ds, True, int(t.batch_size), train_sampler(run.train_ds, run.cfg,
                                                                                     run.accelerator.num_processes))
        run.full_train_loader = make(run.train_ds, False, int(t.eval_batch_size))
        run.eval_loaders = {a: make(d, False, int(t.eval_batch_size)) for a, d in run.eval_ds.items()}
        if t.eval_on_train:
            n = min(int(t.eval_train_samples), len(run.train_ds))
            run.eval_loaders["train"] = make(run.train_ds.select(range(n)), False, int(t.eval_batch_size))

    def evaluate(self, run, model, eval_loaders) -> dict:
        return evaluate(model, eval_loaders, run.accelerator, run.task, run.input_keys)

    def finalize(self, run, model, results: dict) -> None:
        """Hook after training (e.g. test-set predictions); results may be extended in place."""
        if run.task.extra.get("target_scale"):
            results["target_scale"] = run.task.extra["target_scale"]


_ADAPTERS: dict[str, str] = {"default": "cmiexp.train.runner:ClassificationAdapter",
                             "cot": "cmiexp.train.cot_adapter:CotAdapter"}


def register_adapter(loader: str, target: str) -> None:
    """Task loaders whose tasks need another adapter (e.g. ``cot`` -> seq2seq generation)."""
    _ADAPTERS[loader] = target


def has_own_adapter(loader: str) -> bool:
    """True for task loaders with an adapter of their own (e.g. chain-of-thought generation), i.e.
    tasks that are not plain classification or regression."""
    return str(loader) in _ADAPTERS and str(loader) != "default"


def make_adapter(cfg):
    import importlib

    target = _ADAPTERS.get(str(cfg.task.get("loader")), _ADAPTERS["default"])
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)()


class Run:
    """State and steps of one run. ``execute()`` does everything and returns the results dict."""

    def __init__(self, cfg: DictConfig, run_dir: str | os.PathLike, on_claim=None):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.stop = _StopFlag()
        self.on_claim = on_claim  # called once this run may write into run_dir (e.g. the CLI's .hydra/)

    # ------------------------------------------------------------------ setup
    def _setup_accelerator(self):
        from accelerate import Accelerator
        from accelerate.utils import DataLoaderConfiguration, set_seed

        t = self.cfg.trainer
        self.accelerator = Accelerator(
            mixed_precision=resolve_mixed_precision(str(t.mixed_precision)),
            gradient_accumulation_steps=int(t.grad_accum),
            # Accelerate picks gloo for several CPU processes (torchrun/accelerate launch) only with cpu=True.
            cpu=bool(t.cpu) or (int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()),
            # A seedable sampler makes the shuffle order a function of (seed, epoch): resume-safe
            # and identical for 1 and N processes.
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        )
        check_fsdp_applied(self.accelerator)  # an FSDP launch on CPU would silently run unsharded
        set_seed(int(self.cfg.seed))

    # ------------------------------------------------------------------ results
    def _base_results(self) -> dict:
        from hydra.core.hydra_config import HydraConfig

        overrides = []
        if HydraConfig.initialized():
            overrides = list(HydraConfig.get().overrides.task)
        cfg = self.cfg
        return {
            "schema": SCHEMA,
            "status": "running",
            "error": None,
            "experiment": cfg.get("experiment_name", "default"),
            "task": cfg.task.name,
            "task_type": ("regression" if getattr(getattr(self, "task", None), "is_regression", False)
                          else getattr(getattr(self, "adapter", None), "task_type", "classification")),
            "model": cfg.model.name,
            "objective": cfg.objective.name,
            "teacher_objective": cfg.objective.get("teacher_objective"),
            "teacher_model": cfg.objective.get("teacher_model"),
            "seed": int(cfg.seed),
            "head": (cfg.get("head") or {}).get("name", "pooling"),
            "peft": (cfg.get("peft") or {}).get("name", "none"),
            "primary_metric": getattr(getattr(self, "task", None), "primary_metric", cfg.task.get("primary_metric")),
            "overrides": overrides,
            "init_from": cfg.trainer.get("init_from"),
            "run_dir": str(self.run_dir.resolve()),
        }

    def _check_collapse(self, results: dict, best: dict, final: dict) -> None:
        """Flag a classifier whose dev predictions are (nearly) all one class, on the console and
        in results.json: its metric is the majority-class rate, not a learned result."""
        from cmiexp.train.evaluate import COLLAPSE_SHARE, collapse_fields

        share = float(self.cfg.trainer.get("collapse_share") or COLLAPSE_SHARE)
        fields = collapse_fields(best, final, getattr(self.task, "label_names", None), share)
        results.update(fields)
        if fields.get("collapsed") and self.accelerator.is_main_process:
            which = " and ".join(fields["collapsed_at"])
            hist = fields["predicted_class_histogram"][fields["collapsed_at"][0]]
            log.warning("COLLAPSED: the %s dev predictions are (nearly) all one class (%s); the model has not "
                        "learned task=%s: check trainer.lr (now %g), train longer or on more data", which,
                        ", ".join(f"{k}: {v}" for k, v in hist.items()), self.task.name, float(self.cfg.trainer.lr))

    def _write_results(self, results: dict):
        if self.accelerator.is_main_process:
            write_results(self.run_dir, results)
            STARTED_RUN_DIRS.add(str(self.run_dir.resolve()))

    # ------------------------------------------------------------------ main
    def execute(self) -> dict:
        from cmiexp.metrics import METRIC_HIGHER_IS_BETTER
        from cmiexp.models.factory import count_parameters
        from cmiexp.objectives import TrainContext, build_objective
        from cmiexp.train.progress import TrainProgress
        from cmiexp.train.summary import format_metric
        from cmiexp.train.tracking import make_tracker

        quiet_libraries()
        check_config(self.cfg)
        cfg, t = self.cfg, self.cfg.trainer
        resume = str(t.resume).lower()
        # The training config this run is (its identity); a directory trained with another one is
        # refused here, before anything is written (not even a completed run's results are reused).
        record = run_config_record(cfg)
        if resume != "false" and _is_rank_zero_env():
            check_resume_compatible(self.run_dir, record,
                                    latest_dir(self.run_dir) if has_checkpoint(self.run_dir) else None)
        prior = read_results(self.run_dir)
        if prior and prior.get("status") == "completed" and resume == "auto":
            log.info("run already completed: %s (trainer.resume=false in a new run directory retrains)", self.run_dir)
            return prior
        if resume == "false" and (has_checkpoint(self.run_dir) or prior):
            raise ConfigError(f"run directory {self.run_dir} already holds a run and trainer.resume=false; "
                              "remove it or use trainer.resume=auto to continue it")
        if _is_rank_zero_env() and resume != "false":
            # A crash in the middle of a checkpoint swap: put the newest complete checkpoint back.
            recovered = recover_latest(self.run_dir)
            if recovered:
                log.warning("%s", recovered)
        if resume == "true" and not has_checkpoint(self.run_dir):
            raise ConfigError(f"trainer.resume=true but {self.run_dir}/checkpoint/latest does not exist")

        self._setup_accelerator()
        acc = self.accelerator
        if acc.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        self.adapter = make_adapter(cfg)
        self.adapter.setup(self)
        self.adapter.loaders(self)
        trainable, total = count_parameters(self.model)
        results = self._base_results()
        results.update(trainable_params=trainable, total_params=total,
                       num_train_samples=len(self.train_ds),
                       num_eval_samples={a: len(d) for a, d in self.eval_ds.items()})

        optimizer = _optimizer(self.model, cfg, acc.device)
        steps_per_epoch_global = math.ceil(len(self.train_ds) / (int(t.batch_size) * acc.num_processes))
        updates_per_epoch = math.ceil(steps_per_epoch_global / int(t.grad_accum))
        total_steps = int(t.max_steps) if int(t.max_steps) > 0 else updates_per_epoch * int(t.epochs)
        num_epochs = math.ceil(total_steps / updates_per_epoch)
        scheduler = _scheduler(optimizer, cfg, total_steps, acc.num_processes)

        model, optimizer, train_loader, full_loader, scheduler = acc.prepare(
            self.model, optimizer, self.train_loader, self.full_train_loader, scheduler)
        eval_loaders = {a: acc.prepare(l) for a, l in self.eval_loaders.items()}
        ctx = TrainContext(accelerator=acc, model=model, task=self.task, cfg=cfg, run_dir=self.run_dir,
                           full_train_loader=full_loader, num_train_examples=len(self.train_ds))
        ctx.extra["input_keys"] = self.input_keys
        objective = build_objective(cfg, ctx)
        # Facts an objective learns while it is built (e.g. the objective/model of a KD teacher given
        # as a path) replace the config's values in results.json.
        results.update(getattr(objective, "result_fields", dict)())
        results.update(distributed_fields(acc, model))  # distributed_type; under FSDP the wrapped units

        num_labels = int(getattr(self.task, "num_labels", 0))
        state = TrainerState(task=self.task.name, model=cfg.model.name, num_labels=num_labels)
        if resume != "false" and has_checkpoint(self.run_dir):
            state = load_training_state(acc, self.run_dir, objective, self.task.name, num_labels, cfg.model.name)
            log.info("resuming %s at step %d (epoch %d, batch %d)", self.run_dir, state.global_step, state.epoch,
                     state.batches_in_epoch)
        ctx.global_step, ctx.epoch = state.global_step, state.epoch
        # Only now, with the checkpoint (if any) known to fit, does this run claim the directory.
        if acc.is_main_process:
            atomic_write_text(self.run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
            write_run_config(self.run_dir, record)
            if self.on_claim is not None:
                self.on_claim()
        results["config_hash"] = record["hash"]
        self._write_results(results)
        objective.setup(ctx)

        primary = self.task.primary_metric
        higher = METRIC_HIGHER_IS_BETTER.get(primary, True)
        eval_every = _parse_every(t.eval_every, "trainer.eval_every")
        save_every = _parse_every(t.save_every, "trainer.save_every")
        config_dict = OmegaConf.to_container(cfg, resolve=True)
        import hashlib

        run_id = hashlib.sha1(str(self.run_dir.resolve()).encode()).hexdigest()[:12]  # stable across resumes
        tracker = make_tracker(cfg, config_dict, self.run_dir, run_id, acc.is_main_process)
        results.update(tracker.result_fields())  # e.g. the W&B offline folder, for the summary's sync hint
        stop_after = t.get("stop_after_steps")

        overhead = {"eval_s": 0.0, "checkpoint_s": 0.0}  # excluded from the training throughput

        def do_eval(epoch_end: bool) -> dict:
            t0 = time.time()
            try:
                return _do_eval(epoch_end)
            finally:
                overhead["eval_s"] += time.time() - t0

        def checkpoint() -> None:
            t0 = time.time()
            state.train_time_s = time_before + time.time() - start
            save_training_state(acc, self.run_dir, state, objective, run_config=record)
            overhead["checkpoint_s"] += time.time() - t0

        def _do_eval(epoch_end: bool) -> dict:
            metrics = self.adapter.evaluate(self, model, eval_loaders)
            record = {"step": state.global_step, "epoch": state.epoch + (1 if epoch_end else 0),
                      "lr": scheduler.get_last_lr()[0], **{f"dev/{k}": v for k, v in metrics.items()}}
            if not math.isfinite(metrics.get(primary, float("nan"))):
                raise TrainingDiverged(f"primary metric {primary} is not finite at step {state.global_step}")
            better = state.best_metric is None or (
                metrics[primary] > state.best_metric if higher else metrics[primary] < state.best_metric)
            if better:
                state.best_metric, state.best_step = metrics[primary], state.global_step
                state.best_epoch, state.best_metrics = record["epoch"], dict(metrics)
                if t.save_best:
                    save_best(acc, model, self.tokenizer, self.run_dir,
                              {"step": state.global_step, "metric": primary, "value": metrics[primary]})
            if acc.is_main_process:
                append_jsonl(self.run_dir / METRICS, record)
                tracker.log(record, state.global_step)
                log.info("eval step %d: %s", state.global_step,
                         ", ".join(f"{k}={format_metric(v)}" for k, v in metrics.items() if isinstance(v, float)))
            return metrics

        self.stop.install()
        start = time.time()
        time_before = state.train_time_s
        samples_at_start = state.samples_seen
        last_metrics: dict = {}
        # The step keeps everything on the device (no float(loss) per step, no host synchronisation):
        # the running loss and the first non-finite loss are device tensors read at log, eval,
        # checkpoint and epoch-end time.
        running_loss, running_n = torch.zeros((), device=acc.device), 0
        watch = FiniteLossWatch(acc.device)
        interrupted = False
        pbar = TrainProgress(total_steps, state.global_step,
                             enabled=acc.is_local_main_process and bool(t.progress_bar)).start()
        try:
            model.train()
            while state.epoch < num_epochs and state.global_step < total_steps:
                epoch = state.epoch
                ctx.epoch = epoch
                train_loader.set_epoch(epoch)
                objective.on_epoch_start(ctx, epoch)
                model.train()
                loader = train_loader
                if state.batches_in_epoch:
                    from accelerate import skip_first_batches

                    loader = skip_first_batches(train_loader, state.batches_in_epoch)
                for batch in loader:
                    batch, weight, global_rows = drop_padded_rows(
                        batch, state.batches_in_epoch, acc.process_index, acc.num_processes, int(t.batch_size),
                        len(self.train_ds))
                    ctx.extra["batch_weight"] = weight  # 0: this process holds only padding rows
                    with acc.accumulate(model):
                        loss, extra = objective.compute_loss(model, batch, ctx)
                        watch.observe(loss, state.global_step, epoch)
                        acc.backward(loss * weight if weight != 1.0 else loss)
                        if acc.sync_gradients and t.max_grad_norm:
                            acc.clip_grad_norm_(model.parameters(), float(t.max_grad_norm))
                        optimizer.step()
                        scheduler.step()
                        optimizer.zero_grad()
                    state.batches_in_epoch += 1
                    state.samples_seen += global_rows
                    running_loss += loss.detach().float()
                    running_n += 1
                    if not acc.sync_gradients:
                        continue
                    state.global_step += 1
                    ctx.global_step = state.global_step
                    objective.after_step(ctx)
                    pbar.update(state.global_step, loss)  # the bar reads the loss only when it draws
                    if state.global_step % int(t.log_every) == 0:
                        watch.check()  # every rank: a diverged run stops before it logs, evaluates or saves
                        if acc.is_main_process:
                            rec = {"train/loss": float(running_loss) / max(running_n, 1),
                                   "train/lr": scheduler.get_last_lr()[0],
                                   **{f"train/{k}": v for k, v in logged_scalars(extra).items()}}
                            tracker.log(rec, state.global_step)
                            append_jsonl(self.run_dir / TRAIN_LOG, {"step": state.global_step, **rec})
                        running_loss.zero_()
                        running_n = 0
                    if eval_every and state.global_step % eval_every == 0:
                        watch.check()
                        last_metrics = do_eval(False)
                        model.train()
                    done = state.global_step >= total_steps
                    if not done and save_every and state.global_step % save_every == 0:
                        watch.check()
                        checkpoint()
                    if self.stop.signum is not None or (stop_after and state.global_step >= int(stop_after)):
                        interrupted = True
                        break
                    if done:
                        break
                watch.check()
                if interrupted:
                    break
                # End of epoch (or of max_steps): evaluate, then move the data position on.
                evaluated_now = bool(eval_every) and state.global_step % eval_every == 0
                if (eval_every is None or state.global_step >= total_steps) and not evaluated_now:
                    last_metrics = do_eval(True)
                state.epoch += 1
                state.batches_in_epoch = 0
                if state.global_step < total_steps:
                    checkpoint()
        finally:
            pbar.close()
            self.stop.restore()

        state.train_time_s = time_before + time.time() - start
        if interrupted:
            save_training_state(acc, self.run_dir, state, objective, run_config=record)
            results.update(status="interrupted", global_step=state.global_step)
            self._write_results(results)
            tracker.finish()
            if self.stop.signum is not None:
                raise Preempted(f"stopped by signal {self.stop.signum} at step {state.global_step}; "
                                f"checkpoint saved, re-run the same command to resume")
            log.info("stopped after %d steps (trainer.stop_after_steps); checkpoint saved", state.global_step)
            return results

        if not last_metrics:
            last_metrics = do_eval(True)
        self.adapter.finalize(self, model, results)
        # The final training state, then trimmed to trainer.checkpoint_retention once results are written.
        save_training_state(acc, self.run_dir, state, objective, run_config=record)
        new_samples = state.samples_seen - samples_at_start
        # Throughput of the training steps alone (evaluation and checkpoint writes excluded).
        elapsed = time.time() - start - overhead["eval_s"] - overhead["checkpoint_s"]
        results.update(
            status="completed",
            best={"step": state.best_step, "epoch": state.best_epoch, "metrics": state.best_metrics},
            final={"step": state.global_step, "epoch": state.epoch, "metrics": last_metrics},
            global_step=state.global_step,
            epochs=num_epochs,
            wall_time_s=state.train_time_s,
            train_samples_per_s=new_samples / elapsed if elapsed > 0 else None,
            eval_time_s=overhead["eval_s"],
            checkpoint_time_s=overhead["checkpoint_s"],
            peak_memory_mb=peak_memory_mb(acc.device),
            num_processes=acc.num_processes,
            mixed_precision=acc.mixed_precision,
        )
        results.update(objective_summary=getattr(objective, "summary", lambda: {})())
        self._check_collapse(results, state.best_metrics, last_metrics)
        self._write_results(results)
        if acc.is_main_process:
            apply_retention(self.run_dir, str(t.get("checkpoint_retention", "weights")))
            from cmiexp.report.curves import write_run_curves

            write_run_curves(self.run_dir, primary)  # curves.png; a plotting failure only warns
        if acc.is_main_process:
            tracker.summary({f"best/{k}": v for k, v in state.best_metrics.items()}
                            | {f"final/{k}": v for k, v in last_metrics.items()}
                            | {"wall_time_s": results["wall_time_s"]})
        tracker.finish()
        return results


def _is_rank_zero_env() -> bool:
    return os.environ.get("RANK", "0") == "0" and os.environ.get("LOCAL_RANK", "0") == "0"


def run_experiment(cfg: DictConfig, run_dir: str | os.PathLike | None = None, on_claim=None,
                   lock: bool | None = None) -> dict:
    """Run (or resume, or skip if complete) the experiment described by ``cfg``.

    ``lock``: hold the run directory's lock for the run (default: unless ``on_claim`` is given,
    i.e. the CLI, which takes the lock itself so that its failure record is written under it)."""
    if run_dir is None:
        from hydra.core.hydra_config import HydraConfig

        run_dir = HydraConfig.get().runtime.output_dir
    run_dir = Path(run_dir)
    if lock is None:
        lock = on_claim is None
    held = RunLock(run_dir) if lock and _is_rank_zero_env() else None
    if held is not None:
        held.acquire()
    try:
        return _run_locked(cfg, run_dir, on_claim)
    finally:
        if held is not None:
            # A run that wrote nothing (refused, already completed) leaves even the lock record as it was.
            held.release(restore=not claimed_run_dir(run_dir))


def claimed_run_dir(run_dir: str | os.PathLike) -> bool:
    """Whether this process has written the results.json of ``run_dir`` (claimed the directory)."""
    return str(Path(run_dir).resolve()) in STARTED_RUN_DIRS


def _run_locked(cfg: DictConfig, run_dir: Path, on_claim) -> dict:
    if cfg.objective.get("probe"):
        # Probes (objective=flownib) read a trained model instead of training one.
        from cmiexp.probes.run_probe import run_probe

        prior = read_results(run_dir)
        if on_claim is not None and not (prior and prior.get("status") == "completed"):
            on_claim()
        return run_probe(cfg, run_dir)
    from cmiexp.train.init_from import prepare_start

    # objective.start=ce (objective=mcmi): train or reuse the CE model this run fine-tunes.
    cfg = prepare_start(cfg, Path(run_dir))
    return Run(cfg, run_dir, on_claim).execute()
