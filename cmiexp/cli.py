"""The ``cmiexp`` command: one Hydra entry point for every objective.

User errors (``CmiexpError``) print one line and exit non-zero; set ``hydra.verbose=true`` for
the stack trace. In a ``-m`` sweep a failing job is recorded in its run directory and the
sweep goes on; the command exits non-zero at the end if any job failed.
"""

from __future__ import annotations

import logging
import sys
import traceback
from pathlib import Path

import hydra
from omegaconf import DictConfig

from cmiexp.config import CONF_DIR, register_resolvers
from cmiexp.errors import CmiexpError

register_resolvers()
log = logging.getLogger("cmiexp")

_failures: list[tuple[str, str]] = []


def _record_failure(run_dir: Path, cfg: DictConfig, message: str, tb: str | None) -> None:
    """Mark the run as failed in its results.json without touching a completed result."""
    from cmiexp.io import atomic_write_json, atomic_write_text
    from cmiexp.train.runner import RESULTS, SCHEMA, read_results

    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        prior = read_results(run_dir) or {}
        if prior.get("status") == "completed":
            return
        prior.update(
            schema=SCHEMA, status="failed", error=message,
            experiment=cfg.get("experiment_name", "default"), task=cfg.task.get("name"),
            model=cfg.model.get("name"), objective=cfg.objective.get("name"), seed=cfg.get("seed"),
            teacher_objective=cfg.objective.get("teacher_objective"), run_dir=str(run_dir.resolve()),
        )
        atomic_write_json(run_dir / RESULTS, prior)
        atomic_write_text(run_dir / "error.txt", message + "\n" + (tb or ""))
    except Exception:  # noqa: BLE001 - recording a failure must not hide the failure itself
        log.debug("could not record failure in %s", run_dir, exc_info=True)


def format_results_table(results: dict) -> str:
    """A small end-of-run table: best and final dev metrics, plus cost."""
    best = (results.get("best") or {}).get("metrics") or {}
    final = (results.get("final") or {}).get("metrics") or {}
    head = (f"{results.get('task')} | {results.get('model')} | {results.get('objective')} | seed {results.get('seed')}"
            f" | status {results.get('status')}")
    lines = [head, f"{'metric':<24}{'best':>12}{'final':>12}"]
    skip = {"num_samples"}
    for k in [k for k in best if k not in skip] + [k for k in final if k not in best and k not in skip]:
        def fmt(v):
            return f"{v:12.4f}" if isinstance(v, (int, float)) else f"{'-':>12}"
        lines.append(f"{k:<24}{fmt(best.get(k))}{fmt(final.get(k))}")
    if results.get("best"):
        lines.append(f"best at step {results['best'].get('step')} (primary: {results.get('primary_metric')})")
    if results.get("wall_time_s") is not None:
        sps = results.get("train_samples_per_s")
        lines.append(f"train time {results['wall_time_s']:.1f} s, {sps or 0:.1f} samples/s, "
                     f"peak memory {results.get('peak_memory_mb', 0):.0f} MB")
    lines.append(f"run dir: {results.get('run_dir')}")
    width = max(len(line) for line in lines)
    return "\n".join(["=" * width, *lines, "=" * width])


def _is_rank_zero() -> bool:
    import os

    return os.environ.get("RANK", "0") == "0" and os.environ.get("LOCAL_RANK", "0") == "0"


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def _entry(cfg: DictConfig):
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from cmiexp.train.runner import Preempted, run_experiment

    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    if not _is_rank_zero():
        # Under accelerate/torchrun every rank composes the same config and run directory; only
        # rank 0 writes the log file (workers would interleave their lines into it).
        root = logging.getLogger()
        for h in list(root.handlers):
            if isinstance(h, logging.FileHandler):
                root.removeHandler(h)
        root.setLevel(logging.WARNING)
    multirun = hc.mode == RunMode.MULTIRUN
    verbose = bool(hc.verbose)
    try:
        results = run_experiment(cfg, run_dir)
        if _is_rank_zero():
            print(format_results_table(results))
        return results
    except Preempted as e:
        print(f"cmiexp: {e}", file=sys.stderr)
        sys.exit(143)
    except CmiexpError as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if _is_rank_zero():
            _record_failure(run_dir, cfg, msg, traceback.format_exc() if verbose else None)
        log.error("%s", msg)
        if verbose:
            raise
        if not multirun:
            print(f"cmiexp: error: {msg}", file=sys.stderr)
            sys.exit(1)
        _failures.append((str(run_dir), msg))
    except Exception as e:  # noqa: BLE001
        if not multirun:
            raise  # a bug: keep the traceback
        # In a sweep, one broken job must not take the others down.
        msg = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        if _is_rank_zero():
            _record_failure(run_dir, cfg, msg, traceback.format_exc())
        log.exception("job failed: %s", run_dir)
        _failures.append((str(run_dir), msg))
    return None


def group_options(group: str) -> list[str]:
    """All options of a config group, nested ones included (``glue/rte``)."""
    root = CONF_DIR / group
    return sorted(str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.yaml"))


def check_group_choices(argv: list[str]) -> str | None:
    """An error line for ``group=option`` overrides naming an option that does not exist.

    Hydra's own message lists only the top level of a group (not ``task/glue/*``), so we check
    first and list every choice."""
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, value = arg.split("=", 1)
        key = key.lstrip("+~")
        if "." in key or "/" in key or not (CONF_DIR / key).is_dir() or key == "hydra":
            continue
        options = group_options(key)
        values = [v.strip() for v in value.strip("[]").split(",")] if not value.startswith(("range(", "choice(", "glob(", "interval(")) else []
        for v in values:
            if v and v != "null" and v not in options:
                return f"unknown {key}={v!r}; valid choices: {', '.join(options)}"
    return None


def main() -> None:
    err = check_group_choices(sys.argv[1:])
    if err:
        print(f"cmiexp: error: {err}", file=sys.stderr)
        sys.exit(1)
    _entry()
    if _failures:
        print(f"cmiexp: {len(_failures)} job(s) failed:", file=sys.stderr)
        for d, m in _failures:
            print(f"  {d}: {m}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
