"""End-to-end runs of the real `cmiexp` command on ../shared GLUE data with tiny models."""

from __future__ import annotations

import json
import math

import pytest

from cmiexp.io import read_jsonl
from tests.conftest import GLUE_DIR, find_run_dirs, run_cli

RTE_SMALL = [
    "task=glue/rte", f"task.data_dir={GLUE_DIR}", "task.max_train_samples=256", "task.max_eval_samples=64",
    "task.max_length=64", "trainer.progress_bar=false",
]

RESULT_FIELDS = {
    "schema", "status", "experiment", "task", "task_type", "model", "objective", "seed", "primary_metric", "best",
    "final", "wall_time_s", "train_samples_per_s", "peak_memory_mb", "global_step", "trainable_params",
    "total_params", "overrides", "run_dir",
}


@pytest.mark.slow
def test_rte_end_to_end_writes_every_output(cmiexp_env, output_dir):
    proc = run_cli([*RTE_SMALL, "trainer.epochs=1", "seed=7"], cmiexp_env)
    (run_dir,) = find_run_dirs(output_dir)
    assert run_dir.relative_to(output_dir).parts[:6] == ("runs", "default", "glue", "rte", "tiny-bert", "ce")
    for rel in [".hydra/config.yaml", ".hydra/overrides.yaml", "config.yaml", "metrics.jsonl", "results.json",
                "cmiexp.log", "checkpoint/best/config.json", "checkpoint/best/model.safetensors",
                "checkpoint/best/tokenizer.json", "checkpoint/latest/model.safetensors",
                "checkpoint/latest/trainer_state.json", "run_config.json", "checkpoint/latest/run_config.json"]:
        assert (run_dir / rel).is_file(), f"missing {rel}"
    # trainer.checkpoint_retention=weights (the default): the optimizer state goes once the run completes.
    assert not (run_dir / "checkpoint/latest/optimizer.bin").exists()
    assert not (run_dir / "checkpoint/latest/scheduler.bin").exists()
    assert "seed: 7" in (run_dir / "config.yaml").read_text()
    assert "${" not in (run_dir / "config.yaml").read_text(), "config.yaml must be resolved"
    res = json.loads((run_dir / "results.json").read_text())
    assert RESULT_FIELDS <= set(res), RESULT_FIELDS - set(res)
    assert res["status"] == "completed" and res["task"] == "glue/rte" and res["seed"] == 7
    assert res["model"] == "tiny-bert" and res["objective"] == "ce" and res["primary_metric"] == "accuracy"
    assert res["global_step"] == 8  # 256 samples / batch 32, one epoch
    best = res["best"]["metrics"]
    assert 0.0 <= best["accuracy"] <= 1.0 and best["num_samples"] == 64
    for k in ("cmi", "gamma", "ncmi"):  # CMI diagnostics on every classification run
        assert math.isfinite(best[k])
    assert res["wall_time_s"] > 0 and res["train_samples_per_s"] > 0 and res["peak_memory_mb"] > 0
    records = read_jsonl(run_dir / "metrics.jsonl")
    assert len(records) == 1 and records[0]["step"] == 8 and "dev/accuracy" in records[0]
    # the end-of-run table
    assert "accuracy" in proc.stdout and "best" in proc.stdout and str(run_dir) in proc.stdout


@pytest.mark.slow
def test_sst2_tiny_bert_learns(cmiexp_env, output_dir):
    """Real learning: tiny-bert (random init) on SST-2 beats the 0.51 majority class clearly."""
    run_cli(["task=glue/sst2", f"task.data_dir={GLUE_DIR}", "task.max_train_samples=4000", "task.max_length=64",
             "trainer.epochs=2", "trainer.progress_bar=false"], cmiexp_env)
    (run_dir,) = find_run_dirs(output_dir)
    res = json.loads((run_dir / "results.json").read_text())
    assert res["best"]["metrics"]["num_samples"] == 872
    assert res["best"]["metrics"]["accuracy"] >= 0.70, res["best"]["metrics"]


