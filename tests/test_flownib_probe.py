"""``cmiexp objective=flownib``: the FlowNIB probe wired into the command (cmiexp/probes/run_probe.py).

End to end on ../shared RTE: a tiny-bert fine-tune, the probe of its run directory (CLI), the
untrained baseline overlaid with it (compare), and the one-line refusals. The pure helpers are
checked against hand-worked values.
"""

from __future__ import annotations

import csv
import json
import re
import math
from pathlib import Path

import pytest
import torch

from cmiexp.errors import ConfigError, DataError
from tests.conftest import GLUE_DIR, command_env, compose_config, find_run_dirs, run_cli

# All of this module's tests on one xdist worker (pyproject: --dist loadgroup): its module-scoped
# fixtures (trained runs) are built once, not once on each worker that draws one of its tests.
pytestmark = pytest.mark.xdist_group("flownib_probe")

RTE = ["task=glue/rte", f"task.data_dir={GLUE_DIR}", "task.max_train_samples=128", "task.max_eval_samples=32",
       "task.max_length=64"]
PROBE = ["objective=flownib", "objective.steps=30", "objective.max_samples=128", "objective.batch_size=32",
         "objective.record_every=1"]
PNGS = ("flownib_information_plane.png", "flownib_deff_by_layer.png", "flownib_oic_by_layer.png")


# ----------------------------------------------------------------------------- shared runs


@pytest.fixture(scope="module")
def env(tmp_path_factory, cache_dir) -> dict:
    out = tmp_path_factory.mktemp("probe-outputs")
    return command_env(cache_dir, out)


@pytest.fixture(scope="module")
def finetuned(env) -> Path:
    """A finished tiny-bert CE run on RTE (the probe's source)."""
    run_cli([*RTE, "trainer.epochs=1", "trainer.progress_bar=false"], env)
    (run_dir,) = [d for d in find_run_dirs(env["CMIEXP_OUTPUT_DIR"]) if "/ce/" in d.as_posix()]
    assert (run_dir / "checkpoint" / "best" / "config.json").is_file()
    return run_dir


@pytest.fixture(scope="module")
def probed(finetuned, env) -> tuple[Path, str]:
    """The probe of the fine-tuned run, through the real command."""
    proc = run_cli([*RTE, *PROBE, f"objective.source={finetuned}"], env)
    # seed 0 (the default): other tests of this module write seed1 probes into the same outputs
    (run_dir,) = [d for d in find_run_dirs(env["CMIEXP_OUTPUT_DIR"]) if "/flownib/seed0-" in d.as_posix()]
    return run_dir, proc.stdout


def _brute_force_oic(ix, iy):
    """gamma = R_y / (R_x + R_y); first t maximising gamma*x + (1-gamma)*y (plain loop)."""
    rx, ry = max(ix) - min(ix), max(iy) - min(iy)
    gamma = 0.5 if rx + ry == 0 else ry / (rx + ry)
    best_t, best = 0, -math.inf
    for t, (a, b) in enumerate(zip(ix, iy)):
        if gamma * a + (1 - gamma) * b > best:
            best_t, best = t, gamma * a + (1 - gamma) * b
    return best_t, gamma


# ----------------------------------------------------------------------------- end to end


