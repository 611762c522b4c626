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
