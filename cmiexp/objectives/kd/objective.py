"""``objective=kd``: knowledge distillation from a frozen teacher (Hinton et al. 2015).

    loss = (1 - alpha) * CE(y, s) + alpha * T^2 * KL(softmax(t / T) || softmax(s / T))

with s, t the student's and the teacher's logits (the T^2 factor keeps the gradient scale of the
soft term independent of T). Regression tasks use (1 - alpha) * MSE(y, s) + alpha * MSE(t, s).
Defaults T = 4, alpha = 0.9 follow the MCMI reference (Ye et al., ICLR 2024).

The math is ``kd_loss`` (pure). Finding and training the teacher is ``teacher``, its logit cache
``logit_cache`` (both in this package).
By default (``teacher_cache=true``) the teacher's logits for the training set are computed once
and looked up by example ``idx``; ``teacher_cache=false`` runs the teacher on every student step.
Either way the teacher is in eval mode and consumes no random numbers, so both modes train the
same student for the same seed.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from cmiexp.checks import check_flag
from cmiexp.errors import ConfigError
from cmiexp.objectives.base import Objective, TrainContext, objective_number, register_objective
from cmiexp.objectives.ce import supervised_loss


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, *, alpha: float,
            temperature: float, is_regression: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The KD loss and its two parts (``supervised``, ``distill``; the latter includes T^2).

    Computed in fp32; the KL comes from log_softmax of both sides (no log of a rounded softmax)."""
    s = student_logits.float()
    t = teacher_logits.detach().float()
    sup = supervised_loss(s, labels, is_regression)
    if is_regression:
        distill = F.mse_loss(s.squeeze(-1), t.squeeze(-1))
    else:
        log_ps = F.log_softmax(s / temperature, dim=-1)
        log_pt = F.log_softmax(t / temperature, dim=-1)
        kl = (log_pt.exp() * (log_pt - log_ps)).sum(dim=-1).mean()  # KL(p_t || p_s), batch mean
        distill = (temperature ** 2) * kl
    loss = (1.0 - alpha) * sup + alpha * distill
    return loss, {"supervised": sup.detach(), "distill": distill.detach()}


def check_kd_settings(cfg) -> tuple[float, float]:
    """(alpha, temperature) of a KD student's ``objective`` node, after checking every setting the
    objective reads before its teacher is loaded; ConfigError naming the key otherwise."""
    alpha = objective_number(cfg, "alpha", "kd", 0.0, 1.0)
    temp = objective_number(cfg, "temperature", "kd")
    if temp == 0:
        raise ConfigError("objective.temperature=0 must be a positive number (objective=kd)")
    has_path, has_cfg = cfg.get("teacher") not in (None, ""), cfg.get("teacher_config") is not None
    if has_path and has_cfg:
        raise ConfigError("set only one of objective.teacher (a path) and objective.teacher_config (overrides)")
    if not (has_path or has_cfg):
        raise ConfigError("objective=kd needs a teacher: objective.teacher=PATH (a finished run directory or "
                          "checkpoint folder) or objective.teacher_config='{model: ..., objective: ...}'")
    check_flag("objective.teacher_cache", cfg.get("teacher_cache"))
    return alpha, temp


