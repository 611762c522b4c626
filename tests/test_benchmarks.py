"""The benchmark scripts run in their reduced mode (CI-sized) and print what they measure."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.conftest import REPO, offline_env, with_warm_cli


def _run(args, timeout=600, env=None):
    proc = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_bench_mi_prints_estimates_against_truth_and_the_summary():
    out = _run(["benchmarks/bench_mi.py", "--quick", "--estimators", "copula,ksg", "--tasks", "d=5"])
    rows = {line[:36].strip(): line[36:].split() for line in out.splitlines() if line.startswith("gauss d=5")}
    assert set(rows) == {"gauss d=5 I=2"}
    truth, copula_mean, ksg_mean = float(rows["gauss d=5 I=2"][0]), float(rows["gauss d=5 I=2"][1]), \
        float(rows["gauss d=5 I=2"][4])
    assert truth == pytest.approx(2.0) and abs(copula_mean - truth) < 0.1 and ksg_mean < truth
    summary = {line.split()[0]: line.split()[1:] for line in out.split("summary (nats)")[1].splitlines()[2:]
               if line.strip()}
    assert set(summary) == {"copula", "ksg"}
    assert float(summary["copula"][0]) == pytest.approx(abs(copula_mean - truth), abs=1e-3)  # MAE of one task
    assert "machine:" in out


@pytest.mark.slow
def test_bench_flownib_quick_prints_ratio():
    out = _run(["benchmarks/bench_flownib.py", "--quick", "--steps", "8"])
    m = re.search(r"speed-up loop/batched: critic training ([0-9.]+)x", out)
    assert m and float(m.group(1)) > 0
    assert "batched (all layers)" in out and "loop (one layer at a time)" in out


@pytest.mark.slow
def test_bench_warm_exit_prints_every_row_and_the_ratios():
    out = _run(["benchmarks/bench_warm_exit.py", "--trials", "1"], env=offline_env())
    rows = dict(re.findall(r"^\| (.+?) \| ([0-9.]+) \|$", out, flags=re.M))
    assert set(rows) == {"child exit, heap as is", "child exit, heap frozen", "child exit, os._exit",
                         "cmiexp --cfg job, new process", "cmiexp --cfg job, warm (tests/warm_cli.py)"}
    assert all(float(v) > 0 for v in rows.values())
    assert re.search(r"frozen heap: exit [0-9.]+x faster; os._exit: [0-9]+x faster", out)
    assert re.search(r"warm cmiexp --cfg job: [0-9.]+x the speed of a new process", out) and "machine:" in out


# --------------------------------------------------------------------- benchmarks/gpu_check.sh
GPU_CHECK_ROWS = ["HF Trainer ce (defaults)", "cmiexp ce", "cmiexp cmi_min", "FlowNIB batched (all layers)",
                  "FlowNIB per-layer loop", "cmiexp ce, 2 processes (DDP)"]


def _gpu_check_module():
    import importlib.util

    # As when it runs as a script: its own folder first on sys.path (it imports bench_trainer).
    if str(REPO / "benchmarks") not in sys.path:
        sys.path.insert(0, str(REPO / "benchmarks"))
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_gpu_check_peak_table_matches_device_names_and_says_unknown_otherwise():
    gc = _gpu_check_module()
    assert gc.bf16_peak_tflops("NVIDIA H200") == 989.0
    assert gc.bf16_peak_tflops("NVIDIA H200 NVL") == 835.0
    assert gc.bf16_peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert gc.bf16_peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert gc.bf16_peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert gc.bf16_peak_tflops("NVIDIA L40S") == 362.0 and gc.bf16_peak_tflops("NVIDIA L4") == 121.0
    assert gc.bf16_peak_tflops("NVIDIA GeForce RTX 3090") is None
    # FLOPs of one example of length L: 6*N*L + 12*layers*d*L^2 + 6*N_head
    assert gc.flops_per_example([10, 20], 1000, 7, 2, 4) == pytest.approx(
        ((6 * 1000 * 10 + 12 * 2 * 4 * 100 + 42) + (6 * 1000 * 20 + 12 * 2 * 4 * 400 + 42)) / 2)


@pytest.mark.slow
def test_gpu_check_cpu_smoke_prints_one_table_with_finite_numbers(tmp_path):
    import json
    import math
    import os

    import torch
    from transformers import AutoModelForSequenceClassification

    from cmiexp.models.hub_configs import published_config

    # Its two one-process cmiexp runs start warm ($CMIEXP=cmiexp, the shim on PATH); the Trainer's and the
    # launchers' processes are new Pythons, as on a GPU machine.
    env = dict(with_warm_cli(offline_env()), OUT=str(tmp_path), CMIEXP="cmiexp")
    proc = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--cpu-smoke"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    table = (tmp_path / "gpu_check.md").read_text().strip()
    assert table in proc.stdout  # the printed table is the one written to $OUT
    rows = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and cells[0] != "check":
            rows[cells[0]] = cells
    fsdp_rows = [r for r in rows if r.startswith("cmiexp ce, FSDP2")]
    assert list(rows)[:len(GPU_CHECK_ROWS)] == GPU_CHECK_ROWS and len(fsdp_rows) == 1 and len(rows) == 7
    cuda = torch.cuda.is_available()
    for name in GPU_CHECK_ROWS[:5]:
        time_s, throughput, _unit, mfu, _peak, ratio = rows[name][1:7]
        assert math.isfinite(float(time_s)) and float(time_s) > 0, name
        assert math.isfinite(float(throughput)) and float(throughput) > 0, name
        assert math.isfinite(float(ratio.rstrip("x%"))), name
        if not cuda:
            assert mfu == "n/a", name  # no peak for a CPU
    if not cuda:
        assert "skipped: needs 2 GPUs, found 0" in rows["cmiexp ce, 2 processes (DDP)"][-1]
        assert "skipped: FSDP needs a GPU" in rows[fsdp_rows[0]][-1]
        assert "bf16 dense peak unknown" in table
        # The FSDP row's checkpoint round trip, exercised on the ce run's checkpoint/best.
        ck = json.loads((tmp_path / "gpu_check.json").read_text())["ce_checkpoint"]
        assert ck["vs_latest"] == 0.0 and ck["moved"] > 0 and ck["dev_rows"] > 0
        assert ck["reload_loss"] == pytest.approx(ck["run_loss"], abs=1e-4)
        assert ck["reload_accuracy"] == pytest.approx(ck["run_accuracy"], abs=1e-9)

    # The ratios are what the raw numbers give, recomputed here from results.json's own fields.
    raw = json.loads((tmp_path / "gpu_check.json").read_text())
    hf = raw["trainer"]
    ce, cmi = raw["cmiexp_ce"], raw["cmiexp_cmi_min"]
    assert ce["distributed_type"] == "NO" and ce["num_processes"] == 1
    rows_per_epoch = raw["settings"]["steps"] * raw["settings"]["batch"]
    assert ce["num_train_samples"] == hf["rows"] == rows_per_epoch == len(hf["lengths"])
    assert ce["global_step"] == cmi["global_step"] == raw["settings"]["steps"]
    ce_s = ce["wall_time_s"] - ce["eval_time_s"] - ce["checkpoint_time_s"]
    hf_sps, ce_sps = hf["samples"] / hf["train_s"], rows_per_epoch / ce_s
    assert float(rows["cmiexp ce"][2]) == pytest.approx(ce_sps, abs=0.06)
    assert float(rows["cmiexp ce"][6].rstrip("x")) == pytest.approx(ce_sps / hf_sps, abs=0.006)
    cmi_s = cmi["wall_time_s"] - cmi["eval_time_s"] - cmi["checkpoint_time_s"]
    assert float(rows["cmiexp cmi_min"][6].rstrip("%")) == pytest.approx(100 * (cmi_s / ce_s - 1), abs=0.06)
    fl = raw["flownib"]
    assert float(rows["FlowNIB per-layer loop"][6].rstrip("x")) == pytest.approx(fl["loop_s"] / fl["batched_s"], abs=6e-3)
    assert fl["max_diff"] < 1e-3  # the two modes train the same critics

    # FLOPs per example from an independent count of the same architecture's parameters.
    config = published_config("bert-base-uncased")
    for k, v in raw["settings"]["shape"].items():
        setattr(config, k, v)
    config.num_labels = 2
    model = AutoModelForSequenceClassification.from_config(config)
    n_layer = sum(p.numel() for p in model.bert.encoder.parameters())
    n_head = sum(p.numel() for p in model.bert.pooler.parameters()) + sum(p.numel() for p in model.classifier.parameters())
    assert hf["n_layer_params"] == n_layer and hf["n_head_params"] == n_head
    layers, d = config.num_hidden_layers, config.hidden_size
    expected = sum(6 * n_layer * L + 12 * layers * d * L * L + 6 * n_head for L in hf["lengths"]) / len(hf["lengths"])
    assert raw["flops_per_example"] == pytest.approx(expected, rel=1e-9)


@pytest.mark.slow
def test_bench_trainer_quick_prints_every_config_and_the_goal_ratios():
    # Its cmiexp processes start warm (tests/warm_cli.py; the benchmark times only the training loop).
    out = _run(["benchmarks/bench_trainer.py", "--quick"], env=dict(with_warm_cli(offline_env()), CMIEXP="cmiexp"))
    assert "machine: " in out and "repeats=1" in out
    table = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 5 and parts[0] in ("hf_trainer", "ce", "ce_no_grouping", "cmi_min_online", "cmi_min_epoch",
                                            "mcmi_online", "mcmi_fixed", "kd_cached"):
            table[parts[0]] = {"sps": float(parts[1]), "time": float(parts[2]), "centroid": float(parts[3]),
                               "peak": float(parts[4])}
    assert len(table) == 8, out
    assert all(r["sps"] > 0 and r["peak"] > 0 for r in table.values())
    # Full-pass modes spend time in centroid passes, online ones none.
    assert table["cmi_min_epoch"]["centroid"] > 0 and table["mcmi_fixed"]["centroid"] > 0
    assert table["cmi_min_online"]["centroid"] == table["mcmi_online"]["centroid"] == 0
    # The ratios agree with the table (one repeat: a ratio of times is the inverse ratio of samples/s).
    g1 = float(re.search(r"ce / HF Trainer throughput: ([0-9.]+)x", out).group(1))
    assert g1 == pytest.approx(table["ce"]["sps"] / table["hf_trainer"]["sps"], rel=0.02)
    for name in ("cmi_min_online", "cmi_min_epoch", "mcmi_online", "mcmi_fixed"):
        pct = float(re.search(rf"{name} epoch time over ce, centroid work included: ([-+0-9.]+)%", out).group(1))
        assert pct == pytest.approx(100 * (table["ce"]["sps"] / table[name]["sps"] - 1), abs=2.0), name
    kd = float(re.search(r"kd \(cached teacher logits\) epoch time / ce: ([0-9.]+)x", out).group(1))
    assert kd == pytest.approx(table["ce"]["sps"] / table["kd_cached"]["sps"], rel=0.02)
    assert re.search(r"cache build \(once, reused by every epoch and seed\): [0-9.]+ s", out)
