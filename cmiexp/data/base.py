"""What every task loader returns: raw (untokenised) splits plus the facts the runner needs."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cmiexp.errors import DataError


def not_utf8_error(path: str | Path, err: UnicodeDecodeError | None = None) -> DataError:
    """A DataError naming the file, line and byte of the first invalid UTF-8 sequence.

    The decoder's own error gives an offset into a read buffer, not a line, so the file is scanned
    line by line to find it."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as e:
                return DataError(f"{path} line {lineno}: byte 0x{raw[e.start]:02x} at column {e.start + 1} is not "
                                 "valid UTF-8; re-save the file as UTF-8")
    return DataError(f"{path} is not valid UTF-8 ({err.reason if err else 'decode error'}); re-save it as UTF-8")


@dataclass
class TaskData:
    """Raw splits of one task and its label/metric facts.

    Every split is a ``datasets.Dataset`` with the columns named in ``text_fields``, an ``idx``
    column (0-based row id, stable across runs: KD caches and MI caches key on it) and a
    ``label`` column (int class id in ``label_names`` order, or float for regression; -1 or NaN
    where a split has no labels).
    """

    name: str
    train: Any
    eval_splits: dict[str, Any]  # alias -> Dataset; the first one drives model selection
    text_fields: tuple[str, ...]
    label_names: list[str] | None  # None for regression
    metrics: list[str]
    primary_metric: str
    is_regression: bool = False
    test: Any | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_labels(self) -> int:
        return 1 if self.is_regression else len(self.label_names)

    @property
    def id2label(self) -> dict[int, str]:
        if self.is_regression:
            return {0: "score"}
        return dict(enumerate(self.label_names))

    @property
    def train_texts(self):
        """Yield every text of the training split (used to build offline tokenizers)."""
        for f in self.text_fields:
            yield from self.train[f][:]  # [:] reads the column at once (fast)
