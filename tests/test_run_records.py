"""Run records you can trust: identity from the resolved config, one process per run directory,
resume refusal, a failure record for every failure, checkpoint integrity, sweeps over tasks, file
modes and retention. Everything runs the real ``cmiexp`` command, as a user types it."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tests.conftest import GLUE_DIR, REPO, command_env, compose_config, find_run_dirs, run_cli

# All of this module's tests on one xdist worker (pyproject: --dist loadgroup): its module-scoped
# fixtures (trained runs) are built once, not once on each worker that draws one of its tests.
pytestmark = pytest.mark.xdist_group("run_records")

SYNTH = ["task.num_train=96", "task.num_eval=48", "trainer.epochs=1", "trainer.progress_bar=false"]


def _digest(root: Path, skip: tuple[str, ...] = ()) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name not in skip}


def _error_line(proc) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("cmiexp: error:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return lines[0]


def _results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


@pytest.fixture(scope="module")
def env(cache_dir, tmp_path_factory) -> dict:
    return command_env(cache_dir, tmp_path_factory.mktemp("records-out"))


@pytest.fixture(scope="module")
def stopped(env, tmp_path_factory) -> Path:
    """A run stopped after 1 of its 3 steps (as if preempted): checkpoint/latest at step 1."""
    run_dir = tmp_path_factory.mktemp("stopped") / "run"
    run_cli([f"hydra.run.dir={run_dir}", *SYNTH, "trainer.stop_after_steps=1"], env)
    assert _results(run_dir)["status"] == "interrupted"
    return run_dir


def _copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ---------------------------------------------------------------- 1. identity
def _run_dir_of(overrides: list[str]) -> str:
    cfg = compose_config(overrides, return_hydra_config=True)
    return str(OmegaConf.select(cfg, "hydra.run.dir"))


def test_spellings_of_one_training_share_a_directory_and_other_trainings_do_not(env, tmp_path, monkeypatch):
    monkeypatch.setenv("CMIEXP_OUTPUT_DIR", env["CMIEXP_OUTPUT_DIR"])
    monkeypatch.chdir(REPO)
    rel = os.path.relpath(GLUE_DIR, REPO)
    assert not rel.startswith("/")
    base = ["task=glue/rte", "seed=1"]
    plain = _run_dir_of([*base, f"task.data_dir={GLUE_DIR}", "trainer.lr=1e-3"])
    assert _run_dir_of([*base, f"task.data_dir={rel}", "trainer.lr=0.001"]) == plain
    # A no-op overlay: an experiment file that sets only what the defaults already are.
    (tmp_path / "experiment").mkdir()
    (tmp_path / "experiment" / "noop.yaml").write_text(
        "# @package _global_\nexperiment_name: default\ntrainer:\n  lr: 1.0e-3\n  epochs: 3\n")
    overlay = [f"hydra.searchpath=[file://{tmp_path}]", "experiment=noop"]
    assert _run_dir_of([*base, f"task.data_dir={GLUE_DIR}", *overlay]) == plain
    # Keys that do not change training do not change the directory either.
    assert _run_dir_of([*base, f"task.data_dir={GLUE_DIR}", "trainer.progress_bar=false", "logger=wandb",
                        "trainer.stop_after_steps=2", "trainer.resume=true"]) == plain
    assert plain.split("/runs/")[1].startswith("default/glue/rte/tiny-bert/ce/seed1-")
    # An overlay that changes the training gets its own directory, even under the same experiment_name.
    other = _run_dir_of([*base, f"task.data_dir={GLUE_DIR}", "experiment=cmi_glue", "experiment_name=default",
                         "model=tiny-bert"])
    assert other != plain and other.rsplit("-", 1)[0] == plain.rsplit("-", 1)[0]
    assert _run_dir_of([*base, f"task.data_dir={GLUE_DIR}", "experiment=cmi_glue", "experiment_name=default"]) != plain
    assert _run_dir_of([*base, f"task.data_dir={GLUE_DIR}", "trainer.lr=2e-3"]) != plain
    # The command computes the same directory as the composed config.
    out = run_cli([*base, f"task.data_dir={rel}", "trainer.lr=0.001", "--cfg", "all", "--resolve",
                   "-p", "hydra.run.dir"], env).stdout.strip().splitlines()[-1]
    assert out == plain


# ---------------------------------------------------------------- 2, 3. lock and resume
def test_resume_with_another_config_is_refused_and_changes_nothing(env, stopped):
    before = _digest(stopped)
    assert (stopped / ".hydra" / "config.yaml").is_file() and (stopped / "cmiexp.log").is_file()
    proc = run_cli([f"hydra.run.dir={stopped}", *SYNTH, "trainer.batch_size=8", "trainer.lr=5e-2"], env, check=False)
    assert proc.returncode == 1
    line = _error_line(proc)
    assert "resume refused" in line and "trainer.batch_size: 32 -> 8" in line and "trainer.lr: 0.001 -> 0.05" in line
    proc = run_cli([f"hydra.run.dir={stopped}", *SYNTH, "objective=cmi_min"], env, check=False)
    assert proc.returncode == 1 and "objective.name: ce -> cmi_min" in _error_line(proc)
    assert _digest(stopped) == before  # .hydra/, cmiexp.log, results.json, checkpoint: byte-identical


def test_held_directory_is_refused_stale_lock_does_not_block_and_swap_crash_recovers(env, stopped, tmp_path):
    run_dir = _copy_run(stopped, tmp_path / "run")
    args = [f"hydra.run.dir={run_dir}", *SYNTH]
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom cmiexp.runs import RunLock\n"
         "lock = RunLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(300)", str(run_dir)],
        env=env, cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = _digest(run_dir)
        proc = run_cli(args, env, check=False)
    finally:
        holder.kill()  # SIGKILL: the lock it held is now stale
        holder.wait()
    assert proc.returncode == 1
    line = _error_line(proc)
    assert f"pid {holder.pid}" in line and f"host {socket.gethostname()}" in line and str(run_dir) in line
    assert _digest(run_dir) == before

    # A crash between the two renames of a checkpoint swap: latest moved aside, the new one not in place.
    latest = run_dir / "checkpoint" / "latest"
    os.replace(latest, latest.with_name("latest.old"))
    old_umask = os.umask(0o027)
    try:
        proc = run_cli(args, env)  # not blocked by the killed holder's lock
    finally:
        os.umask(old_umask)
    assert "resuming from the checkpoint of step 1 (was checkpoint/latest.old)" in proc.stdout + proc.stderr
    res = _results(run_dir)
    assert res["status"] == "completed" and res["global_step"] == 3
    # Files follow the umask (0640 here), not the temporary files' 0600.
    for rel in ("results.json", "run_config.json", "checkpoint/best/model.safetensors",
                "checkpoint/latest/model.safetensors"):
        assert (run_dir / rel).stat().st_mode & 0o777 == 0o640, rel
    # trainer.checkpoint_retention=weights (default): no optimizer state is kept once the run completes.
    assert (latest / "model.safetensors").is_file() and not (latest / "optimizer.bin").exists()
    assert not latest.with_name("latest.old").exists()


def test_unreadable_random_state_is_an_error(env, stopped, tmp_path):
    run_dir = _copy_run(stopped, tmp_path / "run")
    rng = run_dir / "checkpoint" / "latest" / "random_states_0.pkl"
    rng.write_bytes(b"not a pickle")
    record = ("results.json", "error.txt", "cmiexp.log", ".lock.owner")  # what a failure may write
    before = _digest(run_dir, skip=record)
    proc = run_cli([f"hydra.run.dir={run_dir}", *SYNTH], env, check=False)
    assert proc.returncode == 1
    line = _error_line(proc)
    assert "random states" in line and "random_states_0.pkl" in line
    res = _results(run_dir)
    assert res["status"] == "failed" and "random_states_0.pkl" in res["error"]
    assert "Traceback" in (run_dir / "error.txt").read_text()
    assert _digest(run_dir, skip=record) == before  # checkpoint, configs and .hydra/ untouched


def test_checkpoint_swap_recovery_at_every_crash_point(tmp_path):
    from cmiexp.train.checkpoint import recover_latest

    def ckpt(path: Path, step: int | None):
        path.mkdir(parents=True)
        (path / "model.safetensors").write_text(f"weights {step}")
        if step is not None:  # trainer_state.json is written last: it marks a complete checkpoint
            (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))

    cases = {  # name: (latest, .latest.tmp, latest.old) steps; "-" = absent; None = incomplete
        "normal": (4, "-", "-"), "save interrupted": (4, None, "-"),
        "between renames": ("-", 6, 4), "after first rename, tmp incomplete": ("-", None, 4),
        "after second rename": (6, "-", 4),
    }
    for name, (latest, tmp, old) in cases.items():
        run_dir = tmp_path / name.replace(" ", "_").replace(",", "")
        c = run_dir / "checkpoint"
        for folder, step in (("latest", latest), (".latest.tmp", tmp), ("latest.old", old)):
            if step != "-":
                ckpt(c / folder, step)
        msg = recover_latest(run_dir)
        newest = max(s for s in (latest, tmp, old) if isinstance(s, int))
        assert json.loads((c / "latest" / "trainer_state.json").read_text())["global_step"] == newest, name
        assert not (c / "latest.old").exists(), name
        if name == "normal":
            assert msg is None
        if name == "between renames":
            assert f"step {newest}" in msg and ".latest.tmp" in msg


# ---------------------------------------------------------------- 4. failure records
def _bad_glue(tmp_path: Path) -> Path:
    root = tmp_path / "glue"
    (root / "RTE").mkdir(parents=True)
    for f in ("train.tsv", "dev.tsv"):
        shutil.copy(GLUE_DIR / "RTE" / f, root / "RTE" / f)
    lines = (root / "RTE" / "train.tsv").read_bytes().split(b"\n")
    lines[5] = lines[5][:10] + b"\xff" + lines[5][10:]
    (root / "RTE" / "train.tsv").write_bytes(b"\n".join(lines))
    return root


def _pickle_teacher(tmp_path: Path) -> Path:
    d = tmp_path / "teacher"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "bert", "num_labels": 3}))
    (d / "pytorch_model.bin").write_bytes(b"a pickle cmiexp must not load")
    return d


@pytest.mark.parametrize("case", ["config", "data", "bug", "teacher"])
def test_every_failure_leaves_a_record(env, tmp_path, case):
    out = tmp_path / "out"
    e = dict(env, CMIEXP_OUTPUT_DIR=str(out))
    if case == "config":
        args = [*SYNTH, "trainer.lr=abc"]
    elif case == "data":
        args = ["task=glue/rte", f"task.data_dir={_bad_glue(tmp_path)}", "task.max_length=32",
                "trainer.progress_bar=false"]
    elif case == "bug":  # not one of cmiexp's own errors: transformers refuses heads that do not divide the width
        args = [*SYNTH, "model.tiny.num_heads=3"]
    else:  # a teacher folder holding only a pickle: refused, not loaded (nor silently random)
        args = [*SYNTH, "objective=kd", f"objective.teacher={_pickle_teacher(tmp_path)}"]
    proc = run_cli(args, e, check=False)
    assert proc.returncode == 1
    line = _error_line(proc)
    expect = {"config": "trainer.lr='abc' must be a finite number",
              "data": "train.tsv line 6: byte 0xff at column 11 is not valid UTF-8",
              "bug": "ValueError: The hidden size (128) is not a multiple of the number of attention heads (3) (at",
              "teacher": "holds only pickle weights (pytorch_model.bin); cmiexp loads safetensors weights only"}[case]
    assert expect in line
    (run_dir,) = find_run_dirs(out)
    res = _results(run_dir)
    assert res["status"] == "failed" and expect in res["error"]
    assert "Traceback (most recent call last)" in (run_dir / "error.txt").read_text()
    if case == "bug":
        assert "error.txt" in line and "hydra.verbose=true" in line
        verbose = run_cli([*args, "hydra.verbose=true"], e, check=False)
        assert verbose.returncode == 1 and "Traceback (most recent call last)" in verbose.stderr


# ---------------------------------------------------------------- 6. sweeps over tasks
def test_sweep_over_tasks_takes_task_keys_and_keeps_its_multirun_yaml(env, tmp_path):
    out = tmp_path / "out"
    e = dict(env, CMIEXP_OUTPUT_DIR=str(out))
    args = ["-m", "task=glue/rte,glue/wnli", f"task.data_dir={GLUE_DIR}", "task.max_train_samples=32",
            "task.max_eval_samples=16", "task.max_length=32", "trainer.max_steps=1", "seed=1,2",
            "trainer.progress_bar=false"]
    run_cli(args, e)
    runs = find_run_dirs(out)
    assert len(runs) == 4
    index = [json.loads(x) for x in (out / "runs" / "index.jsonl").read_text().splitlines()]
    assert len(index) == 4
    for d in runs:
        res = _results(d)
        assert res["status"] == "completed" and res["num_train_samples"] == 32
        assert d.name == f"seed{res['seed']}-{res['config_hash']}"
        assert json.loads((d / "run_config.json").read_text())["hash"] == res["config_hash"]
        (entry,) = [r for r in index if r["hash"] == res["config_hash"]]
        assert (out / "runs" / entry["run_dir"]) == d and f"seed={res['seed']}" in entry["overrides"]
    # The same sweep again: every job is already complete; the sweep keeps its own multirun.yaml.
    again = run_cli(args, e)
    assert again.stdout.count("already completed") == 4
    assert len((out / "runs" / "index.jsonl").read_text().splitlines()) == 4  # no duplicate entries
    sweeps = sorted((out / "runs" / "sweeps").glob("*/multirun.yaml"))
    assert len(sweeps) == 2 and all("glue/rte,glue/wnli" in p.read_text() for p in sweeps)


# ---------------------------------------------------------------- 4. up-front checks, 8. retention
@pytest.mark.parametrize("override, message", [
    ("trainer.lr=abc", "trainer.lr='abc' must be a finite number"),
    ("trainer.lr=0", "trainer.lr=0 must be > 0"),
    ("trainer.batch_size=2.5", "trainer.batch_size=2.5 must be an integer"),
    ("trainer.epochs=0", "trainer.epochs=0 must be >= 1"),
    ("trainer.save_best=maybe", "trainer.save_best='maybe' must be true or false"),
    ("trainer.adam_betas=[0.9,1.5]", "trainer.adam_betas[1]=1.5 must be in [0, 1)"),
    ("trainer.checkpoint_retention=some", "trainer.checkpoint_retention='some'; valid choices: full, weights, none"),
    ("trainer.collapse_share=0", "trainer.collapse_share=0 must be in (0, 1]"),
    # task.* and peft.* numbers (cmiexp.checks), with the same rule and message format
    ("task.max_length=0", "task.max_length=0 must be >= 1"),
    ("task.max_train_samples=-5", "task.max_train_samples=-5 must be >= 1, or null (all rows)"),
    ("task.max_eval_samples=2.5", "task.max_eval_samples=2.5 must be an integer, or null (all rows)"),
    ("task.label_noise=1.5", "task.label_noise=1.5 must be in [0, 1]"),
    ("task.num_classes=1", "task.num_classes=1 must be >= 2"),
    (["task=glue/rte", "task.subsample_seed=-1"], "task.subsample_seed=-1 must be >= 0"),
    (["task=cot/svamp", "task.valid_fraction=1.0"], "task.valid_fraction=1.0 must be in (0, 1)"),
    (["task=cls/boolq", "task.validation_fraction=0"],
     "task.validation_fraction=0 must be in (0, 1), or null (carve no validation split)"),
    (["task=cot/svamp", "task.max_target_length=0"], "task.max_target_length=0 must be >= 1"),
    (["peft=lora", "peft.alpha=abc"], "peft.alpha='abc' must be a finite number"),
    (["peft=lora", "peft.dropout=1.0"], "peft.dropout=1.0 must be in [0, 1)"),
    (["peft=rocoft", "peft.rank=0"], "peft.rank=0 must be >= 1"),
    (["peft=rocoft", "peft.train_bias=nope"], "peft.train_bias='nope' must be true or false"),
    ("model.trust_remote_code='false'", "model.trust_remote_code='false' must be true or false"),  # not True
    (["task=cls/boolq", "task.with_passage=1"], "task.with_passage=1 must be true or false"),
    ("model.dropout=1.0", "model.dropout=1.0 must be in [0, 1), or null (keep the architecture's)"),
    # the offline tiny models' own spec (model.tiny.*)
    ("model.tiny.init_seed=abc", "model.tiny.init_seed='abc' must be an integer"),
    ("model.tiny.num_layers=0", "model.tiny.num_layers=0 must be >= 1"),
    ("model.lr=-1e-3", "trainer.lr=-0.001 must be > 0"),  # trainer.lr is ${model.lr}: named where it is used
    (["head=masking", "head.hidden_size=0"], "head.hidden_size=0 must be >= 1, or null (the backbone's hidden size)"),
    (["head=generation", "head.dropout=abc"], "head.dropout='abc' must be a finite number"),
])
def test_config_types_and_ranges_are_checked_up_front(override, message):
    from cmiexp.errors import ConfigError
    from cmiexp.train.settings import check_config

    check_config(compose_config([]))  # the defaults pass
    with pytest.raises(ConfigError) as e:
        check_config(compose_config([override] if isinstance(override, str) else override))
    assert str(e.value) == message


@pytest.mark.parametrize("group", ["task", "model", "head", "peft", "trainer"])
def test_every_shipped_config_of_a_group_passes_its_checks(group):
    """The shipped YAML defaults fit the ranges the checks enforce (a range that refuses a shipped
    default would break every run of that config)."""
    from cmiexp.config import CONF_DIR
    from cmiexp.train.settings import check_config

    names = sorted(p.relative_to(CONF_DIR / group).with_suffix("").as_posix() for p in (CONF_DIR / group).rglob("*.yaml"))
    assert names
    for name in names:
        check_config(compose_config([f"{group}={name}"]))


def test_checkpoint_retention_options(tmp_path):
    from cmiexp.train.checkpoint import apply_retention

    def latest(name):
        d = tmp_path / name / "checkpoint" / "latest"
        d.mkdir(parents=True)
        for f in ("model.safetensors", "optimizer.bin", "scheduler.bin", "random_states_0.pkl",
                  "trainer_state.json", "objective_state.safetensors", "run_config.json"):
            (d / f).write_text(f)
        return d

    for retention in ("full", "weights", "none"):
        d = latest(retention)
        apply_retention(d.parents[1], retention)
        kept = sorted(p.name for p in d.iterdir()) if d.exists() else None
        if retention == "full":
            assert "optimizer.bin" in kept and "random_states_0.pkl" in kept
        elif retention == "weights":
            assert kept == ["model.safetensors", "objective_state.safetensors", "retention.json", "run_config.json",
                            "trainer_state.json"]
        else:
            assert kept is None


def test_failure_record_never_leaves_running_even_on_a_full_disk(tmp_path, monkeypatch):
    import errno

    from cmiexp.runs import read_results, record_failure, results, write_results

    ident = {"task": "synthetic", "seed": 0}
    done = tmp_path / "done"
    write_results(done, {"status": "completed", "best": {"x": 1}})
    record_failure(done, ident, "later failure", "tb", owns_results=False)
    assert read_results(done)["status"] == "completed"  # an earlier invocation's result is kept
    assert (done / "error.txt").read_text().startswith("later failure")

    stale = tmp_path / "stale"  # left 'running' by a killed process: ours now (we hold the lock)
    write_results(stale, {"status": "running"})
    record_failure(stale, ident, "boom", None, owns_results=False)
    assert read_results(stale)["status"] == "failed" and read_results(stale)["error"] == "boom"

    full = tmp_path / "full"
    write_results(full, {"status": "running"})

    def no_space(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(results, "atomic_write_json", no_space)
    monkeypatch.setattr(results, "atomic_write_text", no_space)
    record_failure(full, ident, "OSError: [Errno 28] No space left on device", None, owns_results=True)
    res = read_results(full)
    assert res["status"] == "failed" and "No space left" in res["error"]


def test_resume_check_covers_the_process_count(tmp_path, monkeypatch):
    """The process count comes from the launcher, not the config, yet it changes the global batch."""
    from cmiexp.errors import RunRefused
    from cmiexp.runs import check_resume_compatible, run_config_record, write_run_config

    cfg = compose_config([])
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    write_run_config(tmp_path, run_config_record(cfg))
    check_resume_compatible(tmp_path, run_config_record(cfg))  # same config, same process count
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RunRefused, match=r"num_processes \(launcher\): 1 -> 2"):
        check_resume_compatible(tmp_path, run_config_record(cfg))


def test_number_check_types_bounds_and_null():
    from cmiexp.checks import Number, check_number
    from cmiexp.errors import ConfigError

    pos, frac = Number("int", 1), Number("float", 0, False, 1, True, nullable=True, null_means="off")
    assert check_number("k", 3, pos) == 3
    whole = check_number("k", 2.0, pos)  # a whole float is an integer, and comes back as one
    assert whole == 2 and type(whole) is int
    assert check_number("f", None, frac) is None and check_number("f", 1, frac) == 1
    for bad, text in [(True, "k=True must be an integer"), ("3", "k='3' must be an integer"),
                      (2.5, "k=2.5 must be an integer"), (0, "k=0 must be >= 1"), (None, "k=null must be an integer")]:
        with pytest.raises(ConfigError) as e:
            check_number("k", bad, pos)
        assert str(e.value) == text
    for bad, text in [(float("inf"), "f=inf must be a finite number, or null (off)"),
                      (0.0, "f=0.0 must be in (0, 1], or null (off)"), (1.5, "f=1.5 must be in (0, 1], or null (off)")]:
        with pytest.raises(ConfigError) as e:
            check_number("f", bad, frac)
        assert str(e.value) == text


@pytest.mark.parametrize("kind", ["training", "probe"])
def test_early_input_checks_are_for_new_run_directories_only(tmp_path, monkeypatch, kind):
    """The fast checks of cmiexp.jobs (settings, task files, a probe's source) run only for a run
    directory that holds no run yet: a directory with a run goes straight to the runner, whose
    order decides, so a completed run whose data has moved since is still returned as it is."""
    import cmiexp.probes.run_probe as probe_module
    import cmiexp.train.runner as runner_module
    from cmiexp.errors import DataError
    from cmiexp.jobs import run_job

    reached = []
    monkeypatch.setattr(runner_module, "run_experiment", lambda cfg, run_dir, lock: reached.append(run_dir) or {})
    monkeypatch.setattr(probe_module, "run_probe", lambda cfg, run_dir, lock: reached.append(run_dir) or {})
    overrides = ["task=glue/rte", f"task.data_dir={tmp_path / 'moved'}"]
    if kind == "probe":
        overrides += ["objective=flownib"]
    cfg = compose_config(overrides)
    new, done = tmp_path / "new", tmp_path / "done"
    new.mkdir()
    with pytest.raises(DataError, match="does not exist or is not a folder"):
        run_job(cfg, new)
    assert reached == []  # refused before the runner (and torch) is reached
    done.mkdir()
    (done / "results.json").write_text(json.dumps({"schema": 1, "status": "completed"}))
    run_job(cfg, done)
    assert reached == [done]
