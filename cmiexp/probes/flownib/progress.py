"""Feedback during long probe work: a tqdm bar on a terminal, and on a redirected stream (a log
file, a cluster job) one plain log line every 10% instead of carriage-return redraws."""

from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger("cmiexp")


class LineProgress:
    """The tqdm calls the probe uses (update, set_postfix_str, close, context manager), as log lines."""

    def __init__(self, total: int, desc: str):
        self.total, self.desc, self.n, self.postfix = max(1, int(total)), desc, 0, ""
        self.next_report, self.t0 = 0.1, time.perf_counter()

    def update(self, k: int = 1) -> None:
        self.n += k
        frac = self.n / self.total
        if frac >= self.next_report or self.n == self.total:
            log.info("%s: %d/%d (%.0f%%, %.0f s) %s", self.desc, self.n, self.total, 100 * frac,
                     time.perf_counter() - self.t0, self.postfix)
            while self.next_report <= frac:
                self.next_report += 0.1

    def set_postfix_str(self, s: str, refresh: bool = True) -> None:
        self.postfix = s

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


class NoProgress(LineProgress):
    def update(self, k: int = 1) -> None:
        pass


def progress(total: int, enabled: bool, desc: str):
    """A progress reporter for ``total`` units: a tqdm bar on a terminal, log lines otherwise,
    nothing when disabled."""
    if not enabled:
        return NoProgress(total, desc)
    if sys.stderr.isatty():
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, mininterval=1.0, leave=False, dynamic_ncols=True)
    return LineProgress(total, desc)


__all__ = ["LineProgress", "progress"]
