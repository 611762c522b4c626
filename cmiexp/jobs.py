"""What one ``cmiexp`` job runs, chosen from its composed config: a training run
(``cmiexp.train.runner``) or a probe of a trained model (``objective=flownib``,
``cmiexp.probes.run_probe``). Both write their run directory through ``cmiexp.runs``."""

from __future__ import annotations

import os

from omegaconf import DictConfig

from cmiexp.runs import RunLock, holding


def is_probe(cfg: DictConfig) -> bool:
    """Probes (``objective.probe: true``) read a trained model instead of training one."""
    return bool(cfg.objective.get("probe"))


def run_job(cfg: DictConfig, run_dir: str | os.PathLike, lock: RunLock | None = None) -> dict:
    """Run the job of ``cfg`` in ``run_dir`` and return its results (the content of results.json).

    ``lock``: the run directory's lock when the caller holds it already (the ``cmiexp`` command,
    which records a failure under it); otherwise rank 0 takes it here for the job."""
    with holding(run_dir, lock) as held:
        if is_probe(cfg):
            from cmiexp.probes.inputs import check_probe_inputs

            check_probe_inputs(cfg)  # settings, source run and compare entries: before torch is imported
            from cmiexp.probes.run_probe import run_probe

            return run_probe(cfg, run_dir, held)
        from cmiexp.data import check_task_files
        from cmiexp.train.settings import check_config

        # The settings and file checks need no deep-learning library: a bad value or a wrong
        # task.data_dir is refused in about a second, before torch and transformers are imported
        # (the runner and the loader meet the same checks again, for direct callers).
        check_config(cfg)
        check_task_files(cfg.task)
        from cmiexp.train.runner import run_experiment

        return run_experiment(cfg, run_dir, held)

__all__ = ["is_probe", "run_job"]
