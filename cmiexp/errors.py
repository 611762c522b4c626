"""User-facing errors.

A ``CmiexpError`` is a problem with the user's input (config, data, checkpoint, environment).
The CLI prints its message as one line and exits non-zero, without a stack trace unless
``hydra.verbose`` is set; anything else is a bug and keeps its traceback.
"""


class CmiexpError(Exception):
    """An actionable, one-line error about the user's input."""


class ConfigError(CmiexpError):
    """A config key holds an invalid value."""


class DataError(CmiexpError):
    """A data folder, file or row is missing or malformed."""


class CheckpointError(CmiexpError):
    """A checkpoint is missing, corrupt or incompatible."""


class TrainingDiverged(CmiexpError):
    """The loss became NaN or infinite."""


class RunRefused(CmiexpError):
    """The run directory is in use or holds another training; the run stopped without changing it."""
