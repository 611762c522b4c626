"""What one ``cmiexp`` job runs, chosen from its composed config: a training run
(``cmiexp.train.runner``) or a probe of a trained model (``objective=flownib``,
``cmiexp.probes.run_probe``). Both write their run directory through ``cmiexp.runs``."""

from __future__ import annotations

import os

from omegaconf import DictConfig

from cmiexp.runs import RunLock, holding, read_results


def is_probe(cfg: DictConfig) -> bool:
    """Probes (``objective.probe: true``) read a trained model instead of training one."""
    return bool(cfg.objective.get("probe"))


def run_job(cfg: DictConfig, run_dir: str | os.PathLike, lock: RunLock | None = None) -> dict:
    """Run the job of ``cfg`` in ``run_dir`` and return its results (the content of results.json).

    ``lock``: the run directory's lock when the caller holds it already (the ``cmiexp`` command,
    which records a failure under it); otherwise rank 0 takes it here for the job."""
    with holding(run_dir, lock) as held:
        # A new run directory's inputs are checked before torch and transformers are imported, so
        # a bad value or a wrong path is refused in about a second. A directory that holds a run
        # already goes straight to the runner, whose order decides (a completed run is returned as
        # it is even if its data has moved since; another config is refused first).
        fresh = read_results(run_dir) is None
        if is_probe(cfg):
            if fresh:
                from cmiexp.probes.inputs import check_probe_inputs

                check_probe_inputs(cfg)
            from cmiexp.probes.run_probe import run_probe

            return run_probe(cfg, run_dir, held)
        from cmiexp.train.settings import check_config

        check_config(cfg)  # the runner checks it before anything else too
        if fresh:
            from cmiexp.data import check_task_files

            check_task_files(cfg.task)  # the loader meets the same checks
        from cmiexp.train.runner import run_experiment

        return run_experiment(cfg, run_dir, held)


__all__ = ["is_probe", "run_job"]
