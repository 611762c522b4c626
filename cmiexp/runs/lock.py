"""One process per run directory.

``RunLock`` holds a ``filelock`` (an OS advisory lock underneath) on ``<run_dir>/.lock`` for the whole
run. The kernel drops that lock when its process dies, so a lock left by a killed run never blocks a
re-run. The holder's pid, host and start time go into ``.lock.owner`` (a separate file: a waiter
opens ``.lock`` itself, which would clobber anything written there) so a refused second run can say
who holds the directory.

Only rank 0 of a run takes the lock (``is_rank_zero``): the processes of one distributed run share
its directory by design. The lock also knows whether its holder has *claimed* the directory
(``claim``: from then on the run writes there, and a failure is recorded in its results.json);
a holder that never claimed it leaves the directory as it found it on ``release``.

``waiting_lock`` is the blocking variant for shared work (a KD teacher, its logit cache): the
second process waits for the first instead of being refused.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Callable, Iterator

from filelock import FileLock, Timeout

from cmiexp.errors import RunRefused

LOCK_FILE = ".lock"
OWNER_FILE = ".lock.owner"
log = logging.getLogger("cmiexp")


class RunLocked(RunRefused):
    """Another live process holds the run directory."""


def is_rank_zero(env=None) -> bool:
    """Whether this process is rank 0 of its launch (or not launched by torchrun/accelerate at all)."""
    env = os.environ if env is None else env
    return env.get("RANK", "0") == "0" and env.get("LOCAL_RANK", "0") == "0"


class RunLock:
    """The per-run lock of ``run_dir``; ``on_claim`` is called once when the run claims the directory
    (the ``cmiexp`` command writes ``.hydra/`` and the index line then)."""

    def __init__(self, run_dir: str | os.PathLike, on_claim: Callable[[], None] | None = None):
        self.run_dir = Path(run_dir)
        self.on_claim = on_claim
        self.claimed = False
        self._previous_owner: tuple[bytes, int, int] | None = None
        self._created: list[Path] = []
        self._lock = FileLock(str(self.run_dir / LOCK_FILE), timeout=0, preserve_lock_file=True)

    def owner(self) -> dict:
        try:
            return json.loads((self.run_dir / OWNER_FILE).read_text())
        except (OSError, ValueError):
            return {}

    def acquire(self) -> "RunLock":
        from cmiexp.io import atomic_write_json

        # Folders this lock creates are removed again by a run that writes nothing (release(restore=True)).
        missing, p = [], self.run_dir.absolute()
        while not p.exists() and p.parent != p:
            missing.append(p)
            p = p.parent
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._created = missing
        try:
            self._lock.acquire()
        except Timeout:
            o = self.owner()
            who = f"pid {o.get('pid', '?')} on host {o.get('host', '?')}"
            since = f" since {o['started']}" if o.get("started") else ""
            raise RunLocked(f"run directory {self.run_dir} is in use by {who}{since}; wait for it to finish "
                            "or choose another run directory") from None
        owner = self.run_dir / OWNER_FILE
        if owner.is_file():
            st = owner.stat()
            self._previous_owner = (owner.read_bytes(), st.st_atime_ns, st.st_mtime_ns)
        else:
            self._previous_owner = None
        atomic_write_json(owner, {
            "pid": os.getpid(), "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        return self

    def claim(self) -> None:
        """The run writes into its directory from now on (its config is compatible, its checkpoint
        fits): a failure from here on is this run's, recorded in its results.json."""
        if not self.claimed:
            self.claimed = True
            if self.on_claim is not None:
                self.on_claim()

    def release(self, restore: bool | None = None) -> None:
        """Release; ``restore=True`` (default: the run never claimed the directory, i.e. it was
        refused or already completed) puts the previous owner record back, bytes and times, so the
        directory is exactly as it was."""
        if not self._lock.is_locked:
            return
        if restore is None:
            restore = not self.claimed
        if restore:
            from cmiexp.io import atomic_write_bytes

            owner = self.run_dir / OWNER_FILE
            if self._previous_owner is None:
                owner.unlink(missing_ok=True)
            else:
                data, atime_ns, mtime_ns = self._previous_owner
                atomic_write_bytes(owner, data)
                os.utime(owner, ns=(atime_ns, mtime_ns))
        self._lock.release()
        if restore and self._created:
            # Waiters never block (timeout 0), so no other process can be queued on this lock file.
            (self.run_dir / LOCK_FILE).unlink(missing_ok=True)
            for d in self._created:  # innermost first
                try:
                    d.rmdir()
                except OSError:  # not empty: something else was written there
                    break

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


@contextlib.contextmanager
def holding(run_dir: str | os.PathLike, lock: RunLock | None = None) -> Iterator[RunLock | None]:
    """The lock of the run in ``run_dir`` for the block: ``lock`` when the caller holds it already
    (the ``cmiexp`` command, which records a failure under it), else one taken here on rank 0 and
    released at the end (other ranks get None)."""
    if lock is not None or not is_rank_zero():
        yield lock
        return
    own = RunLock(run_dir).acquire()
    try:
        yield own
    finally:
        own.release()


@contextlib.contextmanager
def waiting_lock(path: str | os.PathLike, waiting: str) -> Iterator[None]:
    """Hold an exclusive ``filelock`` on ``path`` for the block, waiting for it as long as it takes.

    For work that several processes may want at once and only one should do (training a shared
    teacher, building its logit cache): the others wait here, then find the work done. ``waiting``
    is logged once when the lock is held by someone else."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.info("%s", waiting)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()
