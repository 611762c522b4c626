"""The run-directory contract: identity, lock, records, resume compatibility.

A run directory is ``<output_dir>/runs/<experiment>/<task>/<model>/<objective>/seed<N>-<hash>``:
the readable part names the run, ``<hash>`` is the hash of the resolved training config
(``identity.config_hash``); a KD student's adds ``-from-<teacher objective>-<teacher hash8>``
(``identity.teacher_folder_suffix``). Runs other runs need (KD teachers, the CE starting model of
objective=mcmi) are provisioned under ``paths.teachers_dir`` (``provision``). Inside a run directory:

* ``run_config.json``  the hashed config (``{"hash", "config"}``), written when the run claims the dir
* ``results.json``     status (running -> completed | interrupted | failed) and numbers (``results``)
* ``error.txt``        the failure message and traceback of a failed run
* ``train_log.jsonl``, ``metrics.jsonl``, ``curves.png``  training and dev curves (``logs``)
* ``.hydra/``          Hydra's config.yaml, hydra.yaml, overrides.yaml (written by cmiexp at claim time)
* ``.lock``, ``.lock.owner``  the per-run lock and the pid/host holding it (``lock``)

``<output_dir>/runs/index.jsonl`` maps each hash to its run directory and readable overrides.
"""

from cmiexp.runs.identity import (IDENTITY_EXCLUDED_KEYS, config_hash, diff_configs, identity_config,
                                  run_id_resolver)
from cmiexp.runs.lock import RunLock, RunLocked, holding, is_rank_zero
from cmiexp.runs.logs import CURVES, EVAL_LOG, TRAIN_LOG, read_curve
from cmiexp.errors import RunRefused
from cmiexp.runs.records import (RUN_CONFIG, append_index, check_resume_compatible,
                                 read_run_config, run_config_record, write_hydra_files, write_run_config)
from cmiexp.runs.results import (ERROR_FILE, RESULTS, SCHEMA, STATUSES, ResultsUnreadable, collapse_text,
                                 load_results, read_results, record_failure, results_path, write_results)

__all__ = [
    "IDENTITY_EXCLUDED_KEYS", "config_hash", "diff_configs", "identity_config", "run_id_resolver",
    "CURVES", "EVAL_LOG", "TRAIN_LOG", "read_curve", "RunLock", "RunLocked", "holding", "is_rank_zero", "RUN_CONFIG", "RunRefused", "append_index", "check_resume_compatible",
    "read_run_config", "run_config_record", "write_hydra_files", "write_run_config",
    "ERROR_FILE", "RESULTS", "SCHEMA", "STATUSES", "ResultsUnreadable", "collapse_text", "load_results", "read_results",
    "record_failure", "results_path", "write_results",
]
