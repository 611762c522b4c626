"""Hydra callbacks of a ``cmiexp -m`` sweep (conf/config.yaml, ``hydra.callbacks``).

``SweepRecord`` keeps every sweep's own multirun.yaml: Hydra writes ``<sweep dir>/multirun.yaml``,
and cmiexp's sweep dir is the shared ``runs/`` folder, so each sweep would overwrite the previous
one's. It also saves it as ``runs/sweeps/<UTC time>-<pid>/multirun.yaml`` (time and pid: two
sweeps never share a name).

``FailedJobs`` lists the jobs that failed at the end of the sweep and makes the command exit 1.
A failed job returns ``JobFailed`` instead of raising, so that Hydra goes on with the other jobs.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import sys

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from cmiexp.io import atomic_write_text
from cmiexp.runs.lock import is_rank_zero

SWEEPS = "sweeps"


class SweepRecord(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        if not is_rank_zero():
            return  # every rank runs the same sweep; rank 0 records it
        stamp = time.strftime("%Y-%m-%d_%H-%M-%S", time.gmtime())
        out = Path(str(config.hydra.sweep.dir)) / SWEEPS / f"{stamp}-{os.getpid()}"
        atomic_write_text(out / "multirun.yaml", OmegaConf.to_yaml(config))


class JobFailed(float):
    """What a failed sweep job returns: NaN (the value a sweeper that optimises the job's return
    value, e.g. Optuna, records as a failed trial) carrying the run directory and the one-line reason."""

    def __new__(cls, run_dir, message: str):
        value = super().__new__(cls, float("nan"))
        value.run_dir = str(run_dir)
        value.message = str(message)
        return value

    def __reduce__(self):  # launchers that run jobs in other processes (submitit) pickle the return value
        return (JobFailed, (self.run_dir, self.message))


class FailedJobs(Callback):
    """Collects the sweep's ``JobFailed`` returns; at the end of the sweep lists them on stderr and exits 1."""

    def __init__(self):
        self.failed: list[JobFailed] = []

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs) -> None:
        if job_return.status == JobStatus.COMPLETED and isinstance(job_return.return_value, JobFailed):
            self.failed.append(job_return.return_value)

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        if not self.failed:
            return
        print(f"cmiexp: {len(self.failed)} job(s) failed:", file=sys.stderr)
        for f in self.failed:
            print(f"  {f.run_dir}: {f.message}", file=sys.stderr)
        # SystemExit is not an Exception: Hydra's callback runner lets it through to the command.
        raise SystemExit(1)


__all__ = ["FailedJobs", "JobFailed", "SWEEPS", "SweepRecord"]
