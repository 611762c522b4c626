"""One training run: data -> model -> Accelerate loop -> checkpoints, metrics and results.

The loop knows nothing about objectives beyond the ``Objective`` interface (the math lives in
``cmiexp/objectives``) and nothing about task families beyond the adapter interface
(``cmiexp/train/adapters``). Every file a run writes lives in its run directory, through the
run-directory contract (``cmiexp/runs``). Probes do not come here: ``cmiexp.jobs`` dispatches.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from cmiexp.errors import ConfigError, TrainingDiverged
from cmiexp.io import append_jsonl, atomic_write_text
from cmiexp.metrics import is_improvement
from cmiexp.runs import (SCHEMA, RunLock, check_resume_compatible, collapse_text, holding, is_rank_zero,
                         read_results, run_config_record, write_results, write_run_config)
from cmiexp.runs.logs import EVAL_LOG, TRAIN_LOG
from cmiexp.train.adapters import make_adapter
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
from cmiexp.train.optim import build_optimizer, build_scheduler, parse_every, resolve_mixed_precision
from cmiexp.train.settings import check_config
from cmiexp.train.signals import Preempted, StopFlag
from cmiexp.train.step import FiniteLossWatch, drop_padded_rows, logged_scalars

log = logging.getLogger("cmiexp")


class Run:
    """State and steps of one training run; ``execute()`` runs the steps in order and returns the
    results dict (the content of ``results.json``)."""

    def __init__(self, cfg: DictConfig, run_dir: str | os.PathLike, lock: RunLock | None = None):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.lock = lock  # held by rank 0; claim() marks the directory as this run's
        self.stop = StopFlag()
        self.resume = str(cfg.trainer.resume).lower()
        self.record: dict = run_config_record(cfg)  # the hashed training config: this run's identity
        # Filled by the adapter (cmiexp/train/adapters): the task, its data and the model. After
        # prepare(), model and loaders are the Accelerate-prepared ones.
        self.accelerator = None
        self.adapter = None
        self.task = None
        self.tokenizer = None
        self.model_path: str | None = None
        self.model = None
        self.input_keys: set[str] = set()
        self.train_ds = None
        self.eval_ds: dict = {}
        self.train_loader = None
        self.full_train_loader = None
        self.eval_loaders: dict = {}
        # Filled by prepare() and restore().
        self.optimizer = None
        self.scheduler = None
        self.objective = None
        self.ctx = None
        self.total_steps = 0
        self.num_epochs = 0
        self.eval_every: int | None = None  # steps between dev evaluations; None = at each epoch end
        self.save_every: int | None = None  # steps between checkpoints; None = at each epoch end
        self.state = TrainerState()
        self.results: dict = {}
        # Filled by start_tracking() and fit().
        self.tracker = None
        self.last_metrics: dict = {}
        self.overhead = {"eval_s": 0.0, "checkpoint_s": 0.0}  # excluded from the training throughput
        self.clock_start = 0.0
        self.time_before = 0.0
        self.samples_at_start = 0
        self.train_elapsed = 0.0  # seconds of training steps alone in this invocation (for the throughput)
        # The running loss since the last log line and the first non-finite loss, on the device.
        self.running_loss = None
        self.running_n = 0
        self.watch = None

    # ------------------------------------------------------------------ the steps
    def execute(self) -> dict:
        quiet_libraries()
        check_config(self.cfg)
        finished = self.check_directory()
        if finished is not None:
            return finished
        self.build()
        self.prepare()
        self.restore()
        self.claim()
        self.objective.setup(self.ctx)
        self.start_tracking()
        interrupted = self.fit()
        return self.stop_early() if interrupted else self.finish()

    def check_directory(self) -> dict | None:
        """Refuse a directory trained with another config, before anything is written (not even a
        completed run's results are reused then); return a completed run's results as they are."""
        if self.resume != "false" and is_rank_zero():
            check_resume_compatible(self.run_dir, self.record,
                                    latest_dir(self.run_dir) if has_checkpoint(self.run_dir) else None)
        prior = read_results(self.run_dir)
        if prior and prior.get("status") == "completed" and self.resume == "auto":
            log.info("run already completed: %s (trainer.resume=false in a new run directory retrains)", self.run_dir)
            return prior
        if self.resume == "false" and (has_checkpoint(self.run_dir) or prior):
            raise ConfigError(f"run directory {self.run_dir} already holds a run and trainer.resume=false; "
                              "remove it or use trainer.resume=auto to continue it")
        if is_rank_zero() and self.resume != "false":
            # A crash in the middle of a checkpoint swap: put the newest complete checkpoint back.
            recovered = recover_latest(self.run_dir)
            if recovered:
                log.warning("%s", recovered)
        if self.resume == "true" and not has_checkpoint(self.run_dir):
            raise ConfigError(f"trainer.resume=true but {self.run_dir}/checkpoint/latest does not exist")
        return None

    def build(self) -> None:
        """The accelerator, then the adapter's task, data, model and loaders."""
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
        if self.accelerator.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        self.adapter = make_adapter(self.cfg)
        self.adapter.setup(self)
        self.adapter.loaders(self)

    def prepare(self) -> None:
        """Optimizer and schedule for the step budget, Accelerate's prepare, the objective."""
        from cmiexp.models.factory import count_parameters
        from cmiexp.objectives import TrainContext, build_objective

        cfg, t, acc = self.cfg, self.cfg.trainer, self.accelerator
        trainable, total = count_parameters(self.model)
        self.results = self.base_results()
        self.results.update(trainable_params=trainable, total_params=total, num_train_samples=len(self.train_ds),
                            num_eval_samples={a: len(d) for a, d in self.eval_ds.items()})
        optimizer = build_optimizer(self.model, cfg, acc.device)
        steps_per_epoch_global = math.ceil(len(self.train_ds) / (int(t.batch_size) * acc.num_processes))
        updates_per_epoch = math.ceil(steps_per_epoch_global / int(t.grad_accum))
        self.total_steps = int(t.max_steps) if int(t.max_steps) > 0 else updates_per_epoch * int(t.epochs)
        self.num_epochs = math.ceil(self.total_steps / updates_per_epoch)
        # "end": one dev evaluation, after the last step (the read every objective is compared at).
        self.eval_every = (self.total_steps if t.eval_every == "end"
                           else parse_every(t.eval_every, "trainer.eval_every", allowed="'epoch', 'end'"))
        self.save_every = parse_every(t.save_every, "trainer.save_every")
        scheduler = build_scheduler(optimizer, cfg, self.total_steps, acc.num_processes)
        self.model, self.optimizer, self.train_loader, self.full_train_loader, self.scheduler = acc.prepare(
            self.model, optimizer, self.train_loader, self.full_train_loader, scheduler)
        self.eval_loaders = {a: acc.prepare(loader) for a, loader in self.eval_loaders.items()}
        self.ctx = TrainContext(accelerator=acc, model=self.model, task=self.task, cfg=cfg, run_dir=self.run_dir,
                                full_train_loader=self.full_train_loader, num_train_examples=len(self.train_ds))
        self.ctx.extra["input_keys"] = self.input_keys
        self.objective = build_objective(cfg, self.ctx)
        # Facts an objective learns while it is built (e.g. the objective/model of a KD teacher given
        # as a path) replace the config's values in results.json.
        self.results.update(getattr(self.objective, "result_fields", dict)())
        self.results.update(distributed_fields(acc, self.model))  # distributed_type; under FSDP the wrapped units

    def restore(self) -> None:
        """The training state: from the run's checkpoint when it has one, else a fresh one."""
        num_labels = int(getattr(self.task, "num_labels", 0))
        self.state = TrainerState(task=self.task.name, model=self.cfg.model.name, num_labels=num_labels)
        if self.resume != "false" and has_checkpoint(self.run_dir):
            self.state = load_training_state(self.accelerator, self.run_dir, self.objective, self.task.name,
                                             num_labels, self.cfg.model.name)
            log.info("resuming %s at step %d (epoch %d, batch %d)", self.run_dir, self.state.global_step,
                     self.state.epoch, self.state.batches_in_epoch)
        self.ctx.global_step, self.ctx.epoch = self.state.global_step, self.state.epoch

    def claim(self) -> None:
        """Only now, with the checkpoint (if any) known to fit, does this run claim the directory:
        its config files, the lock's claim (the CLI writes .hydra/ then) and the first results.json."""
        if self.accelerator.is_main_process:
            atomic_write_text(self.run_dir / "config.yaml", OmegaConf.to_yaml(self.cfg, resolve=True))
            write_run_config(self.run_dir, self.record)
            if self.lock is not None:
                self.lock.claim()
        self.results["config_hash"] = self.record["hash"]
        self.write_results()

    def start_tracking(self) -> None:
        from cmiexp.train.tracking import make_tracker

        config_dict = OmegaConf.to_container(self.cfg, resolve=True)
        run_id = hashlib.sha1(str(self.run_dir.resolve()).encode()).hexdigest()[:12]  # stable across resumes
        self.tracker = make_tracker(self.cfg, config_dict, self.run_dir, run_id, self.accelerator.is_main_process)
        self.results.update(self.tracker.result_fields())  # e.g. the W&B offline folder, for the summary's sync hint

    def fit(self) -> bool:
        """Train until the step budget is spent; True if stopped early (signal, stop_after_steps)."""
        from cmiexp.train.progress import TrainProgress

        t, state, eval_every = self.cfg.trainer, self.state, self.eval_every
        self.stop.install()
        self.clock_start = time.time()
        self.time_before = state.train_time_s
        self.samples_at_start = state.samples_seen
        self.running_loss, self.running_n = torch.zeros((), device=self.accelerator.device), 0
        self.watch = FiniteLossWatch(self.accelerator.device)
        pbar = TrainProgress(self.total_steps, state.global_step,
                             enabled=self.accelerator.is_local_main_process and bool(t.progress_bar)).start()
        try:
            while state.epoch < self.num_epochs and state.global_step < self.total_steps:
                if self.train_epoch(pbar):
                    return True
                # End of epoch (or of max_steps): evaluate, then move the data position on.
                evaluated_now = bool(eval_every) and state.global_step % eval_every == 0
                if (eval_every is None or state.global_step >= self.total_steps) and not evaluated_now:
                    self.last_metrics = self.evaluate(epoch_end=True)
                state.epoch += 1
                state.batches_in_epoch = 0
                if state.global_step < self.total_steps:
                    self.checkpoint()
            return False
        finally:
            pbar.close()
            self.stop.restore()
            spent = time.time() - self.clock_start
            state.train_time_s = self.time_before + spent
            self.train_elapsed = spent - self.overhead["eval_s"] - self.overhead["checkpoint_s"]

    def train_epoch(self, pbar) -> bool:
        """The optimizer steps of one epoch (from the checkpointed batch on a resume); True if stopped early.

        The step keeps everything on the device (no float(loss) per step, no host synchronisation):
        the running loss and the first non-finite loss are device tensors read at log, eval,
        checkpoint and epoch-end time."""
        t, acc, state, ctx = self.cfg.trainer, self.accelerator, self.state, self.ctx
        model, objective = self.model, self.objective
        eval_every, save_every = self.eval_every, self.save_every
        stop_after = t.get("stop_after_steps")
        watch = self.watch
        ctx.epoch = state.epoch
        self.train_loader.set_epoch(state.epoch)
        objective.on_epoch_start(ctx, state.epoch)
        model.train()
        loader = self.train_loader
        if state.batches_in_epoch:
            from accelerate import skip_first_batches

            loader = skip_first_batches(self.train_loader, state.batches_in_epoch)
        for batch in loader:
            batch, weight, global_rows = drop_padded_rows(
                batch, state.batches_in_epoch, acc.process_index, acc.num_processes, int(t.batch_size),
                len(self.train_ds))
            ctx.extra["batch_weight"] = weight  # 0: this process holds only padding rows
            with acc.accumulate(model):
                loss, extra = objective.compute_loss(model, batch, ctx)
                watch.observe(loss, state.global_step, state.epoch)
                acc.backward(loss * weight if weight != 1.0 else loss)
                if acc.sync_gradients and t.max_grad_norm:
                    acc.clip_grad_norm_(model.parameters(), float(t.max_grad_norm))
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad()
            state.batches_in_epoch += 1
            state.samples_seen += global_rows
            self.running_loss += loss.detach().float()
            self.running_n += 1
            if not acc.sync_gradients:
                continue
            state.global_step += 1
            ctx.global_step = state.global_step
            objective.after_step(ctx)
            pbar.update(state.global_step, loss)  # the bar reads the loss only when it draws
            if state.global_step % int(t.log_every) == 0:
                watch.check()  # every rank: a diverged run stops before it logs, evaluates or saves
                self.log_train(float(self.running_loss) / max(self.running_n, 1), extra)
                self.running_loss.zero_()
                self.running_n = 0
            if eval_every and state.global_step % eval_every == 0:
                watch.check()
                self.last_metrics = self.evaluate(epoch_end=False)
                model.train()
            done = state.global_step >= self.total_steps
            if not done and save_every and state.global_step % save_every == 0:
                watch.check()
                self.checkpoint()
            if self.stop.signum is not None or (stop_after and state.global_step >= int(stop_after)):
                watch.check()
                return True
            if done:
                break
        watch.check()
        return False

    def stop_early(self) -> dict:
        """A signal or trainer.stop_after_steps: checkpoint, mark the run interrupted."""
        save_training_state(self.accelerator, self.run_dir, self.state, self.objective, run_config=self.record)
        self.results.update(status="interrupted", global_step=self.state.global_step)
        self.write_results()
        self.tracker.finish()
        if self.stop.signum is not None:
            raise Preempted(f"stopped by signal {self.stop.signum} at step {self.state.global_step}; "
                            f"checkpoint saved, re-run the same command to resume")
        log.info("stopped after %d steps (trainer.stop_after_steps); checkpoint saved", self.state.global_step)
        return self.results

    def finish(self) -> dict:
        """The final evaluation and state, results.json (completed), retention, curves, tracker summary."""
        acc, state, t = self.accelerator, self.state, self.cfg.trainer
        if not self.last_metrics:
            self.last_metrics = self.evaluate(epoch_end=True)
        self.adapter.finalize(self, self.model, self.results)
        # The final training state, then trimmed to trainer.checkpoint_retention once results are written.
        save_training_state(acc, self.run_dir, state, self.objective, run_config=self.record)
        new_samples = state.samples_seen - self.samples_at_start
        # Throughput of the training steps alone (evaluation and checkpoint writes excluded).
        elapsed = self.train_elapsed
        self.results.update(
            status="completed",
            best={"step": state.best_step, "epoch": state.best_epoch, "metrics": state.best_metrics},
            final={"step": state.global_step, "epoch": state.epoch, "metrics": self.last_metrics},
            global_step=state.global_step,
            epochs=self.num_epochs,
            wall_time_s=state.train_time_s,
            train_samples_per_s=new_samples / elapsed if elapsed > 0 else None,
            eval_time_s=self.overhead["eval_s"],
            checkpoint_time_s=self.overhead["checkpoint_s"],
            peak_memory_mb=peak_memory_mb(acc.device),
            num_processes=acc.num_processes,
            mixed_precision=acc.mixed_precision,
        )
        self.results.update(objective_summary=getattr(self.objective, "summary", lambda: {})())
        self.check_collapse()
        self.write_results()
        if acc.is_main_process:
            from cmiexp.report.curves import write_run_curves

            apply_retention(self.run_dir, str(t.checkpoint_retention))
            write_run_curves(self.run_dir, self.task.primary_metric)  # curves.png; a plotting failure only warns
            self.tracker.summary({f"best/{k}": v for k, v in state.best_metrics.items()}
                                 | {f"final/{k}": v for k, v in self.last_metrics.items()}
                                 | {"wall_time_s": self.results["wall_time_s"]})
        self.tracker.finish()
        return self.results

    # ------------------------------------------------------------------ helpers of the steps
    def evaluate(self, epoch_end: bool) -> dict:
        """Dev metrics now; keeps the best checkpoint and logs the record (eval time is not training time)."""
        from cmiexp.train.summary import format_metric

        t0 = time.time()
        try:
            t, acc, state = self.cfg.trainer, self.accelerator, self.state
            primary = self.task.primary_metric
            metrics = self.adapter.evaluate(self, self.model, self.eval_loaders)
            record = {"step": state.global_step, "epoch": state.epoch + (1 if epoch_end else 0),
                      "lr": self.scheduler.get_last_lr()[0], **{f"dev/{k}": v for k, v in metrics.items()}}
            if not math.isfinite(metrics.get(primary, float("nan"))):
                raise TrainingDiverged(f"primary metric {primary} is not finite at step {state.global_step}")
            if is_improvement(primary, metrics[primary], state.best_metric):
                state.best_metric, state.best_step = metrics[primary], state.global_step
                state.best_epoch, state.best_metrics = record["epoch"], dict(metrics)
                if t.save_best:
                    save_best(acc, self.model, self.tokenizer, self.run_dir,
                              {"step": state.global_step, "metric": primary, "value": metrics[primary]})
            if acc.is_main_process:
                append_jsonl(self.run_dir / EVAL_LOG, record)
                self.tracker.log(record, state.global_step)
                log.info("eval step %d: %s", state.global_step,
                         ", ".join(f"{k}={format_metric(v)}" for k, v in metrics.items() if isinstance(v, float)))
            return metrics
        finally:
            self.overhead["eval_s"] += time.time() - t0

    def checkpoint(self) -> None:
        t0 = time.time()
        self.state.train_time_s = self.time_before + time.time() - self.clock_start
        save_training_state(self.accelerator, self.run_dir, self.state, self.objective, run_config=self.record)
        self.overhead["checkpoint_s"] += time.time() - t0

    def log_train(self, mean_loss: float, extra: dict) -> None:
        if not self.accelerator.is_main_process:
            return
        rec = {"train/loss": mean_loss, "train/lr": self.scheduler.get_last_lr()[0],
               **{f"train/{k}": v for k, v in logged_scalars(extra).items()}}
        self.tracker.log(rec, self.state.global_step)
        append_jsonl(self.run_dir / TRAIN_LOG, {"step": self.state.global_step, **rec})

    def base_results(self) -> dict:
        from hydra.core.hydra_config import HydraConfig

        overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
        cfg = self.cfg
        return {
            "schema": SCHEMA,
            "status": "running",
            "error": None,
            "experiment": cfg.experiment_name,
            "task": cfg.task.name,
            "task_type": "regression" if getattr(self.task, "is_regression", False) else self.adapter.task_type,
            "model": cfg.model.name,
            "objective": cfg.objective.name,
            "teacher_objective": cfg.objective.get("teacher_objective"),
            "teacher_model": cfg.objective.get("teacher_model"),
            "seed": int(cfg.seed),
            "head": cfg.head.name,
            "peft": cfg.peft.name,
            "primary_metric": self.task.primary_metric,
            "overrides": overrides,
            "init_from": cfg.trainer.get("init_from"),
            "run_dir": str(self.run_dir.resolve()),
        }

    def check_collapse(self) -> None:
        """Flag a classifier whose dev predictions are (nearly) all one class, on the console and
        in results.json: its metric is the majority-class rate, not a learned result."""
        from cmiexp.train.evaluate import collapse_fields

        share = float(self.cfg.trainer.collapse_share)
        fields = collapse_fields(self.state.best_metrics, self.last_metrics, getattr(self.task, "label_names", None),
                                 share)
        self.results.update(fields)
        if fields.get("collapsed") and self.accelerator.is_main_process:
            log.warning("COLLAPSED: %s; the model has not learned task=%s: check trainer.lr (now %g), train longer or "
                        "on more data", collapse_text(fields), self.task.name, float(self.cfg.trainer.lr))

    def write_results(self) -> None:
        if self.accelerator.is_main_process:
            write_results(self.run_dir, self.results)


def run_experiment(cfg: DictConfig, run_dir: str | os.PathLike | None = None, lock: RunLock | None = None) -> dict:
    """Train (or resume, or return if complete) the run described by ``cfg`` in ``run_dir``.

    ``lock``: the run directory's lock when the caller holds it already (the ``cmiexp`` command);
    otherwise rank 0 takes it here for the run. A probe config (objective=flownib) is refused:
    ``cmiexp.jobs.run_job`` runs both."""
    if cfg.objective.get("probe"):
        raise ConfigError(f"objective={cfg.objective.name} is a probe, not a training objective; run it with "
                          "cmiexp (cmiexp.jobs.run_job)")
    if run_dir is None:
        from hydra.core.hydra_config import HydraConfig

        run_dir = HydraConfig.get().runtime.output_dir
    from cmiexp.train.init_from import prepare_start

    with holding(run_dir, lock) as held:
        # objective.start=ce (objective=mcmi): train or reuse the CE model this run fine-tunes.
        cfg = prepare_start(cfg, Path(run_dir))
        return Run(cfg, run_dir, held).execute()


__all__ = ["Preempted", "Run", "run_experiment"]
