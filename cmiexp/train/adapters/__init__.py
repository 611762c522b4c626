"""Adapters: what differs between task families (data, model kind, batches, evaluation).

The training loop (``cmiexp.train.runner``) is the same for every task; an adapter gives it the
task's datasets, model and loaders and evaluates the model. A task loader with an adapter of its
own (``task.loader=cot``: seq2seq chain-of-thought generation) is registered here; every other
loader is plain classification or regression (``classification.ClassificationAdapter``).

An adapter has ``task_type`` ("classification", "generation") and four methods, each given the
``Run`` (``cmiexp.train.runner.Run``, whose ``__init__`` declares the fields they fill):

* ``setup(run)``     sets ``run.task``, ``run.tokenizer``, ``run.model_path``, ``run.model``,
                     ``run.input_keys``, ``run.train_ds``, ``run.eval_ds``
* ``loaders(run)``   sets ``run.train_loader``, ``run.full_train_loader``, ``run.eval_loaders``
* ``evaluate(run, model, eval_loaders) -> {metric: value}`` (dev metrics, all processes agree)
* ``finalize(run, model, results)``  after training (e.g. test-set predictions)

The registry holds ``"module:Class"`` strings, so reading it (``has_own_adapter``, e.g. from the
probe) imports no training code.
"""

from __future__ import annotations

import importlib

DEFAULT = "default"
ADAPTERS: dict[str, str] = {DEFAULT: "cmiexp.train.adapters.classification:ClassificationAdapter",
                            "cot": "cmiexp.train.adapters.cot:CotAdapter"}


def register_adapter(loader: str, target: str) -> None:
    """Give task loader ``loader`` its own adapter, ``target`` = ``"module:Class"``."""
    ADAPTERS[str(loader)] = target


def has_own_adapter(loader) -> bool:
    """True for task loaders with an adapter of their own (e.g. chain-of-thought generation), i.e.
    tasks that are not plain classification or regression."""
    return str(loader) in ADAPTERS and str(loader) != DEFAULT


def make_adapter(cfg):
    """A fresh adapter for the task of ``cfg`` (``task.loader``)."""
    target = ADAPTERS.get(str(cfg.task.get("loader")), ADAPTERS[DEFAULT])
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)()


__all__ = ["ADAPTERS", "DEFAULT", "has_own_adapter", "make_adapter", "register_adapter"]
