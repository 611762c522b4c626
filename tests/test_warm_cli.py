"""The warm command runner of the test suite (tests/warm_cli.py) behaves as a new process would."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import warm_cli

from tests.conftest import REPO, WARM_ENV, run_cli, warm_socket

PROBE = r'''
import json, os, sys
import numpy
print(json.dumps({"argv": sys.argv[1:], "cwd": os.getcwd(), "path0": sys.path[0], "probe": os.environ.get("CMIEXP_PROBE"),
                  "tty": sys.stdout.isatty(), "draw": float(numpy.random.random()),
                  "preloaded_cmiexp": any(m == "cmiexp" or m.startswith("cmiexp.") for m in sys.modules),
                  # reads WANDB_MODE at import, which warm_cli lets differ: it must not be preloaded
                  "wandb_integration": "transformers.integrations.integration_utils" in sys.modules}))
print("to stderr", file=sys.stderr)
sys.exit(int(sys.argv[1]))
'''


def _cold(module, args, env, cwd):
    return subprocess.run([sys.executable, "-m", module, *args], env=env, cwd=cwd, capture_output=True, text=True)


def test_a_warm_child_sees_what_a_new_process_sees(tmp_path):
    (tmp_path / "probe_mod.py").write_text(PROBE)
    env = dict(WARM_ENV, CMIEXP_PROBE="x y", WANDB_PROBE="1")
    warm = [warm_cli.run_module("probe_mod", ["3", "a b"], env, str(tmp_path), 60, warm_socket()) for _ in range(2)]
    cold = _cold("probe_mod", ["3", "a b"], env, tmp_path)
    assert all(w is not None for w in warm), "the warm server refused the environment it was started with"
    got, want = [json.loads(w.stdout) for w in warm], json.loads(cold.stdout)
    for g in got:
        assert g["draw"] != want["draw"]
        for key in ("argv", "cwd", "path0", "probe", "tty", "preloaded_cmiexp"):
            assert g[key] == want[key], key
    assert not want["preloaded_cmiexp"] and not any(g["wandb_integration"] for g in got)
    assert got[0]["draw"] != got[1]["draw"]  # numpy's global generator is reseeded in every child
    assert [w.returncode for w in warm] == [cold.returncode] * 2 == [3, 3]
    assert [w.stderr for w in warm] == [cold.stderr] * 2


EXITS = r'''
import atexit, io, sys, threading, time
how = sys.argv[1]
# Buffered whatever PYTHONUNBUFFERED says (the suite sets it): what is printed below reaches the caller
# only through the exit's own flush.
sys.stdout = io.TextIOWrapper(open(1, "wb", closefd=False), write_through=False)
atexit.register(lambda: print("atexit ran"))
def late():
    time.sleep(0.3)
    print("thread done")
threading.Thread(target=late).start()  # not a daemon: the exit waits for it, before the atexit callbacks
print("buffered", end="; ")
class Cycle:
    def __del__(self):
        print("cycle finalised")
c = Cycle()
c.self = c
del c  # unreachable now; only a collection finalises it
if how == "message":
    sys.exit("a message on stderr")
if how == "raise":
    raise ValueError("uncaught")
if how == "code":
    sys.exit(300)  # exit statuses are taken modulo 256
if how == "huge":
    sys.exit(2 ** 64)  # does not fit a C long: -1, so 255
if how == "no stdout":
    sys.stdout.flush()
    sys.stdout = None
'''
EXIT_STATUS = {"message": 1, "raise": 1, "code": 300 % 256, "huge": 255, "no stdout": 0, "return": 0}


@pytest.mark.parametrize("how", list(EXIT_STATUS))
def test_a_warm_child_exits_as_a_new_process_does(tmp_path, how):
    """The warm child skips the interpreter's teardown of the preloaded heap (warm_cli._exit_after), but not
    what a command can see of its exit: status, traceback or message, threads joined, atexit callbacks,
    buffered output flushed, cyclic garbage finalised."""
    (tmp_path / "exits_mod.py").write_text(EXITS)
    warm = warm_cli.run_module("exits_mod", [how], WARM_ENV, str(tmp_path), 60, warm_socket())
    cold = _cold("exits_mod", [how], WARM_ENV, tmp_path)
    assert warm is not None
    assert (warm.returncode, warm.stdout) == (cold.returncode, cold.stdout)
    assert warm.returncode == EXIT_STATUS[how]
    if how != "no stdout":
        assert set(warm.stdout.split("; ")[1].splitlines()) == {"cycle finalised", "thread done", "atexit ran"}
        assert warm.stdout.startswith("buffered; ") and warm.stdout.index("thread done") < warm.stdout.index("atexit")
    if how == "raise":  # the same traceback from the module's own frame on (the frames above it are the
        # runners': runpy's in both, this runner's are dropped)
        frame = f'  File "{tmp_path / "exits_mod.py"}"'
        assert frame in warm.stderr and warm.stderr.startswith("Traceback (most recent call last):\n")
        assert warm.stderr[warm.stderr.index(frame):] == cold.stderr[cold.stderr.index(frame):]
        assert "warm_cli.py" not in warm.stderr
    else:
        assert warm.stderr == cold.stderr == ("a message on stderr\n" if how == "message" else "")


@pytest.mark.parametrize("key", ["HF_HOME", "OMP_NUM_THREADS", "PYTHONPATH"])
def test_an_environment_read_at_import_time_runs_cold(tmp_path, key):
    (tmp_path / "probe_mod.py").write_text(PROBE)
    env = dict(WARM_ENV, **{key: str(tmp_path)})
    assert warm_cli.run_module("probe_mod", ["0"], env, str(tmp_path), 60, warm_socket()) is None
    assert warm_cli.cold_reason(env, WARM_ENV) == f"environment differs in {key}"


def test_variables_the_preloaded_imports_set_do_not_make_a_command_cold():
    base, added = {"A": "1"}, {"KMP_INIT_AT_FORK": "FALSE"}
    assert warm_cli.cold_reason({"A": "1", "KMP_INIT_AT_FORK": "FALSE"}, base, added) is None
    assert warm_cli.cold_reason({"A": "1"}, base, added) is None
    assert warm_cli.cold_reason({"A": "1", "KMP_INIT_AT_FORK": "TRUE"}, base, added) == \
        "environment differs in KMP_INIT_AT_FORK"
    assert warm_cli.cold_reason({"A": "2", "CMIEXP_X": "y", "PATH": "/bin"}, base, added) == "environment differs in A"


def test_run_cli_and_the_shim_give_the_real_commands_exit_codes_and_output(cmiexp_env, tmp_path):
    assert cmiexp_env[warm_cli.SOCKET_ENV] and (warm_cli.server(WARM_ENV).bin_dir / "cmiexp").exists()
    bad = run_cli(["trainer.epochs=banana"], cmiexp_env, check=False)
    cold_env = dict(cmiexp_env, **{warm_cli.COLD_ENV: "1"})
    cold = subprocess.run([sys.executable, "-m", "cmiexp", "trainer.epochs=banana"], env=cold_env, cwd=REPO,
                          capture_output=True, text=True)
    assert bad.returncode == cold.returncode == 1 and bad.stdout == cold.stdout and bad.stderr == cold.stderr
    shim = subprocess.run(["bash", "-c", "command -v cmiexp && cmiexp-report --help"], env=cmiexp_env,
                          capture_output=True, text=True)
    real = subprocess.run([os.path.join(os.path.dirname(sys.executable), "cmiexp-report"), "--help"], env=cold_env,
                          capture_output=True, text=True)
    assert shim.returncode == real.returncode == 0
    first, _, rest = shim.stdout.partition("\n")
    assert first == str(warm_cli.server(WARM_ENV).bin_dir / "cmiexp") and rest == real.stdout


def test_the_shim_forwards_sigterm_and_exits_as_the_command_does(cmiexp_env, output_dir):
    """SIGTERM to the shim reaches the run, which saves its checkpoint and exits 143, as it does cold."""
    proc = subprocess.Popen(["cmiexp", "task.max_train_samples=256", "task.max_length=16", "trainer.epochs=50",
                             "trainer.save_every=2", "trainer.progress_bar=false"], env=cmiexp_env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if list(output_dir.rglob("checkpoint/latest/trainer_state.json")):
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    assert "checkpoint saved" in err
    (run_dir,) = [p.parent for p in output_dir.rglob("results.json")]
    assert json.loads((run_dir / "results.json").read_text())["status"] == "interrupted"


def test_a_server_that_does_not_start_in_time_is_killed_and_says_so(monkeypatch):
    """(warm_cli.server then warns and runs every command of the worker cold.)"""
    monkeypatch.setattr(warm_cli, "START_TIMEOUT_S", 0)
    started = []
    real_popen = subprocess.Popen
    monkeypatch.setattr(warm_cli.subprocess, "Popen", lambda *a, **k: started.append(real_popen(*a, **k)) or started[-1])
    with pytest.raises(RuntimeError, match="the warm cmiexp server did not start"):
        warm_cli.Server(WARM_ENV)
    assert started and started[0].wait(timeout=30) is not None


def test_a_timed_out_warm_command_is_killed_and_its_caller_state_applies(tmp_path):
    """A timeout kills the command (as subprocess.run does); the caller's ignored signals and resource
    limits are the command's too."""
    import resource

    (tmp_path / "sleeper.py").write_text("import os, time\nopen('pid', 'w').write(str(os.getpid()))\ntime.sleep(60)\n")
    with pytest.raises(subprocess.TimeoutExpired):
        warm_cli.run_module("sleeper", [], dict(WARM_ENV), str(tmp_path), 3, warm_socket())
    pid = int((tmp_path / "pid").read_text())
    with pytest.raises(ProcessLookupError):  # killed and reaped by the time the timeout is raised
        os.kill(pid, 0)

    (tmp_path / "state.py").write_text(
        "import json, resource, signal\n"
        "print(json.dumps([signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN,"
        " resource.getrlimit(resource.RLIMIT_NOFILE)[0]]))\n")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    old = signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, 512), hard))
    try:
        warm = warm_cli.run_module("state", [], dict(WARM_ENV), str(tmp_path), 60, warm_socket())
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        signal.signal(signal.SIGUSR1, old)
    assert json.loads(warm.stdout) == [True, min(soft, 512)]
