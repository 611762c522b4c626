"""The process environment of a run: where log records go, known-benign library noise silenced at
its source, peak memory read back.

Logging (conf/hydra/job_logging/cmiexp.yaml): every record at INFO and above reaches
``cmiexp.log`` in the run directory; the console shows cmiexp's own INFO lines and every
library's warnings (``ConsoleFilter``). Library INFO (transformers, datasets, accelerate) goes to
the file only, so the console stays short and the file stays complete.
"""

from __future__ import annotations

import logging
import re
import sys

# Records marked ``extra={"file_only": True}`` (e.g. the plain-text copy of the end-of-run summary,
# which the console shows as a rich table, or an error's traceback) are written to cmiexp.log only.
FILE_ONLY = "file_only"

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# The heads cmiexp initialises itself on top of a pretrained body (Hugging Face names per family).
_NEW_HEAD_PREFIXES = ("classifier.", "classification_head.", "score.", "pre_classifier.")


def is_shared_tensor_notice(message: str) -> bool:
    """Accelerate warns on every save of a model with tied weights (T5's shared input/output
    embeddings): save_state(safe_serialization=True) stores a tied tensor once and load_state ties
    it back (the T5 resume tests check the reloaded weights). Expected deduplication, not a problem."""
    return "Removed shared tensor" in message and "while saving" in message


def is_new_head_report(message: str) -> bool:
    """transformers' LOAD REPORT when the only keys it lists are MISSING weights of the task head:
    cmiexp builds that head freshly (seeded) on every pretrained body, so the report says what was
    intended. Any other row (unexpected, mismatched, a missing body weight) keeps the report."""
    text = _ANSI.sub("", message)
    if "LOAD REPORT" not in text.splitlines()[0]:
        return False
    rows = [ln.split("|") for ln in text.splitlines()[1:] if ln.count("|") >= 2]
    rows = [[c.strip() for c in r] for r in rows if r[0].strip() not in ("Key",)]
    return bool(rows) and all(r[1] == "MISSING" and r[0].startswith(_NEW_HEAD_PREFIXES) for r in rows)


# logger name -> predicate on the formatted message: exactly the known-benign records, nothing else.
_BENIGN = {
    "accelerate.utils.other": is_shared_tensor_notice,
    "transformers.modeling_utils": is_new_head_report,
}


def is_own_logger(name: str) -> bool:
    return name == "cmiexp" or name.startswith("cmiexp.") or name == "__main__"


class ConsoleFilter(logging.Filter):
    """What the console handler shows: warnings from anyone, INFO from cmiexp only, nothing marked
    file-only."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, FILE_ONLY, False):
            return False
        return record.levelno >= logging.WARNING or is_own_logger(record.name)


class PlainFormatter(logging.Formatter):
    """The usual format without ANSI escapes (some library messages carry bold or colour codes),
    which a log file or a redirected console would show as garbage. ``keep_on_terminal``: keep them
    when stdout is a terminal (the console handler)."""

    def __init__(self, format=None, datefmt=None, keep_on_terminal: bool = False):  # noqa: A002 - dictConfig key
        super().__init__(fmt=format, datefmt=datefmt)
        self.keep_on_terminal = bool(keep_on_terminal)

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if self.keep_on_terminal and getattr(sys.stdout, "isatty", lambda: False)():
            return text
        return _ANSI.sub("", text)


class DropBenign(logging.Filter):
    """Drop the records ``is_benign(message)`` recognises (one known-benign message of one logger)."""

    def __init__(self, is_benign):
        super().__init__()
        self.is_benign = is_benign

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            return not self.is_benign(record.getMessage())
        except Exception:  # noqa: BLE001 - a record we cannot read is shown, never hidden
            return True


def route_library_logs() -> None:
    """Send transformers' and datasets' records through the root handlers (console filter and
    cmiexp.log) instead of their own stderr handlers, which bypass cmiexp.log and, for datasets,
    print each record a second time (its handler plus propagation to the root)."""
    import datasets
    import transformers

    transformers.utils.logging.disable_default_handler()
    transformers.utils.logging.enable_propagation()
    transformers.utils.logging.set_verbosity_info()
    ds_root = logging.getLogger("datasets")
    for h in list(ds_root.handlers):
        if type(h) is logging.StreamHandler:  # the handler datasets adds on import
            ds_root.removeHandler(h)
    datasets.utils.logging.enable_propagation()
    datasets.utils.logging.set_verbosity_info()
    logging.getLogger("accelerate").setLevel(logging.INFO)
    # Entry points that configure logging with basicConfig (python -m cmiexp.teachers, the CE-start
    # subprocess of init_from) get the same console rule, so library INFO stays off their console.
    for h in logging.getLogger().handlers:
        if (type(h) is logging.StreamHandler and getattr(h, "stream", None) in (sys.stdout, sys.stderr)
                and not any(isinstance(f, ConsoleFilter) for f in h.filters)):
            h.addFilter(ConsoleFilter())
    # warnings.warn (FutureWarning, UserWarning, ...) as log records: shown once on the console and
    # kept in cmiexp.log.
    logging.captureWarnings(True)
    for name, is_benign in _BENIGN.items():
        lg = logging.getLogger(name)
        if not any(isinstance(f, DropBenign) for f in lg.filters):
            lg.addFilter(DropBenign(is_benign))


def quiet_libraries() -> None:
    """Library records through our handlers (see ``route_library_logs``) and no library progress
    bars (ours report progress)."""
    import datasets
    import transformers

    route_library_logs()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()


def peak_memory_mb(device) -> float:
    """Peak memory of this process in MiB: CUDA allocator peak on a GPU, max RSS on a CPU."""
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB
    except ImportError:  # pragma: no cover - non-POSIX
        return float("nan")


__all__ = ["FILE_ONLY", "ConsoleFilter", "PlainFormatter", "DropBenign", "is_new_head_report", "is_shared_tensor_notice", "is_own_logger", "peak_memory_mb", "quiet_libraries",
           "route_library_logs"]
