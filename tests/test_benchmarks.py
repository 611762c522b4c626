"""The benchmark scripts run in their reduced mode (CI-sized) and print what they measure."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.conftest import REPO


def _run(args, timeout=600):
    proc = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)
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
def test_bench_trainer_quick_prints_every_config_and_the_goal_ratios():
    out = _run(["benchmarks/bench_trainer.py", "--quick"])
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
