"""Progress reporting: a tqdm bar on a terminal, plain periodic log lines in batch logs.

Batch jobs write to files where a redrawn bar becomes megabytes of carriage returns, so
when stderr is not a terminal we log one line every `log_every_s` seconds instead.
"""

from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger("gptrain")


class Progress:
    def __init__(self, total: int | None, desc: str, unit: str = "it", log_every_s: float = 30.0):
        self.total, self.desc, self.unit, self.log_every_s = total, desc, unit, log_every_s
        self.count = 0
        self._start = self._last_log = time.monotonic()
        self._bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit, unit_scale=True, dynamic_ncols=True)

    def update(self, n: int = 1) -> None:
        self.count += n
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.monotonic()
        if now - self._last_log >= self.log_every_s:
            self._last_log = now
            self._log_line(now)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        else:
            self._log_line(time.monotonic())

    def _log_line(self, now: float) -> None:
        rate = self.count / max(now - self._start, 1e-9)
        of_total = f"/{self.total}" if self.total is not None else ""
        log.info("%s: %d%s %s (%.1f %s/s)", self.desc, self.count, of_total, self.unit, rate, self.unit)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
