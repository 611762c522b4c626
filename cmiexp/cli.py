"""The ``cmiexp`` command: one Hydra entry point for every objective.

Every failure prints one line on stderr and exits non-zero; it is recorded in the run directory
(``status: failed`` in results.json, the traceback in error.txt) unless the run was refused
(directory in use, another training in it), which changes nothing. ``hydra.verbose=true`` raises
the traceback instead. In a ``-m`` sweep a failing job is recorded and the sweep goes on; the
command exits non-zero at the end if any job failed.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from cmiexp.config import CONF_DIR
from cmiexp.resolvers import register_resolvers
from cmiexp.errors import CmiexpError
from cmiexp.train.environment import FILE_ONLY
from cmiexp.train.summary import format_metric, render_summary, summary_text  # noqa: F401 - format_metric kept importable here

register_resolvers()
log = logging.getLogger("cmiexp")

def _identity_fields(cfg: DictConfig) -> dict:
    """The readable identity of a run for its failure record (read defensively: cfg may be bad)."""
    def get(path):
        try:
            return OmegaConf.select(cfg, path, throw_on_resolution_failure=False)
        except Exception:  # noqa: BLE001 - a broken config must not stop the failure record
            return None

    return {"experiment": get("experiment_name"), "task": get("task.name"),
            "model": get("model.name"), "objective": get("objective.name"), "seed": get("seed"),
            "teacher_objective": get("objective.teacher_objective")}


def _record_failure(run_dir: Path, cfg: DictConfig, message: str, tb: str | None, claimed: bool) -> None:
    """Mark the run as failed in its results.json without touching an earlier invocation's result
    (``claimed``: this job had claimed the directory, see ``cmiexp.runs.lock``)."""
    from cmiexp.runs import read_run_config, record_failure, run_config_record

    try:
        owns = claimed
        if not owns:
            # The directory was trained with this very config (resume passed its check): the
            # failure is this run's, e.g. a checkpoint that cannot be loaded.
            recorded = read_run_config(run_dir)
            owns = recorded is not None and recorded.get("hash") == run_config_record(cfg)["hash"]
        record_failure(run_dir, _identity_fields(cfg), message, tb, owns_results=owns)
    except Exception:  # noqa: BLE001 - recording a failure must not hide the failure itself
        log.debug("could not record failure in %s", run_dir, exc_info=True)


def describe_exception(e: BaseException) -> str:
    """One line naming the cause: the message of our own errors; type, message and the file:line
    where it was raised for anything else (a bug or a library error)."""
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    if isinstance(e, CmiexpError):
        return first or type(e).__name__
    where = ""
    tb = traceback.extract_tb(e.__traceback__) if e.__traceback__ else []
    if tb:
        where = f" (at {Path(tb[-1].filename).name}:{tb[-1].lineno})"
    return f"{type(e).__name__}: {first[:300]}{where}"


def format_results_table(results: dict) -> str:
    """The end-of-run summary as plain text (cmiexp/train/summary.py draws it)."""
    return summary_text(results)


def export_slurm_distributed_env() -> bool:
    """Inside a submitit job with several tasks (hydra/launcher=submitit_slurm or local_submitit),
    expose its process layout as the torch.distributed variables Accelerate reads, with submitit's
    own helper (MASTER_ADDR = the job's first host, a MASTER_PORT every task derives from the job
    id). Leaves a single-task job, or one already under torchrun (RANK set), alone. True if it did."""
    import os

    if "RANK" in os.environ or not os.environ.get("SUBMITIT_EXECUTOR"):
        return False
    from submitit import JobEnvironment
    from submitit.helpers import TorchDistributedEnvironment

    if JobEnvironment().num_tasks <= 1:
        return False
    # CUDA_VISIBLE_DEVICES is left alone: Accelerate picks cuda:LOCAL_RANK itself.
    TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    return True


def objective_value(results: dict | None, metric: str = "primary") -> float:
    """The value a sweeper optimises (config key ``optimized_metric``): the best checkpoint's dev
    ``metric`` ("primary": the task's primary metric). NaN for a failed run, which the sweeper
    records as a failed trial; NaN with an error line naming the key for a metric the run lacks."""
    if not results or results.get("status") != "completed":
        return float("nan")
    name = results.get("primary_metric") if metric == "primary" else metric
    metrics = (results.get("best") or {}).get("metrics") or {}
    try:
        return float(metrics[name])
    except (KeyError, TypeError, ValueError):
        if metric != "primary":  # a name the user chose; "primary" on a run without dev metrics (a probe) is NaN
            log.error("optimized_metric=%s: the run has no such dev metric (it has: %s); the sweeper gets NaN",
                      metric, ", ".join(sorted(metrics)) or "none")
        return float("nan")


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def _entry(cfg: DictConfig):
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from cmiexp.jobs import run_job
    from cmiexp.runs import RunLock, RunRefused, append_index, is_rank_zero, write_hydra_files
    from cmiexp.runs.sweeps import JobFailed
    from cmiexp.train.signals import Preempted

    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    export_slurm_distributed_env()
    rank0 = is_rank_zero()
    if not rank0:
        # Under accelerate/torchrun every rank composes the same config and run directory; only
        # rank 0 writes the log file (workers would interleave their lines into it).
        root = logging.getLogger()
        for h in list(root.handlers):
            if isinstance(h, logging.FileHandler):
                root.removeHandler(h)
        root.setLevel(logging.WARNING)
    multirun = hc.mode == RunMode.MULTIRUN
    verbose = bool(hc.verbose)
    if os.environ.get("ACCELERATE_USE_CPU", "").lower() == "true" and "WORLD_SIZE" not in os.environ:
        # Accelerate's --cpu uses its single-process launcher whatever --num_processes says.
        log.warning("accelerate launch --cpu starts ONE process; for N CPU processes use "
                    "`accelerate launch --multi_gpu --num_processes N -m cmiexp ...` or "
                    "`torchrun --standalone --nproc_per_node N -m cmiexp ...`")

    def on_claim() -> None:
        # Called once the run may write to its directory (lock held, config compatible).
        write_hydra_files(run_dir, cfg, HydraConfig.instance().cfg, hc.overrides.task)
        append_index(Path(cfg.paths.output_dir) / "runs", _run_record(cfg), run_dir, list(hc.overrides.task))

    # Only rank 0 takes the lock: the other ranks of the same run share the directory by design.
    lock = RunLock(run_dir, on_claim=on_claim) if rank0 else None
    recorded = False
    try:
        if lock is not None:
            lock.acquire()
        results = run_job(cfg, run_dir, lock)
        if rank0:
            render_summary(results)
            # The same summary in cmiexp.log (as text; the console already shows the table).
            log.info("end of run:\n%s", summary_text(results).rstrip(), extra={FILE_ONLY: True})
        # What a sweeper that optimises (Optuna) reads; the basic sweeper ignores it.
        return objective_value(results, str(cfg.optimized_metric))
    except Preempted as e:
        print(f"cmiexp: {e}", file=sys.stderr)
        sys.exit(143)
    except RunRefused as e:
        # A refusal (directory in use, another training's checkpoint) changes nothing on disk.
        msg = describe_exception(e)
        if verbose:
            raise
        print(f"cmiexp: error: {msg}", file=sys.stderr)
        if not multirun:
            sys.exit(1)
        return JobFailed(run_dir, msg)  # listed at the end of the sweep (cmiexp.runs.sweeps.FailedJobs)
    except (Exception, KeyboardInterrupt) as e:  # noqa: BLE001 - every failure leaves a record
        msg = describe_exception(e)
        tb = traceback.format_exc()
        if rank0:
            _record_failure(run_dir, cfg, msg, tb, claimed=lock.claimed)
            recorded = True
        # cmiexp.log keeps the error and its traceback; the console shows the one line below only.
        log.error("error: %s\n%s", msg, tb.rstrip(), extra={FILE_ONLY: True})
        if verbose or isinstance(e, KeyboardInterrupt):
            raise
        hint = "" if isinstance(e, CmiexpError) else \
            f" [traceback in {run_dir / 'error.txt'}; hydra.verbose=true shows it]"
        print(f"cmiexp: error: {msg}{hint}", file=sys.stderr)
        if not multirun:
            sys.exit(1)
        return JobFailed(run_dir, msg)
    finally:
        if lock is not None:
            # A run that wrote nothing (refused, already completed) leaves even the lock record as it was.
            lock.release(restore=not (recorded or lock.claimed))


def _run_record(cfg: DictConfig) -> dict:
    from cmiexp.runs import run_config_record

    return run_config_record(cfg)


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


def check_output_dir(argv: list[str]) -> str | None:
    """An error line if the folder runs would be written to cannot be created or written.

    Checked before Hydra starts, since Hydra creates the run directory first and fails with a
    stack trace."""
    import os

    target = os.environ.get("CMIEXP_OUTPUT_DIR") or "outputs"
    for arg in argv:
        for key in ("paths.output_dir=", "hydra.run.dir=", "hydra.sweep.dir="):
            if arg.startswith(key) and "${" not in arg:
                target = arg[len(key):]
    path = Path(target).expanduser().absolute()
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        return f"output folder {path} cannot be created: {probe} is not a directory (set paths.output_dir or CMIEXP_OUTPUT_DIR)"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"output folder {path} is not writable ({probe}); set paths.output_dir or CMIEXP_OUTPUT_DIR"
    return None


def one_line(e: BaseException) -> str:
    """Hydra's and OmegaConf's multi-line messages as one line: the unindented lines (the indented
    ones repeat the key and object type) joined with '; '."""
    lines = [ln.strip().rstrip(".") for ln in str(e).splitlines() if ln.strip() and not ln[:1].isspace()]
    return "; ".join(lines) or type(e).__name__


def check_overrides(argv: list[str]) -> str | None:
    """One error line for overrides Hydra would reject (unknown key, bad syntax, wrong type).

    Hydra reports these on several lines plus a hint about HYDRA_FULL_ERROR; composing the config
    first (the first value of each sweep) gives the same verdict and lets us print one line. Runs
    with other Hydra options (-cn, -cp, ...) are left to Hydra."""
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if any(a.startswith("-") and a not in ("-m", "--multirun") for a in argv):
        return None
    args = [a for a in argv if not a.startswith("-")]
    if not args:
        return None
    try:
        first = []
        for o in OverridesParser.create().parse_overrides(args):
            if o.is_sweep_override():
                try:
                    first.append(f"{o.get_key_element()}={next(iter(o.sweep_string_iterator()))}")
                except Exception:  # noqa: BLE001 - a sweep only its sweeper understands (interval())
                    continue
            else:
                first.append(o.input_line)
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            compose(config_name="config", overrides=first, return_hydra_config=True)
    except Exception as e:  # noqa: BLE001 - Hydra's override and composition errors
        return one_line(e)
    return None


def _wants_resolved_hydra_config(argv: list[str]) -> bool:
    for i, a in enumerate(argv[:-1]):
        if a in ("-c", "--cfg") and argv[i + 1] == "hydra":
            return "--resolve" in argv
    return False


def print_resolved_hydra_config(argv: list[str]) -> int:
    """``cmiexp --cfg hydra --resolve``: Hydra resolves its own node without the job config, so
    the run directory's ``${paths.output_dir}`` / ``${task.name}`` cannot resolve there; compose the
    whole config (the same files and overrides) and print its resolved ``hydra`` node instead."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    flags = {"-c", "--cfg", "hydra", "--resolve", "-p", "--package"}
    overrides = [a for a in argv if a not in flags and not a.startswith("-")]
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
        raw = OmegaConf.to_container(cfg.hydra, resolve=False)
        text = OmegaConf.to_yaml(_resolve_leaves(cfg, raw, "hydra"))
    except Exception as e:  # noqa: BLE001 - one line for a bad override, as for a run
        print(f"cmiexp: error: {one_line(e)}", file=sys.stderr)
        return 1
    print(text, end="")
    return 0


def _resolve_leaves(root, node, prefix: str):
    """Each interpolation of ``node`` (a plain container under ``prefix`` of ``root``) resolved on
    its own; fields Hydra fills only when a job starts (hydra.runtime.*) stay as written."""
    from omegaconf import OmegaConf

    if isinstance(node, dict):
        return {k: _resolve_leaves(root, v, f"{prefix}.{k}") for k, v in node.items()}
    if isinstance(node, list):
        return [_resolve_leaves(root, v, f"{prefix}[{i}]") for i, v in enumerate(node)]
    if isinstance(node, str) and "${" in node:
        try:
            value = OmegaConf.select(root, prefix, throw_on_missing=True)
            return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
        except Exception:  # noqa: BLE001 - unresolvable before a job starts: show it as written
            return node
    return node


def main() -> None:
    argv = sys.argv[1:]
    if "--dry-run" in argv:  # sizes, memory and steps without loading weights (cmiexp/dry_run.py)
        from cmiexp.dry_run import main as dry_run

        sys.exit(dry_run(argv))
    # --help/--cfg/--info only print; they must work from a read-only folder too.
    prints_only = any(a in ("-h", "--help", "--hydra-help", "-c", "--cfg", "-i", "--info") for a in argv)
    err = check_group_choices(argv) or (None if prints_only else check_output_dir(argv))
    if err:
        print(f"cmiexp: error: {err}", file=sys.stderr)
        sys.exit(1)
    if _wants_resolved_hydra_config(argv):
        sys.exit(print_resolved_hydra_config(argv))
    err = None if prints_only else check_overrides(argv)
    if err:
        print(f"cmiexp: error: {err}", file=sys.stderr)
        sys.exit(1)
    _entry()  # a sweep with failed jobs exits 1 at its end (cmiexp.runs.sweeps.FailedJobs)


if __name__ == "__main__":
    main()
