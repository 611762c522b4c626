"""Shared fixtures: the real configs composed through Hydra, the ../shared data, tmp caches."""

from __future__ import annotations

import contextlib
import os

# Tiny models on a 2-core machine run much faster single-threaded (and never oversubscribe the
# cores when a test starts a subprocess or two ranks); set before torch is imported.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
import subprocess
import sys
from pathlib import Path

import pytest
import warm_cli

from cmiexp.resolvers import register_resolvers

# The configs' resolvers (run id, KD teacher tag), as the entry points register them.
register_resolvers()

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
GLUE_DIR = SHARED_DATA / "glue"
COT_DIR = SHARED_DATA / "cot"
REPO_PYTHONPATH = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One cache (tiny models, tokenised splits) for the whole session: built once, reused."""
    return tmp_path_factory.mktemp("cmiexp-cache")


@pytest.fixture
def one_torch_thread():
    """One torch thread for the test (small critics and probes run fastest that way on 2 cores)."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture
def output_dir(tmp_path) -> Path:
    d = tmp_path / "outputs"
    d.mkdir()
    return d


def offline_env() -> dict:
    """The environment of every command the tests run: this process's, offline, unbuffered, with this
    checkout first on PYTHONPATH and this interpreter's console scripts (cmiexp, cmiexp-report) first on
    PATH, so a script that calls `cmiexp` finds this install also when commands run cold."""
    env = dict(os.environ)
    env.update(WANDB_MODE="offline", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONUNBUFFERED="1",
               PYTHONPATH=REPO_PYTHONPATH,
               PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    return env


# The warm server's environment: this process's as it was before any test ran (a test's monkeypatch
# or a library's os.environ.setdefault must not become what every later command is compared with).
WARM_ENV = offline_env()


def warm_socket() -> str | None:
    """This worker's warm ``cmiexp`` server (started on first use; None under CMIEXP_TEST_COLD=1)."""
    server = warm_cli.server(WARM_ENV)
    return server.path if server else None


def with_warm_cli(env: dict) -> dict:
    """``env`` whose ``cmiexp`` / ``cmiexp-report`` on PATH run warm (tests/warm_cli.py)."""
    server = warm_cli.server(WARM_ENV)
    if server and server.bin_dir:
        env = dict(env, PATH=os.pathsep.join([str(server.bin_dir), env.get("PATH", "")]))
        env[warm_cli.SOCKET_ENV] = server.path
    return env


@contextlib.contextmanager
def warm_children():
    """While open, the runs an in-process ``run_experiment`` provisions in a child process (KD teachers,
    MCMI starting models: ``sys.executable -m cmiexp.train.run_resolved``) start warm."""
    server = warm_cli.server(WARM_ENV)
    with pytest.MonkeyPatch.context() as mp:
        if server and server.python_shim:
            mp.setattr(sys, "executable", str(server.python_shim))
            mp.setenv(warm_cli.SOCKET_ENV, server.path)
            for key in ("PYTHONPATH", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):  # as every test command runs
                mp.setenv(key, WARM_ENV[key])
        yield


def command_env(cache_dir: Path, output_dir: Path) -> dict:
    """The environment of a test's ``cmiexp`` commands: offline, this cache and output folder, warm."""
    env = offline_env()
    env.update(CMIEXP_CACHE_DIR=str(cache_dir), CMIEXP_OUTPUT_DIR=str(output_dir))
    return with_warm_cli(env)


@pytest.fixture
def cmiexp_env(cache_dir, output_dir) -> dict:
    return command_env(cache_dir, output_dir)


def compose_config(overrides: list[str] | None = None, return_hydra_config: bool = False):
    """Compose the real configs (conf/) with Hydra's compose API."""
    from hydra import compose, initialize_config_dir

    from cmiexp.config import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides or []), return_hydra_config=return_hydra_config)


def run_cli(args: list[str], env: dict, cwd: Path | None = None, timeout: int = 600, check: bool = True):
    """Run the real ``cmiexp`` command in a new process (as a user would; warm when the environment
    allows, see tests/warm_cli.py)."""
    proc = warm_cli.run_module("cmiexp", args, env, str(cwd or REPO), timeout, warm_socket())
    if proc is None:
        proc = subprocess.run([sys.executable, "-m", "cmiexp", *args], env=env, cwd=cwd or REPO, capture_output=True,
                              text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"cmiexp {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def find_run_dirs(root: Path) -> list[Path]:
    return sorted(p.parent for p in Path(root).rglob("results.json"))
