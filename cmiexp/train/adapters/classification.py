"""Sequence classification and regression with a Hugging Face head (encoders and decoders).

The default adapter (see ``cmiexp.train.adapters``): tokenised GLUE-style splits, a classifier
built by ``cmiexp.models.heads`` (optionally started from ``trainer.init_from`` and wrapped by a
PEFT method), padded batches and the dev metrics of ``cmiexp.train.evaluate``.
"""

from __future__ import annotations

import torch

from cmiexp.errors import DataError
from cmiexp.train.evaluate import evaluate as evaluate_classifier


def loader_pin_memory(t, device) -> bool:
    """trainer.pin_memory: auto = on for CUDA (host-to-device copies overlap compute), off on CPU."""
    value = t.pin_memory
    if str(value) == "auto":
        return torch.device(device).type == "cuda"
    return bool(value)


def train_sampler(train_ds, cfg, num_processes: int):
    """The training sampler: length-grouped (trainer.group_by_length, default) or None for the plain
    seeded shuffle (Accelerate's seedable sampler). Grouping is over global batches (per-process batch
    x processes), so 1 and N processes train on the same batches."""
    t = cfg.trainer
    if not bool(t.group_by_length):
        return None
    from cmiexp.data.length_grouping import LengthGroupedSampler, sequence_lengths

    return LengthGroupedSampler(sequence_lengths(train_ds), int(t.batch_size) * int(num_processes), int(cfg.seed))


class ClassificationAdapter:
    """Sequence classification / regression with a Hugging Face head (encoders and decoders).

    An adapter owns what differs between task families: data, model kind, batches and
    evaluation. The loop, checkpoints and outputs are shared (see ``cmiexp.train.adapters``)."""

    task_type = "classification"

    def setup(self, run):
        from cmiexp.data import load_task
        from cmiexp.data.tokenize import tokenize_split
        from cmiexp.models.factory import default_cache_dir, load_tokenizer, resolve_model_path
        from cmiexp.data.targets import normalize_task_targets
        from cmiexp.models.heads import apply_peft, build_classifier, input_suffix, load_classifier, model_input_keys
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
            max_len = int(cfg.task.max_length)
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
        run.input_keys = model_input_keys(model)

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
        return evaluate_classifier(model, eval_loaders, run.accelerator, run.task, run.input_keys)

    def finalize(self, run, model, results: dict) -> None:
        """Hook after training (e.g. test-set predictions); results may be extended in place."""
        if run.task.extra.get("target_scale"):
            results["target_scale"] = run.task.extra["target_scale"]


__all__ = ["ClassificationAdapter", "loader_pin_memory", "train_sampler"]
