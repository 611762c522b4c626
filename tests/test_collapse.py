"""Collapse detection (issue 14, item 3): a classifier predicting (nearly) one class says so on the
console, records collapsed: true and its predicted-class histogram, and cmiexp-report marks the cell."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from cmiexp.train.evaluate import collapse_check, collapse_fields
from tests.conftest import GLUE_DIR, find_run_dirs, run_cli


def test_collapse_check_on_hand_made_histograms():
    c = collapse_check({"pred_counts": [31, 1]}, ["not_entailment", "entailment"], 0.95)
    assert c == {"collapsed": True, "majority_class": "not_entailment", "majority_share": 31 / 32,
                 "histogram": {"not_entailment": 31, "entailment": 1}}
    assert collapse_check({"pred_counts": [20, 12]}, ["a", "b"], 0.95)["collapsed"] is False
    assert collapse_check({"pred_counts": [0, 0, 40]}, None, 0.95)["majority_class"] == "2"
    assert collapse_check({"pred_counts": [30, 2]}, ["a", "b"], share=0.9)["collapsed"] is True
    assert collapse_check({"accuracy": 0.5}, ["a", "b"], 0.95) is None  # regression: no histogram
    f = collapse_fields({"pred_counts": [10, 10]}, {"pred_counts": [0, 20]}, ["a", "b"], 0.95)
    assert f["collapsed"] is True and f["collapsed_at"] == ["final"]
    assert f["predicted_class_histogram"] == {"best": {"a": 10, "b": 10}, "final": {"a": 0, "b": 20}}
    assert collapse_fields(None, {"loss": 1.0}, None, 0.95) == {}
    from cmiexp.runs import collapse_text

    assert collapse_text({"collapsed": True, **f}) == ("the final dev predictions are (nearly) all one class or one "
                                                        "output (a: 0, b: 20)")
    assert collapse_text({"collapsed": False}) is None and collapse_text({}) is None


def test_generation_collapse_is_one_output_text_for_nearly_every_row():
    # 380 of 400 chain-of-thought answers are the same string: 0.95 of the rows, at the threshold
    c = collapse_check({"accuracy": 0.0, "top_prediction_share": 380 / 400, "num_samples": 400}, None, 0.95)
    assert c == {"collapsed": True, "majority_class": "the most common output", "majority_share": 0.95,
                 "histogram": {"most common output": 380, "other outputs": 20}}
    assert collapse_check({"top_prediction_share": 0.3, "num_samples": 200}, None, 0.95)["collapsed"] is False
    assert collapse_check({"top_prediction_share": 0.3}, None, 0.95) is None  # no row count: nothing to judge


def test_cot_score_reports_the_share_of_the_most_common_output():
    from types import SimpleNamespace

    from cmiexp.train.adapters.cot import CotAdapter

    adapter = CotAdapter.__new__(CotAdapter)
    adapter.raw = {"valid": {i: (f"q{i}", "gold") for i in range(4)}}
    run = SimpleNamespace(task=SimpleNamespace(name="cot/x", is_correct=lambda p, g: p == g))
    rows = [{"idx": i, "prediction": p, "confidence": 0.5} for i, p in enumerate(["a", "a", "gold", "a"])]
    m = adapter.score(run, "valid", rows)
    assert m["top_prediction_share"] == 0.75 and m["accuracy"] == 0.25 and m["num_samples"] == 4


@pytest.mark.slow
def test_a_collapsed_run_says_so_and_the_report_marks_it(cmiexp_env, output_dir):
    # tiny-bert at BERT-base's lr 2e-5 for two steps: a randomly initialised model predicts one class.
    env = dict(cmiexp_env, OMP_NUM_THREADS="1")
    proc = run_cli(["task=glue/rte", f"task.data_dir={GLUE_DIR}", "task.max_train_samples=64",
                    "task.max_eval_samples=64", "task.max_length=32", "trainer.lr=2e-5", "trainer.max_steps=2",
                    "trainer.progress_bar=false", "seed=1"], env)
    (run_dir,) = find_run_dirs(output_dir)
    res = json.loads((run_dir / "results.json").read_text())
    assert res["status"] == "completed" and res["collapsed"] is True and res["collapse_share"] == 0.95
    hist = res["predicted_class_histogram"]
    assert set(hist) == {"best", "final"} and "best" in res["collapsed_at"]
    assert set(hist["best"]) == {"entailment", "not_entailment"} and sum(hist["best"].values()) == 64
    assert max(hist["best"].values()) >= 0.95 * 64
    assert hist["best"] == dict(zip(["entailment", "not_entailment"], res["best"]["metrics"]["pred_counts"]))
    # Its accuracy is the dev share of the predicted class, and the console says what happened.
    assert "COLLAPSED" in proc.stdout and "trainer.lr (now 2e-05)" in proc.stdout
    # One wording everywhere: the console warning, the end-of-run summary and the report note.
    from cmiexp.runs import collapse_text

    text = collapse_text(res)
    assert text.startswith(f"the {' and '.join(res['collapsed_at'])} dev predictions are (nearly) all one class or "
                           "one output (") and text.endswith(")")
    assert f"COLLAPSED: {text}; the model has not learned" in proc.stdout + proc.stderr
    assert f"COLLAPSED: {text}\n" in proc.stdout + proc.stderr
    report = subprocess.run([sys.executable, "-m", "cmiexp.report", str(output_dir / "runs")], env=env,
                            capture_output=True, text=True, timeout=120)
    assert report.returncode == 0, report.stderr
    row = next(line for line in report.stdout.splitlines() if line.startswith("| tiny-bert / ce |"))
    assert "(n=1, 1 collapsed)" in row
    assert f"tiny-bert / ce, RTE, seed 1: collapsed, {text}" in report.stdout


def test_collapse_share_is_checked_before_training(tmp_path, cache_dir):
    from cmiexp.errors import ConfigError
    from cmiexp.train.runner import run_experiment
    from tests.conftest import compose_config

    cfg = compose_config(["trainer.collapse_share=1.5", f"paths.output_dir={tmp_path}", f"paths.cache_dir={cache_dir}"])
    with pytest.raises(ConfigError, match=r"trainer.collapse_share=1.5 must be in \(0, 1\]"):
        run_experiment(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()