@pytest.mark.slow
def test_resume_continues_from_checkpoint(cmiexp_env, output_dir, tmp_path):
    args = [*RTE_SMALL, "trainer.epochs=2", "trainer.save_every=4"]
    # First attempt stops after step 4 (as if preempted), leaving checkpoint/latest behind.
    run_cli([*args, "trainer.stop_after_steps=4"], cmiexp_env)
    (run_dir,) = find_run_dirs(output_dir)
    state = json.loads((run_dir / "checkpoint/latest/trainer_state.json").read_text())
    assert state["global_step"] == 4 and state["batches_in_epoch"] == 4
    assert json.loads((run_dir / "results.json").read_text())["status"] == "interrupted"

    # The same command again continues in the same directory.
    proc = run_cli(args, cmiexp_env)
    assert find_run_dirs(output_dir) == [run_dir]
    assert "resuming" in proc.stdout and "at step 4" in proc.stdout
    res = json.loads((run_dir / "results.json").read_text())
    assert res["status"] == "completed" and res["global_step"] == 16
    steps = [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl")]
    assert steps == [8, 16], steps  # one eval per epoch, none repeated

    # An uninterrupted run with the same seed ends with the same metrics: no data repeated or skipped.
    env2 = dict(cmiexp_env, CMIEXP_OUTPUT_DIR=str(tmp_path / "fresh"))
    run_cli(args, env2)
    (fresh_dir,) = find_run_dirs(tmp_path / "fresh")
    fresh = json.loads((fresh_dir / "results.json").read_text())
    for k in ("accuracy", "loss", "cmi"):
        assert fresh["final"]["metrics"][k] == pytest.approx(res["final"]["metrics"][k], abs=1e-5), k

    # A third invocation sees a completed run and does not train again.
    proc = run_cli(args, cmiexp_env)
    assert "already completed" in proc.stdout
    assert [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl")] == [8, 16]


def test_unknown_task_lists_choices(cmiexp_env):
    proc = run_cli(["task=glue/nope"], cmiexp_env, check=False)
    assert proc.returncode != 0
    err = proc.stderr + proc.stdout
    assert "glue/nope" in err and "glue/rte" in err and "glue/sst2" in err and "synthetic" in err
    assert "Traceback" not in err
    proc = run_cli(["-m", "model=tiny-bert,tiny-brt"], cmiexp_env, check=False)
    assert proc.returncode == 1 and "tiny-brt" in proc.stderr and "tiny-roberta" in proc.stderr


def test_missing_data_dir_is_one_line_error(cmiexp_env, tmp_path, output_dir):
    missing = tmp_path / "no_such_glue"
    proc = run_cli(["task=glue/rte", f"task.data_dir={missing}"], cmiexp_env, check=False)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("cmiexp: error:")]
    assert len(lines) == 1 and str(missing) in lines[0] and "RTE" in lines[0], proc.stderr
    # The failure is recorded in the run directory for reports.
    (run_dir,) = find_run_dirs(output_dir)
    res = json.loads((run_dir / "results.json").read_text())
    assert res["status"] == "failed" and str(missing) in res["error"]


def test_bad_option_value_is_one_line_error(cmiexp_env):
    proc = run_cli(["trainer.scheduler=triangle"], cmiexp_env, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "trainer.scheduler" in proc.stderr and "linear" in proc.stderr


SYNTH_TINY = ["task.num_train=96", "task.num_eval=48", "trainer.epochs=1", "trainer.progress_bar=false"]


def test_hub_model_offline_points_to_tiny_models(cmiexp_env):
    proc = run_cli(["model=bert-base-uncased", *SYNTH_TINY], cmiexp_env, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    (line,) = [ln for ln in proc.stderr.splitlines() if ln.startswith("cmiexp: error:")]
    assert "bert-base-uncased" in line and "tiny-bert" in line and "model.name_or_path" in line


def test_wandb_offline_logger_writes_run(cmiexp_env, output_dir):
    env = dict(cmiexp_env)
    env.pop("WANDB_API_KEY", None)
    run_cli(["logger=wandb", "logger.mode=auto", *SYNTH_TINY], env)
    (run_dir,) = find_run_dirs(output_dir)
    offline = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 1, list((run_dir / "wandb").iterdir())
    assert json.loads((run_dir / "results.json").read_text())["status"] == "completed"
    # The W&B logger does not change the run directory (logger keys are not part of its identity).
    from tests.conftest import compose_config
    from cmiexp.runs import config_hash

    assert run_dir.name == "seed0-" + config_hash(compose_config([f for f in SYNTH_TINY]))


@pytest.mark.parametrize("model", ["tiny-distilbert", "tiny-roberta", "tiny-gpt2"])
def test_tiny_architectures_train(cmiexp_env, output_dir, model):
    run_cli([f"model={model}", *SYNTH_TINY], cmiexp_env)
    (run_dir,) = find_run_dirs(output_dir)
    res = json.loads((run_dir / "results.json").read_text())
    assert res["status"] == "completed" and res["model"] == model
    assert math.isfinite(res["final"]["metrics"]["loss"])


@pytest.mark.parametrize("value,steps", [("epoch", None), (None, None), (5, 5), ("5", 5)])
def test_parse_every_accepts_epoch_and_whole_step_counts(value, steps):
    from cmiexp.train.optim import parse_every

    assert parse_every(value, "trainer.save_every") == steps


@pytest.mark.parametrize("value", [0, -3, 2.5, "2.5", "often", True, "end"])
def test_parse_every_refuses_anything_else_naming_the_key(value):
    from cmiexp.errors import ConfigError
    from cmiexp.train.optim import parse_every

    # "end" is a word only trainer.eval_every takes (the runner maps it to the last step itself).
    with pytest.raises(ConfigError, match=r"trainer\.save_every=.* must be 'epoch' or a positive number of steps"):
        parse_every(value, "trainer.save_every")
