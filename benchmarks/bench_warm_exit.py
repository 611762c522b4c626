"""Benchmark: what a forked child of the test suite's warm server pays to exit, and a warm command's cost.

The test suite runs `cmiexp` commands in children forked from a server that has imported torch,
transformers, datasets, scikit-learn and scipy (tests/warm_cli.py). A forked child shares the server's
heap copy-on-write until it writes to a page; a garbage collection or the interpreter's teardown of
every module writes to (nearly) every object, so the child copies the whole preloaded heap on its way
out. This script measures, in one run on this machine, a child that exits at once:

* normally, with the server's heap as is (what every warm command paid before the heap was frozen);
* normally, after ``gc.freeze()`` in the server (collections skip the frozen objects);
* through ``os._exit`` (what tests/warm_cli.py does after the interpreter's observable exit steps);

and then ``cmiexp --cfg job`` run cold (a new process) and warm (through tests/warm_cli.py as it is).
It prints medians and the ratios between them. Nothing is asserted about speed.

    python benchmarks/bench_warm_exit.py             # 5 trials each
    python benchmarks/bench_warm_exit.py --trials 9
"""

from __future__ import annotations

import argparse
import gc
import importlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import warm_cli  # noqa: E402  (the test suite's runner, imported from tests/)
from bench_trainer import machine  # noqa: E402  (this folder is sys.path[0] when run as a script)


def fork_exit_seconds(fast: bool) -> float:
    """Seconds from fork to the parent's waitpid of a child that exits at once."""
    t = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        if fast:
            os._exit(0)
        raise SystemExit(0)  # the interpreter's own exit: collections, then module teardown
    os.waitpid(pid, 0)
    return time.perf_counter() - t


def median_of(trials: int, f) -> float:
    return statistics.median(f() for _ in range(trials))


def cfg_job_seconds(trials: int, warm_path: str | None, env: dict, cwd: str) -> float:
    def once() -> float:
        t = time.perf_counter()
        if warm_path is None:
            p = subprocess.run([sys.executable, "-m", "cmiexp", "--cfg", "job"], env=env, cwd=cwd,
                               capture_output=True, text=True)
        else:
            p = warm_cli.run_module("cmiexp", ["--cfg", "job"], env, cwd, 120, warm_path)
            if p is None:
                raise SystemExit("the warm server refused the command (environment read at import time?)")
        if p.returncode != 0:
            raise SystemExit(f"cmiexp --cfg job failed:\n{p.stderr}")
        return time.perf_counter() - t
    return median_of(trials, once)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=5)
    args = p.parse_args(argv)
    print(f"machine: {machine()}")

    # 1. The exit of a forked child, in this process after the same preload as the warm server.
    gc.disable()
    for name in warm_cli.PRELOAD:
        importlib.import_module(name)
    gc.enable()
    normal = median_of(args.trials, lambda: fork_exit_seconds(fast=False))
    gc.freeze()
    frozen = median_of(args.trials, lambda: fork_exit_seconds(fast=False))
    fast = median_of(args.trials, lambda: fork_exit_seconds(fast=True))
    gc.unfreeze()

    # 2. A cheap command, cold and warm.
    env = dict(os.environ)
    server = warm_cli.server(env)
    if server is None:
        raise SystemExit("the warm server did not start")
    with tempfile.TemporaryDirectory() as cwd:
        cold_s = cfg_job_seconds(args.trials, None, env, cwd)
        warm_s = cfg_job_seconds(args.trials, server.path, env, cwd)

    rows = [("child exit, heap as is", normal), ("child exit, heap frozen", frozen),
            ("child exit, os._exit", fast), ("cmiexp --cfg job, new process", cold_s),
            ("cmiexp --cfg job, warm (tests/warm_cli.py)", warm_s)]
    print(f"\nmedian of {args.trials} trials")
    print("| what | seconds |\n|---|---|")
    for what, s in rows:
        print(f"| {what} | {s:.3f} |")
    print(f"\nfrozen heap: exit {normal / frozen:.1f}x faster; os._exit: {normal / fast:.0f}x faster than the "
          f"unfrozen exit")
    print(f"warm cmiexp --cfg job: {cold_s / warm_s:.2f}x the speed of a new process")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
