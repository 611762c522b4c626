"""A warm ``cmiexp`` for the test suite: the real command in a new process, without re-importing torch.

Most end-to-end tests start the real command in a new process, as a user would, and on two cores about
4-9 s of every start is importing torch, transformers, datasets, scikit-learn and scipy. This module
keeps one server process per pytest worker that has imported those third-party libraries once (never
cmiexp itself) and forks a fresh child for each command. The child takes the command's argv,
environment, working directory and file descriptors (stdin/stdout/stderr are the caller's own, passed
over a Unix socket), imports cmiexp, runs the entry point and exits as the command would; the caller
sees the same exit status and output; SIGTERM/SIGINT/SIGHUP sent to a shim reach the command, signals the
caller ignores stay ignored, its resource limits and umask apply, and a caller that dies or times out
takes the command down. What differs from a new process: the process group (the server's), the hash
seed (one per server), the peak-RSS counter (it starts at the server's), the warning filters and
modules the preloaded libraries installed (a cold `cmiexp --help` never imports torch), and the end: a
child exits as the interpreter does but skips the teardown of its modules (``_exit_after``), so the
finalisers of objects still alive at exit do not run.

What a fork cannot change is what the preloaded libraries read when they were imported, so a command
whose environment differs from the server's in any variable outside RUNTIME_KEYS / RUNTIME_PREFIXES
(HF_*, OMP_*, PYTHONPATH, MPL*, ...) runs cold, as a real new process. ``CMIEXP_TEST_COLD=1`` runs every
command cold (the suite then takes several minutes longer); the results must be the same.

Used by ``conftest.run_cli`` directly and, through ``cmiexp`` / ``cmiexp-report`` shims put first on
PATH, by the shell scripts and documented commands the tests run. A warm child's ``sys.executable`` is a
Python shim, so the runs cmiexp provisions in a child process (``python -m cmiexp.train.run_resolved``:
KD teachers, MCMI starting models) start warm too; every other use of that shim execs the real Python.

This file is run as the server (``python warm_cli.py SOCKET``) and imported by the tests and shims, so
it imports only the standard library at module level.
"""

from __future__ import annotations

import atexit
import gc
import json
import os
import resource
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import warnings
from pathlib import Path

COLD_ENV = "CMIEXP_TEST_COLD"
SOCKET_ENV = "CMIEXP_TEST_WARM_SOCKET"
ENTRY_POINTS = {"cmiexp": "cmiexp.cli:main", "cmiexp-report": "cmiexp.report:main"}

# Variables nothing preloaded reads at import time: they may differ between the server and a command.
RUNTIME_PREFIXES = ("CMIEXP", "WANDB_", "PYTEST_")  # CMIEXP, CMIEXP_REPORT: the scripts' command overrides
RUNTIME_KEYS = frozenset({"PATH", "PWD", "OLDPWD", "SHLVL", "_", "COLUMNS", "LINES", "TERM", "NO_COLOR",
                          "FORCE_COLOR"})

# Imported once by the server. Import only: nothing computes, so no compute thread pool exists at fork
# time (pyarrow leaves a jemalloc background thread, which jemalloc's own fork handlers take care of).
PRELOAD = ("numpy", "torch", "transformers", "transformers.modeling_utils", "transformers.masking_utils",
           "transformers.activations", "transformers.generation", "transformers.trainer_utils",
           "transformers.models.bert.modeling_bert",
           "transformers.models.distilbert.modeling_distilbert", "transformers.models.roberta.modeling_roberta",
           "transformers.models.gpt2.modeling_gpt2", "transformers.models.t5.modeling_t5", "datasets",
           "accelerate", "sklearn.metrics", "scipy.stats", "scipy.special", "scipy.spatial", "pandas",
           "omegaconf", "hydra", "matplotlib.figure", "matplotlib.backends.backend_agg")

