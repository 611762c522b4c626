"""KD teachers as out-of-process runs (issue 13) and named teachers (issue 17, item 4).

* no private Hydra/Accelerate state and no hand-written lock anywhere in the package;
* ``cmiexp.runs.provision``: a teacher is trained by a separate process, reused on the next call,
  and two concurrent students wait on its lock and train it once;
* the teacher's logit cache lives with the teacher under the teachers folder;
* a KD student's folder (``-from-<objective>-<hash8>``) and results.json (``teacher``) name it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from omegaconf import OmegaConf

from tests.conftest import GLUE_DIR, REPO, compose_config

FORBIDDEN = ("Singleton", "_shared_state", "GradientState", "fcntl")


def test_package_touches_no_private_hydra_or_accelerate_state_and_has_no_own_lock():
    found = [f"{p.relative_to(REPO)}:{i}: {word}"
             for p in sorted((REPO / "cmiexp").rglob("*.py"))
             for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
             for word in FORBIDDEN if word in line]
    assert found == []


def test_the_grep_would_see_them(tmp_path):
    # The words the check looks for are the ones the old in-process teacher training used.
    old = "running = Singleton._instances.pop(GlobalHydra)\nGradientState._shared_state.clear()\nimport fcntl\n"
    assert [w for w in FORBIDDEN if w in old] == list(FORBIDDEN)


# ---------------------------------------------------------------------------------------------
# Names: the student's folder suffix and the cache location (no training)
# ---------------------------------------------------------------------------------------------
def _student_overrides(out: Path, *extra: str) -> list[str]:
    return ["objective=kd", "model=tiny-distilbert", "task=glue/rte", f"task.data_dir={GLUE_DIR}",
            "task.max_train_samples=48", "task.max_eval_samples=16", "task.max_length=32", "trainer.epochs=1",
            "trainer.batch_size=16", "trainer.progress_bar=false", f"paths.output_dir={out}",
            "objective.teacher_config={model: tiny-bert, objective: ce, trainer: {max_steps: 2}}", *extra]


def _teacher_dir_of(overrides: list[str]) -> Path:
    from cmiexp.objectives.kd.teacher import compose_teacher_config, teacher_dir

    s = compose_config(overrides)
    return teacher_dir(compose_teacher_config(s, OmegaConf.to_container(s.objective.teacher_config)))


def test_student_run_dir_names_the_teacher_objective_and_hash(tmp_path):
    ov = _student_overrides(tmp_path)
    cfg = compose_config(ov, return_hydra_config=True)
    run_dir = Path(str(cfg.hydra.run.dir))
    teacher = _teacher_dir_of(ov)
    assert re.fullmatch(rf"seed0-[0-9a-f]{{8}}-from-ce-{teacher.name[:8]}", run_dir.name), run_dir.name
    assert run_dir.parent == tmp_path / "runs" / "default" / "glue" / "rte" / "tiny-distilbert" / "kd"
    # Another teacher objective, another suffix; a non-KD run keeps the plain seed<N>-<hash>.
    mcmi = [o.replace("objective: ce", "objective: mcmi") for o in ov]
    assert re.search(r"-from-mcmi-[0-9a-f]{8}$", str(compose_config(mcmi, return_hydra_config=True).hydra.run.dir))
    ce = compose_config([f"paths.output_dir={tmp_path}", "task=glue/rte", f"task.data_dir={GLUE_DIR}"],
                        return_hydra_config=True)
    assert re.fullmatch(r"seed0-[0-9a-f]{8}", Path(str(ce.hydra.run.dir)).name)


def test_cache_lives_with_the_teacher_under_the_teachers_folder(tmp_path):
    from cmiexp.objectives.kd.logit_cache import cache_path

    root = tmp_path / "teachers"
    task = SimpleNamespace(name="glue/rte")
    own = root / "glue" / "rte" / "tiny-bert" / "ce" / "0123456789ab"
    inside = SimpleNamespace(run_dir=own, checkpoint_dir=own / "checkpoint" / "best")
    assert cache_path(inside, task, "k", root) == own / "kd_cache" / "glue_rte-train-k.safetensors"
    # A teacher given as a path outside the teachers folder: its run folder is never written into.
    elsewhere = tmp_path / "runs" / "someone" / "seed0-abcdef12"
    outside = SimpleNamespace(run_dir=elsewhere, checkpoint_dir=elsewhere / "checkpoint" / "best")
    p = cache_path(outside, task, "k", root)
    assert p.parent.name == "kd_cache" and p.parents[2] == root / "external"
    assert json.loads((p.parents[1] / "teacher.json").read_text())["teacher"] == str(elsewhere.resolve())
    assert not elsewhere.exists()


# ---------------------------------------------------------------------------------------------
# The provisioning mechanism itself: subprocess, reuse, failure
# ---------------------------------------------------------------------------------------------
def _ce_config(out: Path, cache: Path, *extra: str):
    from cmiexp.objectives.kd.teacher import compose_teacher_config

    s = compose_config(_student_overrides(out, f"paths.cache_dir={cache}", *extra))
    return compose_teacher_config(s, OmegaConf.to_container(s.objective.teacher_config))


@pytest.mark.slow
def test_provision_trains_in_a_child_process_then_reuses(tmp_path, cache_dir, monkeypatch):
    from cmiexp.runs.provision import finished_run, provision, provisioned_dir

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = _ce_config(tmp_path, cache_dir)
    d = provisioned_dir(cfg)
    got = provision(cfg, ["model=tiny-bert", "objective=ce"], "KD teacher")
    assert (got.run_dir, got.source) == (d, "trained") and got.train_time_s > 0 and finished_run(d)
    # Trained by another process: the run lock's owner record names a pid that is not ours, and the
    # child wrote its own run records and log.
    owner = json.loads((d / ".lock.owner").read_text())
    assert owner["pid"] != os.getpid()
    assert (d / "run_config.json").is_file() and (d / "config.yaml").is_file() and (d / "cmiexp.log").is_file()
    res = json.loads((d / "results.json").read_text())
    assert res["status"] == "completed" and res["overrides"] == ["model=tiny-bert", "objective=ce"]
    assert res["global_step"] == 2 and res["run_dir"] == str(d.resolve())
    stamp = (d / "checkpoint" / "best" / "model.safetensors").stat().st_mtime_ns
    again = provision(cfg, ["model=tiny-bert", "objective=ce"], "KD teacher")
    assert (again.run_dir, again.source, again.train_time_s) == (d, "reused", None)
    assert (d / "checkpoint" / "best" / "model.safetensors").stat().st_mtime_ns == stamp


@pytest.mark.slow
def test_a_failing_teacher_is_one_error_naming_its_folder(tmp_path, cache_dir, monkeypatch):
    from cmiexp.errors import CmiexpError
    from cmiexp.runs.provision import provision, provisioned_dir

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = _ce_config(tmp_path, cache_dir)
    cfg.task.data_dir = str(tmp_path / "no-glue-here")  # the child cannot read its data
    d = provisioned_dir(cfg)
    with pytest.raises(CmiexpError, match=rf"training the KD teacher in {re.escape(str(d))} failed \(.*no-glue-here"):
        provision(cfg, ["objective=ce"], "KD teacher")
    assert json.loads((d / "results.json").read_text())["status"] == "failed"


# ---------------------------------------------------------------------------------------------
# Two concurrent KD students through the real CLI: they wait on the lock, the teacher trains once
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_two_concurrent_students_wait_on_the_lock_and_train_the_teacher_once(tmp_path, cmiexp_env, cache_dir):
    from cmiexp.runs.lock import waiting_lock

    out = tmp_path / "out"
    env = dict(cmiexp_env, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    teacher = _teacher_dir_of(_student_overrides(out))
    logs = [tmp_path / f"student{i}.log" for i in (0, 1)]
    procs = []
    # Hold the teacher's lock while both students start, so both are certain to find it taken.
    with waiting_lock(teacher.parent / f".{teacher.name}.lock", "test holds it"):
        for seed, log in enumerate(logs):
            with open(log, "w") as f:
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", "cmiexp", *_student_overrides(out, f"seed={seed}", f"paths.cache_dir={cache_dir}")],
                    env=env, cwd=REPO, stdout=f, stderr=subprocess.STDOUT))
        deadline = time.time() + 300
        while not all("waiting for" in log.read_text() for log in logs):
            assert time.time() < deadline and all(p.poll() is None for p in procs), [l.read_text()[-2000:] for l in logs]
            time.sleep(1)
        assert not (teacher / "results.json").exists()
    for p, log in zip(procs, logs):
        assert p.wait(timeout=600) == 0, log.read_text()[-3000:]
    results = sorted((json.loads(r.read_text()) for r in (out / "runs").rglob("results.json")), key=lambda r: r["seed"])
    assert [r["seed"] for r in results] == [0, 1]
    sources = sorted(r["objective_summary"]["teacher"]["source"] for r in results)
    assert sources == ["reused", "trained"]  # one student trained it, the other waited and reused it
    assert sorted(p.parent for p in (out / "teachers").rglob("results.json")) == [teacher]
    pids = {p.pid for p in procs} | {os.getpid()}
    assert json.loads((teacher / ".lock.owner").read_text())["pid"] not in pids  # its own process
    # The cache: one file, with the teacher, built by one of the two students.
    caches = sorted((out / "teachers").rglob("*.safetensors"))
    assert [c for c in caches if "kd_cache" in c.parts] == [Path(results[0]["objective_summary"]["cache_file"])]
    assert Path(results[0]["objective_summary"]["cache_file"]).parent == teacher / "kd_cache"
    assert results[0]["objective_summary"]["cache_file"] == results[1]["objective_summary"]["cache_file"]
    assert sorted(r["objective_summary"]["cache_built"] for r in results) == [False, True]
    # The student's folder and its results.json name the teacher.
    for r in results:
        assert r["teacher"] == {"objective": "ce", "hash": teacher.name[:8], "run_dir": str(teacher.resolve())}
        assert Path(r["run_dir"]).name.endswith(f"-from-ce-{teacher.name[:8]}"), r["run_dir"]


@pytest.mark.slow
def test_two_process_student_trains_its_teacher_once_and_matches_one_process(tmp_path, cmiexp_env, cache_dir):
    """torchrun (gloo, 2 ranks): both ranks ask for the missing teacher, one trains it (in its own
    process), the other waits on the lock; the logit cache rank 0 builds equals a one-process build,
    and the student matches a one-process student (same global batch)."""
    from safetensors.torch import load_file

    env = dict(cmiexp_env, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    teachers = tmp_path / "teachers"
    common = [o for o in _student_overrides(tmp_path) if not o.startswith(("paths.output_dir", "trainer.batch_size"))]
    common += [f"paths.teachers_dir={teachers}", f"paths.cache_dir={cache_dir}", "model.dropout=0.0", "seed=3"]
    multi = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                            "-m", "cmiexp", *common, f"paths.output_dir={tmp_path / 'multi'}", "trainer.batch_size=8"],
                           env=env, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert multi.returncode == 0, multi.stdout[-3000:] + multi.stderr[-3000:]
    (teacher,) = sorted(p.parent for p in teachers.rglob("results.json"))
    m = json.loads(next((tmp_path / "multi" / "runs").rglob("results.json")).read_text())
    # Whichever rank took the lock first trained it (rank 0 reports "trained", or "reused" when rank 1
    # did); either way it was trained once: one training's evaluations in its metrics.
    assert m["num_processes"] == 2 and m["objective_summary"]["teacher"]["source"] in ("trained", "reused")
    evals = [json.loads(line)["step"] for line in (teacher / "metrics.jsonl").read_text().splitlines()]
    assert evals == [2], evals
    assert m["teacher"]["hash"] == teacher.name[:8] and Path(m["run_dir"]).name.endswith(f"-from-ce-{teacher.name[:8]}")
    cache = Path(m["objective_summary"]["cache_file"])
    assert cache.parent == teacher / "kd_cache"
    built_by_two = load_file(str(cache))
    cache.unlink()  # the one-process student rebuilds it
    stamp = (teacher / "results.json").stat().st_mtime_ns
    single = subprocess.run([sys.executable, "-m", "cmiexp", *common, f"paths.output_dir={tmp_path / 'single'}",
                             "trainer.batch_size=16"], env=env, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert single.returncode == 0, single.stdout[-3000:] + single.stderr[-3000:]
    s = json.loads(next((tmp_path / "single" / "runs").rglob("results.json")).read_text())
    assert s["objective_summary"]["teacher"]["source"] == "reused" and s["objective_summary"]["cache_built"] is True
    assert (teacher / "results.json").stat().st_mtime_ns == stamp  # the teacher was not retrained
    built_by_one = load_file(str(cache))
    assert built_by_one["idx"].tolist() == built_by_two["idx"].tolist() and len(built_by_one["idx"]) == 48
    assert (built_by_one["logits"] - built_by_two["logits"]).abs().max().item() < 1e-6
    assert s["global_step"] == m["global_step"] == 3
    for k in ("loss", "accuracy"):
        assert m["final"]["metrics"][k] == pytest.approx(s["final"]["metrics"][k], abs=2e-4), k
