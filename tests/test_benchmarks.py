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
def test_bench_mi_quick_prints_estimates_against_truth():
    out = _run(["scripts/bench_mi.py", "--quick"])
    rows = {line.split()[0] + " " + line.split()[1]: line.split() for line in out.splitlines()
            if re.match(r"^d=\d+ ", line)}
    assert {"d=1 gauss", "d=5 gauss", "d=5 indep."} <= set(rows)
    # columns: case, kind, true, then "mean ± std" per estimator
    truth = float(rows["d=1 gauss"][2])
    smile = float(rows["d=1 gauss"][3])
    assert truth == pytest.approx(1.0) and abs(smile - truth) < 0.2


@pytest.mark.slow
def test_bench_flownib_quick_prints_ratio():
    out = _run(["scripts/bench_flownib.py", "--quick", "--steps", "8"])
    m = re.search(r"speed-up loop/batched: critic training ([0-9.]+)x", out)
    assert m and float(m.group(1)) > 0
    assert "batched (all layers)" in out and "loop (one layer at a time)" in out
