"""The shell reproduction scripts: full-mode commands (dry run) and both offline smoke modes end to end."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO

SCRIPTS = REPO / "scripts"
GLUE8 = "glue/cola,glue/sst2,glue/mrpc,glue/qqp,glue/mnli,glue/qnli,glue/rte,glue/wnli"


def _env(cmiexp_env: dict) -> dict:
    # The scripts call `cmiexp` / `cmiexp-report` as a user's shell finds them: cmiexp_env puts this
    # interpreter's warm shims first on PATH (tests/warm_cli.py), so the sweep, the report and the teachers
    # the sweep provisions in child processes all start without re-importing torch. One BLAS thread is
    # faster for tiny models on a shared CPU (and does not change what is tested).
    return dict(cmiexp_env, CMIEXP="cmiexp", CMIEXP_REPORT="cmiexp-report", OMP_NUM_THREADS="1")


def _run(script: str, args: list[str], env: dict, timeout: int = 900) -> subprocess.CompletedProcess:
    proc = subprocess.run(["bash", str(SCRIPTS / script), *args], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{script} {args} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def _table_row(stdout: str, method: str, prefix: bool = False) -> list[str]:
    """The cells of the Markdown results-table row whose first cell is ``method`` (or starts with it)."""
    rows = [line for line in stdout.splitlines() if line.startswith(f"| {method}" if prefix else f"| {method} |")]
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


@pytest.mark.parametrize("script,want", [
    ("reproduce_cmi_glue.sh", ["task=glue/sst2,glue/mrpc,glue/rte,glue/cola", "seed=1,2,3", "model=tiny-bert",
                               "task.max_train_samples=2000", "trainer.epochs=4", "trainer.eval_every=end"]),
    ("reproduce_mcmi_kd.sh", ["task=glue/sst2", "seed=1,2,3", "model=tiny-distilbert", "task.max_train_samples=3000",
                              "objective.teacher_config.model=tiny-bert", "objective.teacher_config.trainer.epochs=2"]),
])
def test_mini_mode_commands(script, want, tmp_path, cmiexp_env):
    """--mini: the README's offline mini reproductions (tiny models, ../shared data, 3 seeds, dev CMI table)."""
    proc = _run(script, ["--mini", "--dry-run", "--out", str(tmp_path / "o")],
                dict(cmiexp_env, CMIEXP="cmiexp", CMIEXP_REPORT="cmiexp-report"))
    sweep_line, *control_lines, report_line = proc.stdout.strip().splitlines()
    words = sweep_line.replace("\\,", ",").split()
    assert all(w in words for w in want), words
    assert any(w.startswith("task.data_dir=") and w.endswith("shared/data/glue") for w in words)
    assert report_line.endswith("--extra-metric cmi") and not (tmp_path / "o").exists()
    if script == "reproduce_mcmi_kd.sh":
        # the matched-budget control: a CE teacher trained as long as the MCMI teacher (2 CE + 1 MCMI epochs)
        (control,) = control_lines
        words = control.replace("\\,", ",").split()
        assert "objective.teacher_config.objective=ce" in words and "objective.teacher_config.trainer.epochs=3" in words
        assert "objective.teacher_config.trainer.epochs=2" not in words and "seed=1,2,3" in words
    else:
        assert control_lines == []


def test_cot_mini_mode_commands(tmp_path, cmiexp_env):
    """--mini of the CoT script: one sweep per task (they run side by side), DSS vs MI-CoT only, the cot_mi_mini
    recipe, then the test-split report."""
    proc = _run("reproduce_cot_mi.sh", ["--mini", "--dry-run", "--out", str(tmp_path / "o")],
                dict(cmiexp_env, CMIEXP="cmiexp", CMIEXP_REPORT="cmiexp-report"))
    *sweeps, report_line = proc.stdout.strip().splitlines()
    assert [next(w for w in s.split() if w.startswith("task=")) for s in sweeps] == ["task=cot/svamp", "task=cot/cqa"]
    for line in sweeps:
        words = line.replace("\\,", ",").split()
        assert {"experiment=cot_mi_mini", "model=tiny-t5", "objective=dss,cot_mi", "seed=0,1,2"} <= set(words), words
        assert any(w.startswith("task.data_dir=") and w.endswith("shared/data/cot") for w in words)
        assert not any(w.startswith(("trainer.", "task.max_")) for w in words)  # the recipe is the overlay's
    assert report_line.startswith("cmiexp-report ") and report_line.endswith("cot_mi_mini --split test")
    assert not (tmp_path / "o").exists()