MAX_MESSAGE = 1 << 20
START_STREAMS = (sys.__stdin__, sys.__stdout__, sys.__stderr__)
# Passed from the caller: which of these it ignores (nohup, `cmd &`) and its resource limits.
CALLER_SIGNALS = (signal.SIGHUP, signal.SIGINT, signal.SIGQUIT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
RLIMITS = tuple(getattr(resource, n) for n in ("RLIMIT_NOFILE", "RLIMIT_AS", "RLIMIT_DATA", "RLIMIT_STACK",
                                               "RLIMIT_CORE", "RLIMIT_CPU", "RLIMIT_FSIZE", "RLIMIT_NPROC")
                if hasattr(resource, n))
START_TIMEOUT_S = 180


def cold_reason(env: dict, base: dict, added: dict | None = None) -> str | None:
    """Why a command with ``env`` cannot run in a child of a server started with ``base`` whose imports
    then set ``added`` (None: it can). A variable the imports set is fine unset or at the same value
    (the command's environment was copied from a process that had imported them too)."""
    added = added or {}
    differ = sorted(k for k in set(env) | set(base) if env.get(k) != base.get(k)
                    and not (k in added and env.get(k, added[k]) == added[k])
                    and k not in RUNTIME_KEYS and not k.startswith(RUNTIME_PREFIXES))
    return f"environment differs in {', '.join(differ)}" if differ else None


# ---------------------------------------------------------------------------------------------- server

def _send(conn: socket.socket, obj: dict) -> None:
    conn.send(json.dumps(obj).encode())


def _reopen_stdio(unbuffered: bool) -> None:
    """New sys.std* objects on fds 0-2, set up as a fresh interpreter would: the encoding and error
    handlers of this interpreter's own streams (same environment, so same locale rules), line-buffered
    on a tty, stderr always line-buffered, write-through under PYTHONUNBUFFERED."""
    import io

    def stream(fd, like, mode):
        if mode == "r":
            return open(fd, "r", encoding=like.encoding, errors=like.errors, closefd=False)
        raw = open(fd, "wb", buffering=0 if unbuffered else -1, closefd=False)
        return io.TextIOWrapper(raw, encoding=like.encoding, errors=like.errors, write_through=unbuffered,
                                line_buffering=fd == 2 or os.isatty(fd))

    sys.stdin = sys.__stdin__ = stream(0, START_STREAMS[0], "r")
    sys.stdout = sys.__stdout__ = stream(1, START_STREAMS[1], "w")
    sys.stderr = sys.__stderr__ = stream(2, START_STREAMS[2], "w")


def _run_command(req: dict, fds: list[int], python_shim: str | None) -> None:
    """In the forked child: become the command and run it. Never returns; exits through SystemExit."""
    for signum in (signal.SIGCHLD, signal.SIGPIPE, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_DFL if signum != signal.SIGPIPE else signal.SIG_IGN)
    for signum in req.get("ignored", []):  # what the caller ignores stays ignored, as across exec
        signal.signal(signum, signal.SIG_IGN)
    for which, limits in req.get("rlimits", []):
        try:
            resource.setrlimit(which, tuple(limits))
        except (ValueError, OSError):
            pass  # a hard limit above this server's cannot be raised
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    gc.enable()  # disabled in the server while it preloaded (see serve)
    os.chdir(req["cwd"])
    os.umask(req["umask"])
    os.environ.clear()
    os.environ.update(req["env"])
    _reopen_stdio(bool(req["env"].get("PYTHONUNBUFFERED")))
    if python_shim and req["env"].get(SOCKET_ENV):  # the processes it starts with sys.executable start warm too
        sys.executable = python_shim
    try:  # a fresh interpreter seeds numpy's global generator from the OS; a fork would share the server's
        import numpy
        numpy.random.seed()
    except ImportError:
        pass
    if req["mode"] == "module":  # python -m NAME: sys.path[0] is the working directory
        import runpy
        sys.path[0] = os.getcwd()
        sys.argv = [req["module"], *req["args"]]
        _exit_after(lambda: runpy.run_module(req["module"], run_name="__main__", alter_sys=True))
    # a console script: sys.path[0] is the script's folder, sys.argv[0] its path
    import importlib
    sys.path[0] = str(Path(req["argv0"]).parent)
    sys.argv = [req["argv0"], *req["args"]]
    module, func = ENTRY_POINTS[req["name"]].split(":")
    _exit_after(lambda: sys.exit(getattr(importlib.import_module(module), func)()))


def _exit_after(main) -> None:
    """Run ``main`` and exit as the interpreter would, without tearing down the preloaded heap.

    What a command can observe of an interpreter's exit happens here in the interpreter's order: the
    exit status (SystemExit's code: None is 0, an int itself, -1 when it does not fit a C long, anything
    else printed and 1; an uncaught exception's traceback and 1), waiting for non-daemon threads, the
    atexit callbacks (the preloaded libraries' too: a new process registers them when it imports them),
    flushing stdout and stderr (a failed flush makes it 120), collecting unreachable cycles (their
    finalisers run) and flushing again. Then os._exit: the rest of a normal exit frees every module's
    objects, which in a fork touches (copies) the whole preloaded heap: about 0.45 s a command with the
    heap frozen, 1.9 s without (benchmarks/bench_warm_exit.py). Not run, as a consequence: finalisers
    (``__del__``) of objects still referenced at exit, e.g. an unflushed file object in a module's
    globals, or a replaced ``sys.stdout`` (a new process flushes the original one when it frees it).
    A KeyboardInterrupt keeps the normal exit, which ends the process by SIGINT."""
    try:
        main()
        status = 0
    except SystemExit as e:
        status = _system_exit_status(e.code)
    except KeyboardInterrupt:
        raise
    except BaseException as e:
        tb = e.__traceback__
        while tb is not None and tb.tb_frame.f_code.co_filename == __file__:  # this runner's own frames
            tb = tb.tb_next
        sys.excepthook(type(e), e.with_traceback(tb), tb)  # the hook prints the exception's own traceback
        status = 1
    threading._shutdown()  # stdlib-internal: what the interpreter calls to join non-daemon threads at exit
    atexit._run_exitfuncs()
    status = _flush_std_streams(status)
    gc.collect()  # cheap: the preloaded heap is frozen, so this sees the command's own objects only
    os._exit(_flush_std_streams(status) & 0xFF)


def _system_exit_status(code) -> int:
    """The exit status of ``SystemExit(code)``, printing a non-integer code as the interpreter does."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code if -(2 ** 63) <= code < 2 ** 63 else -1  # PyLong_AsLong's overflow gives -1
    if sys.stderr is not None:
        print(code, file=sys.stderr)
    else:  # the interpreter then writes to the C-level stderr
        os.write(2, f"{code}\n".encode(errors="replace"))
    return 1


def _flush_std_streams(status: int) -> int:
    """Flush sys.stdout and sys.stderr as the interpreter does at exit: None and closed streams are
    skipped (a stream without ``closed`` counts as open), a failed stdout flush is reported as ignored,
    and any failure makes the status 120."""
    for stream, report in ((sys.stdout, True), (sys.stderr, False)):
        if stream is None:
            continue
        try:
            if getattr(stream, "closed"):
                continue
        except Exception:
            pass
        try:
            stream.flush()
        except Exception as e:
            if report and sys.stderr is not None:
                try:
                    print(f"Exception ignored in: {stream!r}", file=sys.stderr)
                    traceback.print_exception(e, file=sys.stderr)
                except Exception:
                    pass
            status = 120
    return status


def _handle(conn: socket.socket, base: dict, added: dict, python_shim: str | None) -> None:
    """In a forked handler: read one request, fork the command, report its pid then its wait status.
    Never returns (the handler exits here; only the command's child leaves, through SystemExit)."""
    try:
        msg, fds, _, _ = socket.recv_fds(conn, MAX_MESSAGE, 3)
        if not msg:  # a connection probe
            os._exit(0)
        req = json.loads(msg)
        reason = cold_reason(req["env"], base, added)
        print(f"{'cold' if reason else 'warm'}: {req.get('module') or req.get('name')} {req['args'][:6]} {reason or ''}",
              flush=True)
        if reason or len(fds) != 3:
            _send(conn, {"cold": reason or "expected three file descriptors"})
            os._exit(0)
        # what the preloaded imports put into the environment, a fresh process would have too
        req["env"] = {**added, **req["env"]}
        pid = os.fork()
    except BaseException:
        traceback.print_exc()
        os._exit(1)
    if pid == 0:
        conn.close()
        _run_command(req, fds, python_shim)
    try:
        for fd in fds:
            os.close(fd)
        _send(conn, {"pid": pid})
        try:
            pidfd = os.pidfd_open(pid)
        except (AttributeError, OSError):  # Linux < 5.3: wait without watching the caller
            pidfd = None
        while pidfd is not None:  # until the command exits; a caller that hangs up or sends "kill" takes it down
            ready, _, _ = select.select([conn, pidfd], [], [])
            if pidfd in ready:
                break
            try:
                data = conn.recv(MAX_MESSAGE)
            except OSError:  # the caller died with the connection in a reset state
                data = b""
            if data in (b"", b"kill"):
                os.kill(pid, signal.SIGKILL)
                break
        _, status = os.waitpid(pid, 0)
        try:
            _send(conn, {"status": status})
        except OSError:
            pass
    finally:
        os._exit(0)


def serve(path: str, python_shim: str | None = None) -> None:
    import importlib
    base = dict(os.environ)
    # The fork recipe of the gc docs: no collection while the preloaded heap is built (no holes in its
    # pages), then freeze it, so a command's collections, and its interpreter's finalisation, skip these
    # objects instead of touching (and so copying) every page of them. Unfrozen, a warm child spent about
    # 1.9 s of its exit copying the server's heap; a new process exits in milliseconds.
    gc.disable()
    for name in PRELOAD:
        importlib.import_module(name)
    gc.freeze()
    added = {k: v for k, v in os.environ.items() if k not in base}
    lsock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    lsock.bind(path)
    lsock.listen(16)
    while True:  # until the pytest worker that started us closes our stdin (or dies)
        ready, _, _ = select.select([lsock, sys.stdin], [], [])
        while True:  # reap finished handlers
            try:
                if os.waitpid(-1, os.WNOHANG)[0] == 0:
                    break
            except ChildProcessError:
                break
        if sys.stdin in ready and not os.read(sys.stdin.fileno(), 1024):
            return
        if lsock in ready:
            conn, _ = lsock.accept()
            if os.fork() == 0:
                lsock.close()
                _handle(conn, base, added, python_shim)
            conn.close()


# ---------------------------------------------------------------------------------------------- client

class Server:
    """The warm server of this pytest worker: started on first use, stopped at exit."""

    def __init__(self, base_env: dict):
        self.dir = Path(tempfile.mkdtemp(prefix="cmiexp-warm-"))
        self.path = str(self.dir / "sock")
        self.bin_dir = self.dir / "bin" if write_shims(self.dir / "bin") else None
        self.python_shim = self.dir / "py" / PYTHON_SHIM if self.bin_dir else None
        self.log = open(self.dir / "server.log", "wb")
        shim = [str(self.python_shim)] if self.python_shim else []
        self.proc = subprocess.Popen([sys.executable, __file__, self.path, *shim], env=dict(base_env),
                                     stdin=subprocess.PIPE, stdout=self.log, stderr=subprocess.STDOUT, cwd=self.dir)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.connectable():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                self.proc.wait()
                self.log.close()
                log = (self.dir / "server.log").read_text(errors="replace")
                shutil.rmtree(self.dir, ignore_errors=True)
                raise RuntimeError(f"the warm cmiexp server did not start:\n{log}")
            time.sleep(0.1)

    def connectable(self) -> bool:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
                s.connect(self.path)
            return True
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()
        if not os.environ.get("CMIEXP_TEST_WARM_KEEP"):
            shutil.rmtree(self.dir, ignore_errors=True)


_server: Server | None | bool = None  # False: it failed to start, every command runs cold


def server(base_env: dict) -> Server | None:
    """This process's server, started on first use with ``base_env``; None under CMIEXP_TEST_COLD=1 or
    when it cannot start (then every command runs cold, slower but the same, and a warning says why).
    (One per process: the tests import conftest under two names, this module under one.)"""
    global _server
    if os.environ.get(COLD_ENV) or _server is False:
        return None
    if _server is None:
        try:
            _server = Server(base_env)
        except RuntimeError as e:
            _server = False
            warnings.warn(f"{e}\nevery cmiexp command of this pytest worker runs cold", RuntimeWarning)
            return None
        atexit.register(_server.stop)
    return _server


def start(req: dict, fds: list[int], path: str | None) -> tuple[socket.socket, int] | None:
    """Send a command to the server at ``path``; (connection, child pid), or None when it must run cold."""
    if not path or os.environ.get(COLD_ENV) or req["env"].get(COLD_ENV):
        return None
    req["umask"] = os.umask(0o022)
    os.umask(req["umask"])
    req["ignored"] = [int(sig) for sig in CALLER_SIGNALS if signal.getsignal(sig) == signal.SIG_IGN]
    req["rlimits"] = [(which, resource.getrlimit(which)) for which in RLIMITS]
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        conn.connect(path)
        socket.send_fds(conn, [json.dumps(req).encode()], fds)
        reply = json.loads(conn.recv(MAX_MESSAGE))
    except (OSError, ValueError):  # no server, or its handler died: run cold
        conn.close()
        return None
    if "pid" not in reply:
        conn.close()
        return None
    return conn, reply["pid"]


def wait_status(conn: socket.socket, timeout: float | None = None) -> int:
    """The command's wait status (as os.waitpid gives it); socket.timeout when it runs past ``timeout``."""
    conn.settimeout(timeout)
    msg = conn.recv(MAX_MESSAGE)
    if not msg:
        raise RuntimeError("the warm cmiexp server's handler died before reporting the command's status")
    return json.loads(msg)["status"]


def _kill(conn: socket.socket) -> None:
    try:
        conn.send(b"kill")
    except OSError:
        pass


def run_module(module: str, args: list[str], env: dict, cwd: str, timeout: float, path: str | None):
    """``python -m MODULE ARGS`` with captured output, warm when possible: a CompletedProcess, or None
    when the command must run cold (the caller then runs it as a real subprocess)."""
    with open(os.devnull, "rb") as null, tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        req = {"mode": "module", "module": module, "args": list(args), "env": dict(env), "cwd": str(cwd)}
        started = start(req, [null.fileno(), out.fileno(), err.fileno()], path)
        if started is None:
            return None
        conn, pid = started
        cmd = [sys.executable, "-m", module, *args]
        with conn:
            try:
                status = wait_status(conn, timeout)
            except socket.timeout:
                _kill(conn)  # the handler kills the command, then reports
                wait_status(conn, 60)
                out.seek(0), err.seek(0)
                raise subprocess.TimeoutExpired(cmd, timeout, out.read().decode(errors="replace"),
                                                err.read().decode(errors="replace"))
            except BaseException:  # interrupted (pytest-timeout, Ctrl-C): the command must not outlive us
                _kill(conn)
                raise
        out.seek(0), err.seek(0)
        return subprocess.CompletedProcess(cmd, os.waitstatus_to_exitcode(status), out.read().decode(errors="replace"),
                                           err.read().decode(errors="replace"))


SHIM = """#!{python}
# Test shim for `{name}` (tests/warm_cli.py): runs it in a warm fork when it can, else execs {real}.
import sys
sys.path.insert(0, {tests!r})
from warm_cli import {main}
{main}({name!r}, {real!r})
"""
PYTHON_SHIM = "python-warm"


def write_shims(bin_dir: Path) -> bool:
    """``cmiexp`` and ``cmiexp-report`` shims in ``bin_dir`` (and, in ``bin_dir/../py``, the interpreter
    the warm children see as ``sys.executable``); False when the real scripts are not installed."""
    real_dir = Path(sys.executable).parent
    if not all((real_dir / name).exists() for name in ENTRY_POINTS):
        return False
    tests = str(Path(__file__).parent)
    shims = [(bin_dir / name, name, str(real_dir / name), "shim_main") for name in ENTRY_POINTS]
    shims.append((bin_dir.parent / "py" / PYTHON_SHIM, "python", sys.executable, "python_shim_main"))
    for path, name, real, main in shims:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(SHIM.format(python=sys.executable, name=name, real=real, tests=tests, main=main))
        path.chmod(0o755)
    return True


def _become(started: tuple[socket.socket, int]) -> None:
    """Forward signals to the warm child, wait for it, and exit as it did."""
    conn, pid = started

    def forward(signum, _frame):  # (the handler reaps the command only after this shim stops waiting)
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        if signal.getsignal(signum) != signal.SIG_IGN:
            signal.signal(signum, forward)
    status = wait_status(conn)
    if os.WIFSIGNALED(status):  # die of the same signal, as the caller would see the real command die
        sig = os.WTERMSIG(status)
        signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
    sys.exit(os.waitstatus_to_exitcode(status))


def shim_main(name: str, real: str) -> None:
    """A console-script shim: run ``name`` warm with this process's own stdin/stdout/stderr, else exec
    the real script."""
    req = {"mode": "script", "name": name, "argv0": real, "args": sys.argv[1:], "env": dict(os.environ),
           "cwd": os.getcwd()}
    started = start(req, [0, 1, 2], os.environ.get(SOCKET_ENV))
    if started is None:
        os.execv(real, [real, *sys.argv[1:]])
    _become(started)


def python_shim_main(_name: str, real: str) -> None:
    """The warm children's ``sys.executable``: ``-m MODULE ARGS`` (how cmiexp starts the runs it
    provisions, KD teachers and MCMI starting models) runs warm; anything else execs the real Python."""
    argv = sys.argv[1:]
    started = None
    if len(argv) >= 2 and argv[0] == "-m":
        req = {"mode": "module", "module": argv[1], "args": argv[2:], "env": dict(os.environ), "cwd": os.getcwd()}
        started = start(req, [0, 1, 2], os.environ.get(SOCKET_ENV))
    if started is None:
        os.execv(real, [real, *argv])
    _become(started)


if __name__ == "__main__":
    serve(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None)
