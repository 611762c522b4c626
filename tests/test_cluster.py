"""Cluster launchers and sweepers: the Slurm (submitit) and Optuna configs compose and work."""

from __future__ import annotations

import json

import pytest
import yaml

from cmiexp.cli import export_slurm_distributed_env, objective_value
from tests.conftest import GLUE_DIR, compose_config, find_run_dirs, run_cli


@pytest.mark.parametrize("launcher", ["slurm", "local_submitit"])
def test_submitit_launcher_configs_compose(launcher):
    cfg = compose_config([f"hydra/launcher={launcher}", "task=glue/rte"], return_hydra_config=True)
    target = cfg.hydra.launcher._target_
    assert target.startswith("hydra_plugins.hydra_submitit_launcher")
    assert cfg.hydra.launcher.timeout_min > 0
    if launcher == "slurm":
        assert "SlurmLauncher" in target and cfg.hydra.launcher.max_num_timeout >= 1


def test_optuna_experiment_composes():
    cfg = compose_config(["experiment=hpo_rte"], return_hydra_config=True)
    assert "OptunaSweeper" in cfg.hydra.sweeper._target_
    assert cfg.hydra.sweeper.direction == "maximize"
    assert "trainer.lr" in cfg.hydra.sweeper.params
    assert cfg.experiment_name == "hpo_rte" and cfg.task.name == "glue/rte"


@pytest.mark.slow
def test_optuna_sweep_optimises_primary_dev_metric(cmiexp_env, output_dir):
    proc = run_cli(["-m", "experiment=hpo_rte", "model=tiny-bert", f"task.data_dir={GLUE_DIR}",
                    "task.max_train_samples=64", "task.max_eval_samples=32", "task.max_length=64",
                    "trainer.epochs=1", "trainer.progress_bar=false", "hydra.sweeper.n_trials=2"], cmiexp_env)
    runs = find_run_dirs(output_dir)
    assert len(runs) == 2  # one run directory per trial (their overrides differ)
    values = [json.loads((d / "results.json").read_text())["best"]["metrics"]["accuracy"] for d in runs]
    (opt_file,) = list(output_dir.rglob("optimization_results.yaml"))
    best = yaml.safe_load(opt_file.read_text())
    assert best["best_value"] == pytest.approx(max(values))
    assert "trainer.lr" in best["best_params"]
    assert "Best value" in proc.stdout + proc.stderr


def test_slurm_task_layout_becomes_torch_distributed_env():
    env = {"SLURM_NTASKS": "4", "SLURM_PROCID": "2", "SLURM_LOCALID": "2", "SLURM_JOB_ID": "12345",
           "SLURM_JOB_NODELIST": "gpu-node-7", "SUBMITIT_FOLDER": "/x"}
    assert export_slurm_distributed_env(env) is True
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"]) == ("2", "4", "2")
    assert env["MASTER_ADDR"] == "gpu-node-7" and env["MASTER_PORT"] == str(20000 + 12345 % 20000)
    # A single-task job, or a job already under torchrun, is left alone.
    single = {"SLURM_NTASKS": "1", "SLURM_PROCID": "0", "SUBMITIT_FOLDER": "/x"}
    assert export_slurm_distributed_env(single) is False and "RANK" not in single
    launched = {"SLURM_NTASKS": "4", "SLURM_PROCID": "1", "RANK": "3", "SUBMITIT_FOLDER": "/x"}
    assert export_slurm_distributed_env(launched) is False and launched["RANK"] == "3"


def test_objective_value_is_best_primary_metric():
    assert objective_value({"primary_metric": "f1", "best": {"metrics": {"f1": 0.8, "accuracy": 0.7}}}) == 0.8
    import math

    assert math.isnan(objective_value({"status": "failed", "primary_metric": "f1"}))
    assert math.isnan(objective_value(None))
