"""Task loaders: one entry point, ``load_task(task_cfg)``, dispatching on ``task.loader``."""

from __future__ import annotations

import importlib

from cmiexp.data.base import TaskData
from cmiexp.errors import ConfigError

# loader name -> "module:function"; the function takes the task config and returns TaskData.
LOADERS = {
    "synthetic": "cmiexp.data.synthetic:load_synthetic",
    "glue": "cmiexp.data.glue:load_glue",
    "cot": "cmiexp.data.cot:load_cot",
    "hub": "cmiexp.data.hub_tasks:load_hub_task",
}


# loader name -> "module:function" that refuses missing local data without reading it or importing a
# library (the loader meets the same checks); cmiexp.jobs runs it before torch is imported.
FILE_CHECKS = {
    "glue": "cmiexp.data.glue:check_glue_files",
    "cot": "cmiexp.data.cot:check_cot_files",
    "hub": "cmiexp.data.hub_tasks:check_hub_task_files",
}


def check_task_files(task_cfg) -> None:
    """DataError naming the folder or file when the task's local data is missing (no-op for loaders
    without local files, or an unknown loader, which ``load_task`` names)."""
    target = FILE_CHECKS.get(task_cfg.get("loader"))
    if target:
        module, fn = target.split(":")
        getattr(importlib.import_module(module), fn)(task_cfg)


def load_task(task_cfg) -> TaskData:
    name = task_cfg.get("loader")
    if name not in LOADERS:
        raise ConfigError(f"unknown task.loader={name!r}; valid choices: {', '.join(sorted(LOADERS))}")
    module, fn = LOADERS[name].split(":")
    return getattr(importlib.import_module(module), fn)(task_cfg)


__all__ = ["FILE_CHECKS", "LOADERS", "TaskData", "check_task_files", "load_task"]
