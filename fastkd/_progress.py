"""Minimal progress reporting (no dependency): a line per update on stderr.

On a terminal the line is rewritten in place; otherwise (logs, CI) at most one line
every ``min_interval`` seconds is printed, plus the last one.
"""
from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: int, desc: str, enabled: bool = True, unit: str = "it",
                 min_interval: float = 2.0, stream=None, write=None) -> None:
        self.total, self.desc, self.enabled, self.unit = total, desc, enabled, unit
        self.stream = stream or sys.stderr
        self.write = write  # a callable taking each line instead of the stream
        self.tty = write is None and bool(getattr(self.stream, "isatty", lambda: False)())
        self.min_interval = 0.1 if self.tty else min_interval
        self.n = 0
        self.t0 = time.perf_counter()
        self._last = -1e9
        self._closed = False

    def update(self, n: int = 1, info: str = "") -> None:
        self.n += n
        if not self.enabled:
            return
        now = time.perf_counter()
        if now - self._last < self.min_interval and self.n < self.total:
            return
        self._last = now
        el = now - self.t0
        rate = self.n / el if el > 0 else 0.0
        eta = (self.total - self.n) / rate if rate > 0 else float("nan")
        line = (f"{self.desc}: {self.n}/{self.total} {self.unit} [{el:6.1f}s elapsed, "
                f"{rate:.2f} {self.unit}/s, eta {eta:5.1f}s]" + (f" {info}" if info else ""))
        if self.write is not None:
            self.write(line)
            return
        if self.tty:
            self.stream.write("\r" + line + "\x1b[K")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def note(self, msg: str) -> None:
        """Print a message on its own line (a warning during the loop), whatever the interval."""
        if not self.enabled:
            return
        line = f"{self.desc}: {msg}"
        if self.write is not None:
            self.write(line)
            return
        self.stream.write(("\r\x1b[K" if self.tty else "") + line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty and not self._closed:
            self.stream.write("\n")
            self.stream.flush()
        self._closed = True
