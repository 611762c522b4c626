"""Training progress on the console: a live bar on a terminal, periodic plain lines otherwise.

API: ``TrainProgress(total, initial, enabled)`` then ``start()``, ``update(step, loss)`` after each
optimizer step, ``close()``. ``loss`` may be a tensor: it is only added to a running sum on its
device, and read on the host when a line or the bar is about to be shown (at most every
``refresh_s`` seconds), so the loop never waits for the device just to report progress.

* stdout and stderr are terminals: a tqdm bar on stderr with ``loss=`` (the mean since the last
  refresh); log lines are routed above the bar (tqdm's logging redirect) instead of breaking it.
* otherwise (a log file, a cluster job, a pipe): one ``train step N/T (P%) loss=... steps/s`` log
  line every 10% of the steps (and at least every ``line_every_s`` seconds), never a carriage return.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time

log = logging.getLogger("cmiexp")


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # closed or replaced stream
        return False


def _columns(stream) -> int:
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError):
        return 0


class TrainProgress:
    def __init__(self, total: int, initial: int = 0, enabled: bool = True, desc: str = "train",
                 interactive: bool | None = None, refresh_s: float = 0.5, line_every_s: float = 60.0):
        self.total, self.initial, self.enabled, self.desc = int(total), int(initial), bool(enabled), desc
        self.interactive = (_is_terminal(sys.stdout) and _is_terminal(sys.stderr)) if interactive is None \
            else bool(interactive)
        self.refresh_s, self.line_every_s = float(refresh_s), float(line_every_s)
        self.step = self.initial
        self._bar = self._redirect = None
        self._loss_sum, self._loss_n = None, 0
        self._last_loss: float | None = None

    # ------------------------------------------------------------------ API
    def start(self) -> TrainProgress:
        if not self.enabled:
            return self
        self._t0 = self._last_show = time.monotonic()
        self._step_at_last_line = self.initial
        # A line at every 10% of the run (at least one step apart).
        self._line_steps = max(1, math.ceil(self.total / 10))
        if self.interactive:
            from tqdm.auto import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            self._redirect = logging_redirect_tqdm()
            self._redirect.__enter__()
            # A terminal that reports no size (some web consoles, `script`) would get an empty bar.
            width = dict(dynamic_ncols=True) if _columns(sys.stderr) > 0 else dict(ncols=100, nrows=24)
            self._bar = tqdm(total=self.total, initial=self.initial, desc=self.desc, mininterval=self.refresh_s,
                             **width)
        return self

    def update(self, step: int, loss=None) -> None:
        """Record optimizer step ``step`` (absolute) and, when given, its training loss."""
        if not self.enabled:
            return
        advanced, self.step = int(step) - self.step, int(step)
        if loss is not None:
            loss = loss.detach() if hasattr(loss, "detach") else float(loss)
            self._loss_sum = loss if self._loss_sum is None else self._loss_sum + loss
            self._loss_n += 1
        now = time.monotonic()
        if self._bar is not None:
            if now - self._last_show >= self.refresh_s or self.step >= self.total:
                self._last_show = now
                loss_now = self._take_loss()
                if loss_now is not None:
                    self._bar.set_postfix_str(f"loss={loss_now:.4g}", refresh=False)
            self._bar.update(advanced)
            return
        due = (self.step % self._line_steps == 0 or self.step >= self.total
               or now - self._last_show >= self.line_every_s)
        if due and self.step > self._step_at_last_line:
            self._line(now)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._redirect is not None:
            self._redirect.__exit__(None, None, None)
            self._redirect = None

    # ------------------------------------------------------------------ internals
    def _take_loss(self) -> float | None:
        """Mean loss since the last display (one host read), or the last shown value if none came."""
        if self._loss_n:
            self._last_loss = float(self._loss_sum) / self._loss_n
            self._loss_sum, self._loss_n = None, 0
        return self._last_loss

    def _line(self, now: float) -> None:
        loss_now = self._take_loss()
        rate = (self.step - self._step_at_last_line) / max(now - self._last_show, 1e-9)
        loss_txt = f" loss={loss_now:.4g}" if loss_now is not None else ""
        log.info("%s step %d/%d (%.0f%%)%s, %.3g steps/s", self.desc, self.step, self.total,
                 100.0 * self.step / max(self.total, 1), loss_txt, rate)
        self._last_show, self._step_at_last_line = now, self.step

    def __enter__(self) -> TrainProgress:
        return self.start()

    def __exit__(self, *exc) -> bool:
        self.close()
        return False


__all__ = ["TrainProgress"]
