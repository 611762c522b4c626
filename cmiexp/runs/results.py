"""``results.json``: the one record of a run's status and numbers.

Status transitions: (none) -> running -> completed | interrupted | failed; interrupted -> running
(resume); failed -> running (re-run). A process that exits never leaves ``running`` behind: the
CLI records every exception as ``failed`` (``record_failure``), with the traceback in ``error.txt``.
"""

from __future__ import annotations

import json
from pathlib import Path

from cmiexp.errors import DataError
from cmiexp.io import atomic_write_json, atomic_write_text

RESULTS = "results.json"
ERROR_FILE = "error.txt"
SCHEMA = 1
STATUSES = ("running", "completed", "interrupted", "failed")


class ResultsUnreadable(DataError):
    """A results.json that exists but cannot be read as a JSON object (the message says why)."""


def results_path(run_dir: str | Path) -> Path:
    """``<run_dir>/results.json`` (a path that already names the file is returned as it is)."""
    p = Path(run_dir)
    return p if p.name == RESULTS else p / RESULTS


def load_results(run_dir: str | Path) -> dict:
    """The run's results.json as a dict; ``FileNotFoundError`` when there is none,
    ``ResultsUnreadable`` (one line: why) when it cannot be read, is not JSON or not an object."""
    p = results_path(run_dir)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError) as e:
        raise ResultsUnreadable(f"cannot read {RESULTS}: {' '.join(str(e).split())[:200]}") from e
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ResultsUnreadable(f"{RESULTS} is not valid JSON ({e.msg}, line {e.lineno})") from e
    if not isinstance(data, dict):
        raise ResultsUnreadable(f"{RESULTS} does not hold a JSON object")
    return data


def read_results(run_dir: str | Path) -> dict | None:
    """The run's results.json, or None if it is missing or unreadable."""
    try:
        return load_results(run_dir)
    except (OSError, ResultsUnreadable):
        return None


def collapse_text(results: dict) -> str | None:
    """What a collapsed run's results.json says, in the one wording the console warning, the
    end-of-run summary and cmiexp-report share: ``the best and final dev predictions are (nearly)
    all one class or one output (a: 0, b: 32)``; None for a run that did not collapse."""
    if results.get("collapsed") is not True:
        return None
    at = [str(a) for a in results.get("collapsed_at") or []]
    hist = (results.get("predicted_class_histogram") or {}).get(at[0] if at else "best")
    counts = f" ({', '.join(f'{k}: {v}' for k, v in hist.items())})" if isinstance(hist, dict) and hist else ""
    return f"the {' and '.join(at) or 'dev'} dev predictions are (nearly) all one class or one output{counts}"


def write_results(run_dir: str | Path, results: dict) -> None:
    if results.get("status") not in STATUSES:
        raise ValueError(f"results.json status must be one of {STATUSES}, not {results.get('status')!r}")
    atomic_write_json(Path(run_dir) / RESULTS, {"schema": SCHEMA, **results})


def record_failure(run_dir: str | Path, identity: dict, message: str, tb: str | None,
                   owns_results: bool) -> None:
    """Record a failure: ``status: failed`` and the message in results.json, traceback in error.txt.

    ``owns_results`` says whether this process wrote the directory's results.json (or found none);
    an earlier invocation's result (e.g. a completed run) is kept and only error.txt is written."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    prior = read_results(run_dir)
    try:
        atomic_write_text(run_dir / ERROR_FILE, message + "\n" + (tb or ""))
    except OSError:
        pass  # e.g. a full disk: results.json below matters more
    # A 'running' left by a killed process is stale (we hold the lock now): it becomes 'failed'.
    if prior is not None and not owns_results and prior.get("status") != "running":
        return
    prior = prior or {}
    prior.update(identity)
    prior.update(status="failed", error=message, run_dir=str(run_dir.resolve()))
    try:
        write_results(run_dir, prior)
    except OSError:
        # A full disk has no room for the temporary copy; overwriting in place frees the old
        # blocks first, so "failed" still replaces "running" (not atomic, but better than a lie).
        import json

        with open(run_dir / RESULTS, "w", encoding="utf-8") as f:
            f.write(json.dumps({"schema": SCHEMA, **prior}, default=str))
