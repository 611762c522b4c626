"""The shell reproduction scripts: full-mode commands (dry run) and both offline smoke modes end to end."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

SCRIPTS = REPO / "scripts"
GLUE8 = "glue/cola,glue/sst2,glue/mrpc,glue/qqp,glue/mnli,glue/qnli,glue/rte,glue/wnli"


def _env(cmiexp_env: dict) -> dict:
    # The scripts call the commands of this interpreter; one BLAS thread is faster for tiny models on a
    # shared CPU (and does not change what is tested).
    return dict(cmiexp_env, CMIEXP=f"{sys.executable} -m cmiexp", CMIEXP_REPORT=f"{sys.executable} -m cmiexp.report",
                OMP_NUM_THREADS="1")


def _run(script: str, args: list[str], env: dict, timeout: int = 900) -> subprocess.CompletedProcess:
    proc = subprocess.run(["bash", str(SCRIPTS / script), *args], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{script} {args} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def _table_row(stdout: str, method: str) -> list[str]:
    """The cells of the Markdown results-table row whose first cell is ``method``."""
    rows = [line for line in stdout.splitlines() if line.startswith(f"| {method} |")]
    assert rows, f"no report row {method!r} in:\n{stdout[-3000:]}"
    return [c.strip() for c in rows[0].strip("|").split("|")][1:]


def _results(root: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(root.rglob("results.json"))]


@pytest.mark.parametrize("script,sweep", [
    ("reproduce_cmi_glue.sh", ["experiment=cmi_glue", "objective=ce,cmi_min"]),
    ("reproduce_mcmi_kd.sh", ["experiment=mcmi_kd", "objective.teacher_config.objective=ce,mcmi"]),
])
def test_full_mode_commands(script, sweep, tmp_path, cmiexp_env):
    proc = _run(script, ["--dry-run", "--out", str(tmp_path / "o")], dict(cmiexp_env, CMIEXP="cmiexp",
                                                                         CMIEXP_REPORT="cmiexp-report"))
    sweep_line, report_line = proc.stdout.strip().splitlines()
    words = sweep_line.replace("\\,", ",").split()
    assert words[:2] == ["cmiexp", "-m"] and f"task={GLUE8}" in words and "seed=1,2,3" in words
    assert all(w in words for w in sweep) and f"paths.output_dir={tmp_path / 'o'}" in words
    assert not any(w.startswith("model=") for w in words)  # the experiment's BERT-base / DistilBERT
    assert report_line.startswith("cmiexp-report ") and "--out" in report_line
    assert not (tmp_path / "o").exists()  # a dry run writes nothing


@pytest.mark.slow
def test_cmi_glue_smoke_ends_with_report(tmp_path, cmiexp_env):
    out = tmp_path / "smoke"
    proc = _run("reproduce_cmi_glue.sh", ["--smoke", "--out", str(out)], _env(cmiexp_env))
    report = proc.stdout[proc.stdout.index("== report:"):]
    assert "| Method | MRPC | RTE | Average |" in report
    for method in ("tiny-bert / ce", "tiny-bert / cmi_min"):
        cells = _table_row(report, method)
        assert len(cells) == 3 and all(re.fullmatch(r"\d+\.\d ± \d+\.\d \(n=2\)", c) for c in cells[:2]), cells
    assert "BERT-base (Sanh et al. 2019)" in report  # the reference rows
    runs = _results(out / "runs" / "cmi_glue")
    assert len(runs) == 8 and {r["status"] for r in runs} == {"completed"}
    assert {(r["task"], r["objective"], r["seed"]) for r in runs} == {
        (t, o, s) for t in ("glue/mrpc", "glue/rte") for o in ("ce", "cmi_min") for s in (1, 2)}
    for f in ("report.md", "report.csv", "report.tex"):
        assert (out / "reports" / "cmi_glue" / f).is_file()


@pytest.mark.slow
def test_mcmi_kd_smoke_trains_each_teacher_once(tmp_path, cmiexp_env):
    out = tmp_path / "smoke"
    env = _env(cmiexp_env)
    proc = _run("reproduce_mcmi_kd.sh", ["--smoke", "--out", str(out)], env)
    report = proc.stdout[proc.stdout.index("== report:"):]
    assert "| Method | MRPC | RTE | Average |" in report
    for method in ("tiny-bert / ce", "tiny-bert / mcmi"):  # the teachers, one run each
        assert all(c.endswith("(n=1)") for c in _table_row(report, method)[:2])
    for teacher in ("ce", "mcmi"):
        cells = _table_row(report, f"tiny-distilbert / kd (teacher: {teacher})")
        assert all(c.endswith("(n=2)") for c in cells[:2]), cells

    teachers = sorted(p.parent for p in (out / "teachers").rglob("results.json"))
    assert [t.relative_to(out / "teachers").parts[:4] for t in teachers] == [
        ("glue", task, "tiny-bert", obj) for task in ("mrpc", "rte") for obj in ("ce", "mcmi")]
    students = _results(out / "runs" / "mcmi_kd")
    assert len(students) == 8 and {r["status"] for r in students} == {"completed"}
    # Seed 1 trained each teacher and built its logit cache; seed 2 reused both.
    for r in students:
        s = r["objective_summary"]
        assert r["teacher_model"] == "tiny-bert" and r["teacher_objective"] in ("ce", "mcmi")
        assert Path(s["teacher"]["dir"]).parent.name == r["teacher_objective"]
        expected = ("trained", True) if r["seed"] == 1 else ("reused", False)
        assert (s["teacher"]["source"], s["cache_built"]) == expected

    stamps = {p: p.stat().st_mtime_ns for t in teachers for p in [t / "results.json", *t.rglob("*.safetensors")]}
    assert sum(1 for p in stamps if "kd_cache" in p.parts) == 4
    # The sweep again, with a new student seed on RTE: both RTE teachers are reused, nothing is retrained.
    proc = _run("reproduce_mcmi_kd.sh", ["--smoke", "--out", str(out), "--seeds", "3", "--tasks", "rte"], env)
    report = proc.stdout[proc.stdout.index("== report:"):]
    for teacher in ("ce", "mcmi"):
        cells = _table_row(report, f"tiny-distilbert / kd (teacher: {teacher})")
        assert cells[0].endswith("(n=2)") and cells[1].endswith("(n=3)"), cells
    assert sorted(p.parent for p in (out / "teachers").rglob("results.json")) == teachers
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    new = [r for r in _results(out / "runs" / "mcmi_kd") if r["seed"] == 3]
    assert len(new) == 2
    assert all(r["objective_summary"]["teacher"]["source"] == "reused" for r in new)
    assert all(r["objective_summary"]["cache_built"] is False for r in new)
