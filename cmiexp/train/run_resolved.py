"""``python -m cmiexp.train.run_resolved RUN_DIR``: train ``RUN_DIR/provision_config.yaml`` into RUN_DIR.

The child process of ``cmiexp.runs.provision`` (KD teachers, the CE starting model of
objective=mcmi): a fresh interpreter, so the run shares no RNG, Accelerate or Hydra state with the
run that asked for it. Logs go to stdout and ``RUN_DIR/cmiexp.log``; a failure is one line on
stderr, exit status 1 and ``status: failed`` in results.json.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from omegaconf import OmegaConf

from cmiexp.errors import CmiexpError
from cmiexp.runs import record_failure, write_results
from cmiexp.runs.provision import CONFIG_FILE, read_spec


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 1 or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    run_dir = Path(argv[0])
    config_file = run_dir / CONFIG_FILE
    if not config_file.is_file():
        print(f"cmiexp: error: {config_file} does not exist (written by cmiexp.runs.provision)", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(levelname)s] %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stdout)
    fh = logging.FileHandler(run_dir / "cmiexp.log")
    fh.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] %(message)s"))
    logging.getLogger().addHandler(fh)
    from cmiexp.train.runner import run_experiment

    cfg = OmegaConf.load(config_file)
    try:
        res = run_experiment(cfg, run_dir)
    except CmiexpError as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        identity = {"task": cfg.task.name, "model": cfg.model.name, "objective": cfg.objective.name,
                    "seed": cfg.get("seed"), "experiment": cfg.get("experiment_name")}
        record_failure(run_dir, identity, msg, None, owns_results=True)
        print(f"cmiexp: error: {msg}", file=sys.stderr)
        return 1
    if res.get("status") != "completed":
        print(f"cmiexp: error: the run in {run_dir} stopped with status {res.get('status')!r}", file=sys.stderr)
        return 1
    # The run's own overrides (its config was not composed from this process's command line).
    res["overrides"] = list((read_spec(run_dir) or {}).get("overrides") or [])
    write_results(run_dir, {k: v for k, v in res.items() if k != "schema"})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