ALL_SCRIPTS = ["reproduce_cmi_glue.sh", "reproduce_mcmi_kd.sh", "reproduce_cot_mi.sh", "reproduce_flownib_tables.sh"]
#: The task each script is given in the interface test, and the task= value its cmiexp calls must carry.
INTERFACE_TASK = {"reproduce_cmi_glue.sh": ("rte", "glue/rte"), "reproduce_mcmi_kd.sh": ("rte", "glue/rte"),
                  "reproduce_cot_mi.sh": ("svamp", "cot/svamp"), "reproduce_flownib_tables.sh": ("rte", "glue/rte")}


def _bash(script: str, args: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPTS / script), *args], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("script", ALL_SCRIPTS)
def test_every_script_takes_the_shared_interface(script, tmp_path, cmiexp_env):
    """--dry-run --smoke --seeds 0,1 --tasks X --out DIR -- OVERRIDE: every cmiexp command it prints
    carries the seeds, the task, the output folder and the override; nothing is run or written."""
    given, task = INTERFACE_TASK[script]
    out = tmp_path / "o"
    proc = _bash(script, ["--dry-run", "--smoke", "--seeds", "0,1", "--tasks", given, "--out", str(out),
                          "--", "trainer.max_steps=1"], dict(cmiexp_env, CMIEXP="cmiexp", CMIEXP_REPORT="cmiexp-report"))
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    lines = [line.replace("\\,", ",").split() for line in proc.stdout.splitlines() if not line.startswith("#")]
    runs = [w for w in lines if w[0] == "cmiexp"]
    reports = [w for w in lines if w[0] == "cmiexp-report"]
    assert runs and reports and len(runs) + len(reports) == len(lines), proc.stdout
    for words in runs:
        assert words[1] == "-m" and "seed=0,1" in words and f"task={task}" in words, words
        assert f"paths.output_dir={out}" in words and words[-1] == "trainer.max_steps=1", words
    for words in reports:
        assert words[1].startswith(str(out) + "/runs/"), words
    assert not out.exists()


def _shared_options(help_text: str) -> str:
    start = help_text.index("Options (the same for every reproduction script):")
    end = help_text.find("\nOptions of ", start)
    return help_text[start:end if end >= 0 else None].strip()


def test_help_prints_the_same_option_list_for_all_four(cmiexp_env):
    blocks = {}
    for script in ALL_SCRIPTS:
        proc = _bash(script, ["--help"], cmiexp_env)
        assert proc.returncode == 0 and proc.stderr == "", (script, proc.stderr)
        blocks[script] = _shared_options(proc.stdout)
    assert len(set(blocks.values())) == 1, blocks
    listed = next(iter(blocks.values()))
    for option in ("--smoke", "--seeds LIST", "--tasks LIST", "--out DIR", "--dry-run", "-h, --help", "-- OVERRIDES"):
        assert f"  {option}" in listed, option


@pytest.mark.parametrize("script", ALL_SCRIPTS)
@pytest.mark.parametrize("args,says", [(["--bogus"], "unknown option --bogus"), (["--seeds"], "--seeds needs a value"),
                                       (["--seeds", "0;1"], "--seeds 0;1: expected comma-separated integers"),
                                       (["trainer.lr=1"], "Hydra overrides go after '--'")])
def test_bad_option_is_one_line_and_a_non_zero_exit(script, args, says, tmp_path, cmiexp_env):
    proc = _bash(script, [*args, "--dry-run", "--out", str(tmp_path / "o")], cmiexp_env)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith(f"{script}: error: ") and says in proc.stderr, \
        proc.stderr


def test_cot_script_dropped_its_environment_interface(tmp_path, cmiexp_env):
    """SMOKE=1 no longer selects smoke mode (--smoke does): without --smoke the full grid needs COT_DATA_DIR."""
    env = {k: v for k, v in cmiexp_env.items() if k != "COT_DATA_DIR"}
    proc = _bash("reproduce_cot_mi.sh", ["--out", str(tmp_path / "o")], dict(env, SMOKE="1"))
    assert proc.returncode == 2 and "set COT_DATA_DIR" in proc.stderr and not (tmp_path / "o").exists()