@register_objective("kd")
class KnowledgeDistillation(Objective):
    def __init__(self, cfg, ctx: TrainContext):
        super().__init__(cfg, ctx)
        from omegaconf import OmegaConf

        from cmiexp.objectives.kd import teacher as teachers

        self.alpha, self.temperature = check_kd_settings(cfg)
        self.use_cache = bool(cfg.teacher_cache)  # checked to be a boolean
        # Everything about the teacher is settled (and any error raised) before training starts.
        if cfg.get("teacher_config") is not None:
            key = "objective.teacher_config"
            # Every rank asks: one process trains a missing teacher (in a child process), the
            # others wait on its lock and then reuse it.
            self.teacher = teachers.ensure_teacher(ctx.cfg, OmegaConf.to_container(cfg.teacher_config, resolve=True))
        else:
            key = "objective.teacher"
            self.teacher = teachers.load_teacher_info(str(cfg.teacher), key=key)
        teachers.check_compatible(self.teacher, ctx.task, key=key)
        self.teacher_tokenizer = teachers.load_teacher_tokenizer(self.teacher)
        self.teacher_suffix = teachers.teacher_input_suffix(self.teacher, self.teacher_tokenizer)
        self.same_tokenizer = self._same_tokenizer(ctx)
        self._teacher_fn = None
        self.stats = {"cache_built": False, "cache_build_s": 0.0, "cache_file": None, "epochs": []}
        self._epoch_t0 = None
        self._teacher_s = 0.0

    # ---------------------------------------------------------------- teacher plumbing
    def _same_tokenizer(self, ctx) -> bool | None:
        """Whether the student's tokenizer has the teacher's vocabulary (reported only: the teacher
        always tokenises the raw text itself)."""
        try:
            from cmiexp.models.factory import default_cache_dir, load_tokenizer, resolve_model_path

            path = resolve_model_path(ctx.cfg.model, ctx.task, default_cache_dir(ctx.cfg.paths))
            return load_tokenizer(path, ctx.cfg.model).get_vocab() == self.teacher_tokenizer.get_vocab()
        except Exception:  # noqa: BLE001 - informational only
            return None

    def _teacher_inputs(self, ctx, model):
        from cmiexp.objectives.kd import logit_cache
        from cmiexp.data.tokenize import tokenize_split
        from cmiexp.models.factory import default_cache_dir
        from cmiexp.models.heads import model_input_keys

        extra = {"suffix": self.teacher_suffix} if self.teacher_suffix is not None else {}
        tok = tokenize_split(ctx.task.train, ctx.task, self.teacher_tokenizer, self._max_length(ctx),
                             default_cache_dir(ctx.cfg.paths), "train-teacher", **extra)
        return logit_cache.TeacherInputs(tok, self.teacher_tokenizer, model_input_keys(model))

    @staticmethod
    def _max_length(ctx) -> int:
        return int(ctx.cfg.task.max_length)

    def setup(self, ctx: TrainContext) -> None:
        from cmiexp.objectives.kd import logit_cache
        from cmiexp.objectives.kd import teacher as teachers

        acc = ctx.accelerator
        device = acc.device
        if self.use_cache:
            key = logit_cache.cache_key(ctx.task, self.teacher_tokenizer, self._max_length(ctx), self.teacher,
                                        self.teacher_suffix)
            path = logit_cache.cache_path(self.teacher, ctx.task, key, str(ctx.cfg.paths.teachers_dir))
            # Rank 0 builds the cache (from the full training set, in a fixed order) under the file's
            # lock, so a concurrent student waits for it instead of building it too; every rank
            # then reads the same file: the cache is identical for 1 and N processes.
            with acc.main_process_first():
                if acc.is_main_process and not path.exists():
                    with logit_cache.build_lock(path):
                        if not path.exists():
                            self._build_cache(ctx, path)
                idx, logits = logit_cache.load_logit_cache(path)
            if logits.shape[-1] != ctx.task.num_labels:
                raise ConfigError(f"KD teacher cache {path} has {logits.shape[-1]} outputs per example, task="
                                  f"{ctx.task.name} has {ctx.task.num_labels}; delete the file to rebuild it")
            cache = logit_cache.LogitCache(idx, logits).to(device)
            self.stats.update(cache_file=str(path), cache_examples=int(len(idx)))
            self._teacher_fn = self._unchecked_lookup(cache, ctx)
        else:
            model = teachers.load_teacher_model(self.teacher, device)
            with acc.main_process_first():  # rank 0 writes the tokenisation cache, the others read it
                inputs = self._teacher_inputs(ctx, model)

            @torch.no_grad()
            def online(idx: torch.Tensor) -> torch.Tensor:
                b = inputs.batch(inputs.positions_of(idx).tolist())
                with acc.autocast():
                    return model(**{k: v.to(device) for k, v in b.items()}).logits.float()

            self._teacher_fn = online

    def _build_cache(self, ctx, path) -> None:
        from cmiexp.objectives.kd import logit_cache
        from cmiexp.objectives.kd import teacher as teachers

        acc, t0 = ctx.accelerator, time.time()
        with torch.random.fork_rng(devices=[]):
            model = teachers.load_teacher_model(self.teacher, acc.device)
            inputs = self._teacher_inputs(ctx, model)
            logits = logit_cache.compute_teacher_logits(model, inputs, int(ctx.cfg.trainer.eval_batch_size),
                                                        acc.device, acc.autocast)
        logit_cache.save_logit_cache(path, inputs.idx, logits, {
            "task": ctx.task.name, "teacher": str(self.teacher.checkpoint_dir),
            "max_length": self._max_length(ctx), "num_examples": len(inputs)})
        del model
        self.stats.update(cache_built=True, cache_build_s=time.time() - t0)

    @staticmethod
    def _unchecked_lookup(cache, ctx):
        """Per-step lookup of cached logits without a host synchronisation: every training idx is
        checked against the cache once here (the check raises naming the missing idx), so the step
        only gathers rows on the device. Falls back to the checked lookup when the training idx
        cannot be read."""
        from cmiexp.objectives.kd.logit_cache import lookup_positions

        train = getattr(ctx.task, "train", None)
        if train is None or "idx" not in getattr(train, "column_names", ()):
            return cache
        lookup_positions(cache.position, torch.as_tensor(train["idx"]))
        position, logits = cache.position, cache.logits

        def lookup(idx: torch.Tensor) -> torch.Tensor:
            return logits[position[idx.long().to(position.device)]]

        return lookup

    # ---------------------------------------------------------------- loop hooks
    def on_epoch_start(self, ctx: TrainContext, epoch: int) -> None:
        self._close_epoch()
        self._epoch_t0 = (epoch, time.time())
        self._teacher_s = 0.0

    def _close_epoch(self) -> None:
        if self._epoch_t0 is not None:
            epoch, t0 = self._epoch_t0
            self.stats["epochs"].append({"epoch": epoch, "wall_s": time.time() - t0, "teacher_s": self._teacher_s})
            self._epoch_t0 = None

    def loss(self, batch, outputs, ctx):
        t0 = time.perf_counter()
        teacher_logits = self._teacher_fn(batch["idx"])
        if teacher_logits.is_cuda and not self.use_cache:
            torch.cuda.synchronize(teacher_logits.device)  # time the teacher forward, not its launch
        self._teacher_s += time.perf_counter() - t0
        loss, parts = kd_loss(outputs.logits, teacher_logits, batch["labels"], alpha=self.alpha,
                              temperature=self.temperature, is_regression=ctx.is_regression)
        # Detached tensors: the loop reads them at log time (float() here would synchronise every step).
        return loss, {"kd_supervised": parts["supervised"], "kd_distill": parts["distill"]}

    # ---------------------------------------------------------------- reporting
    def result_fields(self) -> dict:
        """results.json fields known only once the teacher is resolved: its objective and model, and
        ``teacher`` = {"objective", "hash", "run_dir"} (the same objective and hash the run
        directory's ``-from-<objective>-<hash>`` suffix shows)."""
        from cmiexp.objectives.kd.teacher import teacher_record

        return {"teacher_objective": self.teacher.objective, "teacher_model": self.teacher.model,
                "teacher": teacher_record(self.teacher)}

    def summary(self) -> dict:
        """Teacher provenance and cost, for results.json ``objective_summary``.

        ``relative_cost_vs_ce_estimate`` = (student loop time + cache build) / (loop time - time spent
        getting teacher logits): the cost of this run relative to the same loop without a teacher.
        It is an estimate from one run; benchmarks/bench_kd_cache.py measures ce/cached/online directly."""
        self._close_epoch()
        epochs = self.stats["epochs"]
        loop_s = sum(e["wall_s"] for e in epochs)
        teacher_s = sum(e["teacher_s"] for e in epochs)
        n = max(len(epochs), 1)
        est = (loop_s + self.stats["cache_build_s"]) / (loop_s - teacher_s) if loop_s > teacher_s else None
        return {
            "teacher": self.teacher.describe(),
            "temperature": self.temperature,
            "alpha": self.alpha,
            "teacher_cache": self.use_cache,
            "same_tokenizer": self.same_tokenizer,
            "cache_built": self.stats["cache_built"],
            "cache_build_s": self.stats["cache_build_s"],
            "cache_file": self.stats["cache_file"],
            "teacher_s_per_epoch": teacher_s / n,
            "epoch_wall_s": [e["wall_s"] for e in epochs],
            "relative_cost_vs_ce_estimate": est,
        }
