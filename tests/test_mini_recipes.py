"""The mini reproductions' recipes (docs/reproductions.md): what the overlays set, and that "one dev evaluation,
after the last step" really evaluates once, so the compared runs are read at the same step."""

from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf

from tests.conftest import REPO, compose_config, run_cli

GLUE = str(REPO.parent / "shared" / "data" / "glue")


@pytest.mark.parametrize("model", ["tiny-bert", "tiny-gpt2"])
def test_flownib_mini_overlay(model):
    cfg = OmegaConf.to_container(compose_config(["experiment=flownib_mini", f"model={model}"]), resolve=True)
    assert cfg["experiment_name"] == "flownib_mini" and cfg["task"]["name"] == "glue/rte"
    assert cfg["model"]["name"] == model and cfg["model"]["family"] == ("encoder" if model == "tiny-bert" else "decoder")
    # Every weight trained, at the tiny model's own rate, and the same head kind for both models.
    assert cfg["peft"]["name"] == "none" and cfg["head"]["name"] == "pooling"
    assert cfg["trainer"]["lr"] == cfg["model"]["lr"] == 1.0e-3
    assert cfg["trainer"]["eval_every"] == "end"  # the only evaluation is the final one


def test_flownib_probe_mini_overlay():
    cfg = OmegaConf.to_container(compose_config(["experiment=flownib_probe_mini", "model=tiny-gpt2"]), resolve=True)
    o = cfg["objective"]
    assert o["name"] == "flownib" and o["probe"] is True and cfg["task"]["name"] == "glue/rte"
    assert cfg["head"]["name"] == "pooling"  # the head of the flownib_mini runs it probes (checked against the source)
    # The paper's schedule shape: alpha reaches 0 half way (T=2000, delta=0.001 -> step 1000), then I(Z;Y) alone.
    assert 1 / o["delta"] == pytest.approx(o["steps"] / 2)


@pytest.mark.slow
def test_eval_once_at_the_end(cmiexp_env, tmp_path):
    """A shrunk flownib_mini run (tiny-gpt2, 2 epochs) is evaluated exactly once, after its last step, so its
    best and final metrics are the same evaluation (the runs compared in a mini table are read at one step)."""
    out = tmp_path / "o"
    env = dict(cmiexp_env, CMIEXP_OUTPUT_DIR=str(out), OMP_NUM_THREADS="1")
    run_cli(["experiment=flownib_mini", "model=tiny-gpt2", "seed=1", f"task.data_dir={GLUE}",
             "task.max_train_samples=96", "task.max_eval_samples=48", "task.max_length=64", "trainer.epochs=2"], env)
    (res_path,) = (out / "runs" / "flownib_mini").rglob("results.json")
    res = json.loads(res_path.read_text())
    assert res["status"] == "completed" and res["global_step"] == 6  # ceil(96 / 32) x 2 epochs
    evals = [json.loads(line) for line in (res_path.parent / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [6]
    assert res["best"]["step"] == res["final"]["step"] == 6 and res["best"]["metrics"] == res["final"]["metrics"]


@pytest.mark.parametrize("objective", ["dss", "cot_mi"])
def test_cot_mi_mini_overlay(objective):
    """(d): tiny-t5 at its own lr, the papers' objective settings, one valid read after the last step, and the
    same step budget for both objectives."""
    cfg = OmegaConf.to_container(compose_config(["experiment=cot_mi_mini", "task=cot/cqa", f"objective={objective}"]),
                                 resolve=True)
    assert cfg["experiment_name"] == "cot_mi_mini" and cfg["task"]["name"] == "cot/cqa"
    assert cfg["model"]["name"] == "tiny-t5" and cfg["trainer"]["lr"] == cfg["model"]["lr"] == 1.0e-3
    assert cfg["trainer"]["eval_every"] == "end" and cfg["trainer"]["max_steps"] == 400
    o = cfg["objective"]
    assert o["name"] == objective and o["alpha"] == 0.5
    if objective == "cot_mi":
        assert o["beta"] == 0.1 and o["mi_variant"] == "reference"
    # the test split is never used for selection: the final model is the one evaluated on test
    assert cfg["task"]["max_eval_samples"] == 400 and cfg["task"]["label_source"] == "llm"