@pytest.mark.slow
def test_cmi_glue_smoke_ends_with_report(tmp_path, cmiexp_env):
    out = tmp_path / "smoke"
    proc = _run("reproduce_cmi_glue.sh", ["--smoke", "--out", str(out)], _env(cmiexp_env))
    report = proc.stdout[proc.stdout.index("== report:"):]
    assert "| Method | SST-2 | RTE | Average |" in report
    for method in ("tiny-bert / ce", "tiny-bert / cmi_min"):
        cells = _table_row(report, method)
        # "(n=2)" alone: no cell holds a collapsed (one-class) run.
        assert len(cells) == 3 and all(re.fullmatch(r"\d+\.\d ± \d+\.\d \(n=2\)", c) for c in cells[:2]), cells
    assert "BERT-base (Sanh et al. 2019)" in report  # the reference rows
    runs = _results(out / "runs" / "cmi_glue")
    assert len(runs) == 8 and {r["status"] for r in runs} == {"completed"}
    assert {(r["task"], r["objective"], r["seed"]) for r in runs} == {
        (t, o, s) for t in ("glue/sst2", "glue/rte") for o in ("ce", "cmi_min") for s in (1, 2)}
    assert [r for r in runs if r["collapsed"] is not False] == []  # issue 14: every run learned something
    # ... so CE and min-CMI differ somewhere (the delta row is not all +0.0).
    delta = [line for line in report.splitlines() if line.startswith("| tiny-bert / cmi_min | tiny-bert / ce |")]
    assert delta and any(float(c) != 0.0 for c in [c.strip() for c in delta[0].strip("|").split("|")][2:4]), delta
    for f in ("report.md", "report.csv", "report.tex"):
        assert (out / "reports" / "cmi_glue" / f).is_file()


@pytest.mark.slow
def test_mcmi_kd_smoke_trains_each_teacher_once(tmp_path, cmiexp_env):
    out = tmp_path / "smoke"
    env = _env(cmiexp_env)
    proc = _run("reproduce_mcmi_kd.sh", ["--smoke", "--out", str(out)], env)
    report = proc.stdout[proc.stdout.index("== report:"):]
    assert "| Method | MRPC | RTE | Average |" in report
    # The smoke checks the plumbing at toy size (64 rows, one epoch): its models may predict one class,
    # which the report marks ("1 collapsed"); scripts/reproduce_cmi_glue.sh --smoke is the one sized to learn.
    for method in ("tiny-bert / ce", "tiny-bert / mcmi"):  # the teachers, one run each
        cells = _table_row(report, method)
        assert all(re.search(r"\(n=1(, 1 collapsed)?\)$", c) for c in cells[:2]), cells
    for teacher in ("ce", "mcmi"):
        # The row names its teacher: objective and the 8-hex hash of each task's teacher.
        cells = _table_row(report, f"tiny-distilbert / kd (teacher: {teacher} ", prefix=True)
        assert all(re.search(r"\(n=2(, [12] collapsed)?\)$", c) for c in cells[:2]), cells

    teachers = sorted(p.parent for p in (out / "teachers").rglob("results.json"))
    assert [t.relative_to(out / "teachers").parts[:4] for t in teachers] == [
        ("glue", task, "tiny-bert", obj) for task in ("mrpc", "rte") for obj in ("ce", "mcmi")]
    # The chain CE teacher -> MCMI teacher: each MCMI teacher fine-tuned (1 epoch) the CE teacher of its task.
    for ce_t, mcmi_t in zip(teachers[0::2], teachers[1::2]):
        mres = json.loads((mcmi_t / "results.json").read_text())
        assert mres["init_from"] == str(ce_t.resolve()) and mres["epochs"] == 1
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
        cells = _table_row(report, f"tiny-distilbert / kd (teacher: {teacher} ", prefix=True)
        assert re.search(r"\(n=2(, [12] collapsed)?\)$", cells[0]), cells
        assert re.search(r"\(n=3(, [123] collapsed)?\)$", cells[1]), cells
    assert sorted(p.parent for p in (out / "teachers").rglob("results.json")) == teachers
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    new = [r for r in _results(out / "runs" / "mcmi_kd") if r["seed"] == 3]
    assert len(new) == 2
    assert all(r["objective_summary"]["teacher"]["source"] == "reused" for r in new)
    assert all(r["objective_summary"]["cache_built"] is False for r in new)
