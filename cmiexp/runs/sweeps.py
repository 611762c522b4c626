"""A Hydra callback that keeps every sweep's own multirun.yaml.

Hydra writes ``<sweep dir>/multirun.yaml``, and cmiexp's sweep dir is the shared ``runs/`` folder,
so each sweep would overwrite the previous one's. ``SweepRecord`` also saves it as
``runs/sweeps/<UTC time>-<pid>/multirun.yaml`` (time and pid: two sweeps never share a name).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from cmiexp.io import atomic_write_text

SWEEPS = "sweeps"


class SweepRecord(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        if os.environ.get("RANK", "0") != "0":
            return  # every rank runs the same sweep; rank 0 records it
        stamp = time.strftime("%Y-%m-%d_%H-%M-%S", time.gmtime())
        out = Path(str(config.hydra.sweep.dir)) / SWEEPS / f"{stamp}-{os.getpid()}"
        atomic_write_text(out / "multirun.yaml", OmegaConf.to_yaml(config))