def test_probe_of_finetuned_run_writes_every_output(probed, finetuned):
    run_dir, stdout = probed
    assert "/glue/rte/tiny-bert/flownib/seed0" in run_dir.as_posix()
    for name in ("config.yaml", "flownib.json", "flownib.csv", "results.json", *PNGS):
        assert (run_dir / name).is_file() and (run_dir / name).stat().st_size > 0, name
    for name in PNGS:
        assert (run_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name

    hf_config = json.loads((finetuned / "checkpoint" / "best" / "config.json").read_text())
    d = json.loads((run_dir / "flownib.json").read_text())
    num_layers = hf_config["num_hidden_layers"]
    assert num_layers == 2 and d["num_layers"] == num_layers and len(d["layers"]) == num_layers
    assert [e["layer"] for e in d["layers"]] == [1, 2]
    assert d["steps"] == list(range(30)) and len(d["alpha"]) == 30
    assert d["config"]["probe"]["num_samples"] == 128 and d["config"]["probe"]["source"]["objective"] == "ce"
    for e in d["layers"]:
        ix, iy = e["trajectory"]["ix"], e["trajectory"]["iy"]
        assert len(ix) == len(iy) == 30  # one trajectory per layer, a point per step
        values = ix + iy + [e["d_eff_pr"], e["d_eff_shannon"], e["heldout"]["ixz"], e["heldout"]["izy"],
                            e["oic"]["x"], e["oic"]["y"], e["oic"]["gamma"]]
        assert all(math.isfinite(v) for v in values)
        assert set(e["oic"]) >= {"step", "x", "y", "gamma"}
        t, gamma = _brute_force_oic(ix, iy)
        assert e["oic"]["step"] == t and e["oic"]["x"] == ix[t] and e["oic"]["y"] == iy[t]
        assert e["oic"]["gamma"] == pytest.approx(gamma, abs=1e-12)
        # participation ratio of 128-dim activations: between 1 and the dimension
        assert 1.0 <= e["d_eff_pr"] <= hf_config["hidden_size"]

    with open(run_dir / "flownib.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["layer"]) for r in rows] == [1, 2]
    for r, e in zip(rows, d["layers"]):
        assert float(r["oic_x"]) == pytest.approx(e["oic"]["x"]) and float(r["oic_y"]) == pytest.approx(e["oic"]["y"])

    res = json.loads((run_dir / "results.json").read_text())
    assert res["schema"] == 1 and res["status"] == "completed" and res["error"] is None
    assert (res["task"], res["model"], res["objective"], res["seed"]) == ("glue/rte", "tiny-bert", "flownib", 0)
    assert res["task_type"] == "classification" and res["teacher_objective"] == "ce"
    assert res["source"]["run_dir"] == str(finetuned.resolve())
    assert res["primary_metric"] == "oic_y_mean"
    m = res["best"]["metrics"]
    oy = [e["oic"]["y"] for e in d["layers"]]
    ox = [e["oic"]["x"] for e in d["layers"]]
    assert m["oic_y_mean"] == pytest.approx((oy[0] + oy[1]) / 2) and m["oic_x_mean"] == pytest.approx((ox[0] + ox[1]) / 2)
    assert m["num_layers"] == 2 and m["num_samples"] == 128 and res["final"]["metrics"] == m
    assert "oic_y_mean" in stdout and "status completed" in stdout


def test_probe_of_rte_run_respects_the_bounds_of_mi(finetuned, env):
    """Acceptance: a probe of the fine-tuned tiny-bert on 1000 RTE rows reports test-split estimates
    inside the bounds of MI (0 <= I(Z;Y) <= ln 2 for a binary task), says it checked them, and draws
    one trajectory per layer."""
    rte = [a for a in RTE if not a.startswith("task.max_train_samples")] + ["task.max_train_samples=1000"]
    proc = run_cli([*rte, "objective=flownib", "objective.steps=200", "objective.max_samples=1000",
                    "objective.batch_size=64", f"objective.source={finetuned}", "seed=1", "trainer.progress_bar=false"],
                   env)
    (run_dir,) = [d for d in find_run_dirs(env["CMIEXP_OUTPUT_DIR"]) if "/flownib/seed1" in d.as_posix()]
    d = json.loads((run_dir / "flownib.json").read_text())
    for e in d["layers"]:
        assert -0.05 <= e["heldout"]["izy"] <= math.log(2) + 0.05, e["heldout"]
        assert e["heldout"]["ixz"] >= -0.05, e["heldout"]
    assert d["bounds"]["h_y"] <= math.log(2) + 1e-9
    assert isinstance(d["ok"], bool) and isinstance(d["flags"], list)
    assert "FlowNIB OIC" in proc.stdout + proc.stderr  # the one-line summary
    res = json.loads((run_dir / "results.json").read_text())
    assert res["probe_ok"] == d["ok"] and res["best"]["metrics"]["flagged_estimates"] == len(d["flags"])
    from cmiexp.probes.flownib import plot_information_plane

    assert plot_information_plane(d, run_dir / "replot.png") == d["num_layers"] == 2


def test_rerunning_a_finished_probe_returns_its_result(probed, finetuned, cache_dir):
    from cmiexp.jobs import run_job

    run_dir, _ = probed
    before = {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir() if p.is_file()}
    cfg = compose_config([*RTE, *PROBE, f"objective.source={finetuned}", f"paths.cache_dir={cache_dir}"])
    res = run_job(cfg, run_dir)
    assert res == json.loads((run_dir / "results.json").read_text())
    assert {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir() if p.is_file()} == before


def test_untrained_baseline_overlaid_with_the_finetuned_probe(probed, cache_dir, tmp_path):
    from cmiexp.jobs import run_job

    other, _ = probed
    run_dir = tmp_path / "baseline"
    cfg = compose_config([*RTE, *PROBE, "objective.pooling=head", f"objective.compare=[{other}]",
                          f"paths.cache_dir={cache_dir}"])
    res = run_job(cfg, run_dir)
    assert res["status"] == "completed" and res["source"] == {"kind": "untrained"}
    assert res["teacher_objective"] == "untrained" and res["best"]["metrics"]["num_layers"] == 2
    for name in ("flownib.json", *PNGS, "compare_information_plane.png", "compare_oic_by_layer.png",
                 "compare_flownib.json"):
        assert (run_dir / name).is_file() and (run_dir / name).stat().st_size > 0, name
    mine = json.loads((run_dir / "flownib.json").read_text())
    theirs = json.loads((other / "flownib.json").read_text())
    assert mine["config"]["probe"]["pooling_used"] == "cls"  # head=pooling on an encoder reads CLS
    summary = json.loads((run_dir / "compare_flownib.json").read_text())
    assert list(summary) == ["tiny-bert (untrained)", "tiny-bert (ce)"]
    for label, d in (("tiny-bert (untrained)", mine), ("tiny-bert (ce)", theirs)):
        assert [(p["layer"], p["x"], p["y"]) for p in summary[label]] == \
            [(e["layer"], e["oic"]["x"], e["oic"]["y"]) for e in d["layers"]]


# ----------------------------------------------------------------------------- refusals


def test_missing_source_is_one_line_error(env, tmp_path):
    missing = tmp_path / "no_such_run"
    proc = run_cli([*RTE, "objective=flownib", f"objective.source={missing}"], env, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("cmiexp: error:")]
    assert len(lines) == 1 and f"objective.source={missing}" in lines[0] and "no such run directory" in lines[0]


def test_source_of_another_task_model_or_head_is_refused(finetuned, cache_dir, tmp_path):
    from cmiexp.jobs import run_job

    cases = {"task=glue/mrpc": "task=glue/rte", "model=tiny-gpt2": "model=tiny-bert", "head=masking": "head=pooling"}
    for override, hint in cases.items():
        cfg = compose_config([*RTE, "objective=flownib", f"objective.source={finetuned}", override,
                              f"paths.cache_dir={cache_dir}"])
        with pytest.raises(ConfigError) as err:
            run_job(cfg, tmp_path / "run")
        msg = str(err.value)
        assert "\n" not in msg and str(finetuned) in msg and f"use {hint}" in msg and override in msg, msg
    assert not (tmp_path / "run").exists()  # refused before the run directory was claimed


def test_source_without_checkpoint_or_config_is_refused(finetuned, tmp_path):
    from cmiexp.probes.inputs import resolve_source

    cfg = compose_config([*RTE, "objective=flownib"])
    bare = tmp_path / "bare"
    bare.mkdir()
    with pytest.raises(ConfigError, match="has no config.yaml"):
        resolve_source(str(bare), cfg)
    (bare / "config.yaml").write_text((finetuned / "config.yaml").read_text())
    with pytest.raises(ConfigError, match="has no checkpoint/best"):
        resolve_source(str(bare), cfg)
    (bare / "results.json").write_text(json.dumps({"status": "failed"}))
    with pytest.raises(ConfigError, match="status 'failed'"):
        resolve_source(str(bare), cfg)
    for text, why in (("{not json", "results.json is not valid JSON"), ("[1]", "does not hold a JSON object")):
        (bare / "results.json").write_text(text)  # read through cmiexp.runs: one line naming the file
        with pytest.raises(ConfigError, match=f"{re.escape(str(bare / 'results.json'))}: .*{why}"):
            resolve_source(str(bare), cfg)
    # the checkpoint folder itself is accepted and mapped to its run
    src = resolve_source(str(finetuned / "checkpoint" / "best"), cfg)
    assert src.run_dir == finetuned and src.describe()["objective"] == "ce"


def test_bad_probe_settings_name_the_key(tmp_path):
    from cmiexp.probes.inputs import load_compare_entries, probe_settings

    base = dict(compose_config(["objective=flownib"]).objective)
    for key, value in (("pooling", "max"), ("steps", 0), ("batch_size", 1), ("heldout_fraction", 1.0), ("lr", -1)):
        with pytest.raises(ConfigError, match=f"objective.{key}="):
            probe_settings({**base, key: value})
    # the numbers follow cmiexp.checks' one rule: no strings, no bools, no nan; null only where it means something
    for key, value, text in (("lr", "abc", "objective.lr='abc' must be a finite number"),
                             ("steps", "30", "objective.steps='30' must be an integer"),
                             ("max_samples", 2, "objective.max_samples=2 must be >= 4, or null (the whole split)"),
                             ("noise_std", float("nan"), "objective.noise_std=nan must be a finite number"),
                             ("delta", None, "objective.delta=null must be a finite number")):
        with pytest.raises(ConfigError) as e:
            probe_settings({**base, key: value})
        assert str(e.value).startswith(text), str(e.value)
    assert probe_settings({**base, "steps": 30.0})["steps"] == 30 and probe_settings(base)["max_samples"] == 5000
    with pytest.raises(ConfigError, match="objective.compare entry .*no flownib.json"):
        load_compare_entries([str(tmp_path)])
    listed = compose_config(["objective=flownib", "objective.compare=[a/b,c]"]).objective
    assert probe_settings(listed)["compare"] == probe_settings(dict(listed))["compare"] == ["a/b", "c"]


def test_generation_tasks_are_refused(tmp_path):
    from cmiexp.jobs import run_job

    with pytest.raises(ConfigError, match="task=cot/svamp is not one"):
        run_job(compose_config(["task=cot/svamp", "objective=flownib"]), tmp_path / "run")
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- pure helpers


def test_select_rows_drops_unlabelled_and_subsamples():
    from cmiexp.probes.run_probe import select_rows

    assert select_rows([1, -1, 0, 2, -1, 1], False, None).tolist() == [0, 2, 3, 5]
    assert select_rows([0.5, float("nan"), -2.0, 3.0], True, None).tolist() == [0, 2, 3]  # negative targets are labels
    labels = [i % 3 if i % 4 else -1 for i in range(100)]  # 75 labelled rows
    labelled = {i for i in range(100) if i % 4}
    pick = select_rows(labels, False, 20, seed=0)
    assert len(pick) == 20 and len(set(pick.tolist())) == 20 and set(pick.tolist()) <= labelled
    assert pick.tolist() == sorted(pick.tolist())
    assert select_rows(labels, False, 20, seed=0).tolist() == pick.tolist()  # a fixed subset
    assert select_rows(labels, False, 20, seed=1).tolist() != pick.tolist()
    assert select_rows(labels, False, 500).tolist() == sorted(labelled)  # fewer rows than max_samples: all


def test_summary_metrics_by_hand():
    from cmiexp.probes.run_probe import summary_metrics

    def layer(k, x, y, hx, hy, d):
        return {"layer": k, "trajectory": {"ix": [x], "iy": [y]}, "oic": {"step": 0, "x": x, "y": y, "gamma": 0.5},
                "d_eff_pr": d, "d_eff_shannon": d, "heldout": {"ixz": hx, "izy": hy}}

    d = {"layers": [layer(1, 1.0, 0.5, 2.0, 0.1, 3.0), layer(2, 2.0, 0.1, 1.0, 0.2, 5.0),
                    layer(3, 4.0, 0.3, 0.0, 0.6, 10.0)]}
    m = summary_metrics(d)
    assert m["oic_x_mean"] == pytest.approx(7.0 / 3) and m["oic_y_mean"] == pytest.approx(0.3)
    assert (m["oic_x_max"], m["oic_y_max"], m["oic_x_last"], m["oic_y_last"]) == (4.0, 0.5, 4.0, 0.3)
    assert m["heldout_ixz_mean"] == pytest.approx(1.0) and m["heldout_izy_mean"] == pytest.approx(0.3)
    assert m["d_eff_pr_mean"] == pytest.approx(6.0) and m["num_layers"] == 3
    with pytest.raises(DataError):
        summary_metrics({"layers": []})


def test_head_pooling_reads_the_heads_token():
    from cmiexp.probes.run_probe import head_pooling

    assert head_pooling("mean", "masking", "encoder", 7) == ("mean", None)
    assert head_pooling("head", "pooling", "encoder") == ("cls", None)
    assert head_pooling("head", "pooling", "decoder") == ("last", None)
    assert head_pooling("head", "generation", "decoder") == ("last", None)
    pooling, fn = head_pooling("head", "masking", "encoder", mask_token_id=7)
    ids = torch.tensor([[2, 5, 7, 9, 0], [2, 7, 4, 7, 3]])  # row 1: the appended (last) mask counts
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    assert pooling == "head" and fn(ids, mask).tolist() == [2, 3]
    with pytest.raises(ConfigError, match="mask token"):
        head_pooling("head", "masking", "encoder", None)


def test_extract_activations_mean_pools_x_and_reads_head_positions():
    """X is the masked mean of the embedding output whatever Z's pooling; pooling='head' reads Z
    at the given positions (checked against each example run alone, unpadded)."""
    from transformers import BertConfig, BertForSequenceClassification

    from cmiexp.probes.flownib import extract_activations

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                                     intermediate_size=32, vocab_size=50, num_labels=2))
    seqs = [[3, 4, 5, 6], [7, 8], [9, 10, 11]]
    width = 4
    batch = {"input_ids": torch.tensor([q + [0] * (width - len(q)) for q in seqs]),
             "attention_mask": torch.tensor([[1] * len(q) + [0] * (width - len(q)) for q in seqs]),
             "labels": torch.tensor([0, 1, 0]), "idx": torch.tensor([0, 1, 2])}
    positions = [2, 1, 0]
    act = extract_activations(model, [batch], pooling="head",
                              head_positions=lambda ids, mask: torch.tensor(positions))
    cls = extract_activations(model, [batch], pooling="cls")
    model.eval()
    with torch.no_grad():
        for i, q in enumerate(seqs):
            hs = model(input_ids=torch.tensor([q]), output_hidden_states=True).hidden_states
            x_ref = hs[0][0].mean(0)
            assert torch.allclose(act["x"][i], x_ref, atol=1e-5) and torch.allclose(cls["x"][i], x_ref, atol=1e-5)
            for layer in (1, 2):
                assert torch.allclose(act["z"][layer - 1, i], hs[layer][0, positions[i]], atol=1e-5)
                assert torch.allclose(cls["z"][layer - 1, i], hs[layer][0, 0], atol=1e-5)
    with pytest.raises(ConfigError, match="head_positions"):
        extract_activations(model, [batch], pooling="head")
