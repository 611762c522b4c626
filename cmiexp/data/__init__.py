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


def load_task(task_cfg) -> TaskData:
    name = task_cfg.get("loader")
    if name not in LOADERS:
        raise ConfigError(f"unknown task.loader={name!r}; valid choices: {', '.join(sorted(LOADERS))}")
    module, fn = LOADERS[name].split(":")
    return getattr(importlib.import_module(module), fn)(task_cfg)


__all__ = ["TaskData", "load_task", "LOADERS"]
