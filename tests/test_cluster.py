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


SLURM_TASK = {"SUBMITIT_EXECUTOR": "slurm", "SLURM_NTASKS": "4", "SLURM_PROCID": "2", "SLURM_LOCALID": "2",
              "SLURM_JOB_ID": "12345", "SLURM_JOB_NUM_NODES": "2", "SLURM_NODEID": "1",
              "SLURM_JOB_NODELIST": "gpu-node-[7-8]", "SUBMITIT_FOLDER": "/x"}
TORCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def slurm_env(monkeypatch):
    for k in (*TORCH_VARS, *SLURM_TASK, "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(k, raising=False)

    def set_env(**values):
        for k, v in values.items():
            monkeypatch.setenv(k, v)
    yield set_env
    import os

    for k in TORCH_VARS:  # what export_slurm_distributed_env wrote, outside monkeypatch's record
        os.environ.pop(k, None)


def test_slurm_task_layout_becomes_torch_distributed_env(slurm_env):
    import os

    slurm_env(**SLURM_TASK)
    assert export_slurm_distributed_env() is True
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == ("2", "4", "2")
    assert os.environ["LOCAL_WORLD_SIZE"] == "2"  # 4 tasks on 2 nodes
    assert os.environ["MASTER_ADDR"] == "gpu-node-7"  # the first host of the job's node list
    port = int(os.environ["MASTER_PORT"])
    for k in TORCH_VARS:
        del os.environ[k]
    slurm_env(SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_NODEID="0")  # another task of the same job
    assert export_slurm_distributed_env() is True and int(os.environ["MASTER_PORT"]) == port  # agrees unasked
    assert 20000 <= port <= 60000


def test_single_task_or_torchrun_job_is_left_alone(slurm_env):
    import os

    slurm_env(**dict(SLURM_TASK, SLURM_NTASKS="1", SLURM_JOB_NUM_NODES="1"))
    assert export_slurm_distributed_env() is False and "RANK" not in os.environ
    slurm_env(SLURM_NTASKS="4", RANK="3")  # already launched by torchrun inside the job
    assert export_slurm_distributed_env() is False and os.environ["RANK"] == "3"
    del os.environ["SUBMITIT_EXECUTOR"], os.environ["RANK"]
    assert export_slurm_distributed_env() is False  # not a submitit job at all


def test_objective_value_is_the_optimized_metric_of_the_best_checkpoint(caplog):
    import math

    done = {"status": "completed", "primary_metric": "f1", "best": {"metrics": {"f1": 0.8, "accuracy": 0.7}}}
    assert objective_value(done) == objective_value(done, "primary") == 0.8
    assert objective_value(done, "accuracy") == 0.7
    assert math.isnan(objective_value({"status": "failed", "primary_metric": "f1"}))
    assert math.isnan(objective_value(None))
    # a metric the run does not have: NaN (a failed trial) and one line naming the key and what exists
    assert math.isnan(objective_value(done, "mcc"))
    assert "optimized_metric=mcc: the run has no such dev metric (it has: accuracy, f1)" in caplog.text
    caplog.clear()
    probe = {"status": "completed", "objective": "flownib"}  # no dev metrics: NaN, and no error line
    assert math.isnan(objective_value(probe)) and caplog.text == ""


def test_optimized_metric_is_not_part_of_the_run_identity():
    from cmiexp.runs.identity import config_hash

    a = compose_config(["task=glue/rte"])
    b = compose_config(["task=glue/rte", "optimized_metric=accuracy"])
    assert a.optimized_metric == "primary" and config_hash(a) == config_hash(b)
