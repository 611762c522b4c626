"""Preemption, crash safety, failure isolation, bad input and secrets (real `cmiexp` commands)."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import GLUE_DIR, REPO, find_run_dirs, run_cli

SYNTH = ["task.num_train=96", "task.num_eval=48", "trainer.epochs=1", "trainer.progress_bar=false"]


def _results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


def _error_line(proc) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("cmiexp: error:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    return lines[0]


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------- preemption and crashes
@pytest.mark.slow
def test_sigterm_mid_epoch_then_resume_matches_uninterrupted(cmiexp_env, output_dir, tmp_path):
    args = ["task=glue/rte", f"task.data_dir={GLUE_DIR}", "task.max_train_samples=768", "task.max_eval_samples=64",
            "task.max_length=96", "trainer.epochs=2", "trainer.save_every=2", "trainer.progress_bar=false"]
    proc = subprocess.Popen([sys.executable, "-m", "cmiexp", *args], env=cmiexp_env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    state_file = None
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        found = list(output_dir.rglob("checkpoint/latest/trainer_state.json"))
        if found:
            state_file = found[0]
            break
        time.sleep(0.05)
    assert state_file is not None, "no periodic checkpoint appeared"
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, (proc.returncode, err[-2000:])
    assert "checkpoint saved" in err
    run_dir = state_file.parents[2]
    stopped = json.loads(state_file.read_text())
    assert 0 < stopped["global_step"] < 48 and _results(run_dir)["status"] == "interrupted"

    resumed = run_cli(args, cmiexp_env)
    assert f"at step {stopped['global_step']}" in resumed.stdout
    res = _results(run_dir)
    assert res["status"] == "completed" and res["global_step"] == 48

    env2 = dict(cmiexp_env, CMIEXP_OUTPUT_DIR=str(tmp_path / "fresh"))
    run_cli(args, env2)
    (fresh_dir,) = find_run_dirs(tmp_path / "fresh")
    fresh = _results(fresh_dir)
    for k in ("accuracy", "loss", "cmi"):
        assert res["final"]["metrics"][k] == pytest.approx(fresh["final"]["metrics"][k], abs=1e-5), k


def test_kill_during_checkpoint_save_keeps_previous_checkpoint(cmiexp_env, output_dir, monkeypatch):
    """A process dying halfway through a save must leave the previous checkpoint loadable."""
    args = ["task=glue/rte", f"task.data_dir={GLUE_DIR}", "task.max_train_samples=128", "task.max_eval_samples=32",
            "task.max_length=64", "trainer.epochs=1", "trainer.save_every=2", "trainer.progress_bar=false"]
    run_cli([*args, "trainer.stop_after_steps=2"], cmiexp_env)
    (run_dir,) = find_run_dirs(output_dir)
    latest = run_dir / "checkpoint" / "latest"
    before = _tree_digest(latest)

    # Simulate the kill: Accelerate writes part of the new state, then the process "dies".
    from cmiexp.train import checkpoint as ckpt

    class DyingAccelerator:
        is_main_process = True

        def wait_for_everyone(self):
            pass

        def save_state(self, path, safe_serialization=True):
            Path(path).mkdir(parents=True, exist_ok=True)
            (Path(path) / "model.safetensors").write_bytes(b"half a file")
            raise KeyboardInterrupt("SIGKILL stand-in")

    with pytest.raises(KeyboardInterrupt):
        ckpt.save_training_state(DyingAccelerator(), run_dir, ckpt.TrainerState(global_step=99), objective=None)
    assert _tree_digest(latest) == before, "the previous checkpoint was modified"
    assert json.loads((latest / "trainer_state.json").read_text())["global_step"] == 2

    # The same command resumes from step 2 despite the leftover partial folder, and finishes.
    proc = run_cli(args, cmiexp_env)
    assert "at step 2" in proc.stdout
    assert _results(run_dir)["status"] == "completed" and _results(run_dir)["global_step"] == 4


# ---------------------------------------------------------------- failure isolation
def test_sweep_with_failing_job_continues_and_report_marks_it(cmiexp_env, output_dir):
    proc = run_cli(["-m", *SYNTH, "trainer.scheduler=linear,triangle,cosine"], cmiexp_env, check=False)
    assert proc.returncode == 1
    assert "1 job(s) failed" in proc.stderr and "triangle" in proc.stderr
    statuses = sorted(_results(d)["status"] for d in find_run_dirs(output_dir))
    assert statuses == ["completed", "completed", "failed"]
    failed = [d for d in find_run_dirs(output_dir) if _results(d)["status"] == "failed"][0]
    assert "trainer.scheduler" in _results(failed)["error"] and (failed / "error.txt").exists()
    report = subprocess.run([sys.executable, "-m", "cmiexp.report", str(output_dir), "--no-reference"],
                            capture_output=True, text=True, cwd=REPO, env=cmiexp_env)
    assert report.returncode == 0, report.stderr
    assert "failed" in report.stdout and "trainer.scheduler" in report.stdout


def test_nan_loss_stops_run_naming_the_step(cmiexp_env, output_dir):
    proc = run_cli([*SYNTH, "trainer.lr=1e30"], cmiexp_env, check=False)
    assert proc.returncode == 1
    line = _error_line(proc)
    assert "loss is nan" in line and "at step" in line
    (run_dir,) = find_run_dirs(output_dir)
    assert _results(run_dir)["status"] == "failed" and "at step" in _results(run_dir)["error"]


# ---------------------------------------------------------------- bad input
def _small_rte(tmp_path: Path, mutate) -> Path:
    """A local GLUE folder holding the first rows of the real RTE files, with one change."""
    src = GLUE_DIR / "RTE"
    dst = tmp_path / "glue" / "RTE"
    dst.mkdir(parents=True)
    for split in ("train", "dev"):
        lines = (src / f"{split}.tsv").read_text(encoding="utf-8").splitlines()[:41]
        (dst / f"{split}.tsv").write_text("\n".join(mutate(split, lines)) + "\n", encoding="utf-8")
    return dst.parent


@pytest.mark.parametrize("case,mutate,expect", [
    ("bad_columns", lambda s, ls: ls[:5] + ["7\tonly two columns"] + ls[6:] if s == "train" else ls,
     ["train.tsv", "line"]),
    ("bad_label", lambda s, ls: ls[:3] + ["\t".join(ls[3].split("\t")[:-1] + ["maybe"])] + ls[4:] if s == "train" else ls,
     ["train.tsv", "maybe"]),
    ("empty_split", lambda s, ls: ls[:1] if s == "dev" else ls, ["dev.tsv"]),
])
def test_bad_glue_files_give_one_line_errors(cmiexp_env, tmp_path, case, mutate, expect):
    data_dir = _small_rte(tmp_path, mutate)
    proc = run_cli(["task=glue/rte", f"task.data_dir={data_dir}", "trainer.epochs=1"], cmiexp_env, check=False)
    assert proc.returncode == 1
    line = _error_line(proc)
    for word in expect:
        assert word in line, (case, line)


def test_checkpoint_of_another_task_or_model_is_refused_untouched(cmiexp_env, output_dir, tmp_path):
    run_dir = tmp_path / "shared_run_dir"
    base = [f"hydra.run.dir={run_dir}", f"task.data_dir={GLUE_DIR}", "task.max_train_samples=64",
            "task.max_eval_samples=32", "task.max_length=64", "trainer.save_every=1", "trainer.progress_bar=false"]
    run_cli(["task=glue/rte", *base, "trainer.stop_after_steps=1"], cmiexp_env)
    before = _tree_digest(run_dir)
    proc = run_cli(["task=glue/wnli", *base], cmiexp_env, check=False)
    assert proc.returncode == 1
    assert "resume refused" in _error_line(proc) and "task.name: glue/rte -> glue/wnli" in _error_line(proc)
    proc = run_cli(["task=glue/rte", "model=tiny-roberta", *base], cmiexp_env, check=False)
    assert proc.returncode == 1 and "model.name: tiny-bert -> tiny-roberta" in _error_line(proc)
    # A refusal changes nothing: not results.json, not the checkpoint, not .hydra/ nor the log.
    assert _tree_digest(run_dir) == before


def test_unknown_config_key_is_refused(cmiexp_env):
    proc = run_cli(["trainer.lrr=1e-3"], cmiexp_env, check=False)
    assert proc.returncode == 1
    assert "trainer.lrr" in proc.stderr and "Traceback" not in proc.stderr


def test_unwritable_output_dir_is_refused(cmiexp_env, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    env = dict(cmiexp_env, CMIEXP_OUTPUT_DIR=str(blocker / "outputs"))
    proc = run_cli(SYNTH, env, check=False)
    assert proc.returncode == 1
    assert str(blocker) in proc.stderr and "Traceback" not in proc.stderr
    assert blocker.read_text() == "not a folder"


# ---------------------------------------------------------------- secrets
def test_wandb_key_never_written(cmiexp_env, output_dir):
    secret = "sekrit0123456789abcdef0123456789abcdef01"
    env = dict(cmiexp_env, WANDB_API_KEY=secret, WANDB_MODE="offline")
    run_cli(["logger=wandb", "logger.mode=offline", *SYNTH], env)
    (run_dir,) = find_run_dirs(output_dir)
    for p in run_dir.rglob("*"):
        if p.is_file() and p.stat().st_size < 50_000_000:
            assert secret.encode() not in p.read_bytes(), f"secret leaked into {p}"
