"""Retry policy of the black-box client."""
from __future__ import annotations

import random
import time
from typing import Callable


class RetryPolicy:
    """How many further attempts a failed request gets and how long to wait before each:
    ``backoff * 2**k`` seconds (capped at ``backoff_max``) with jitter in [50%, 100%], at
    least a server's ``Retry-After`` (also capped). ``sleep`` and ``random`` are injectable,
    so retry behaviour is tested without waiting or a live server."""

    def __init__(self, retries: int = 5, backoff: float = 0.5, backoff_max: float = 30.0, *,
                 sleep: Callable[[float], None] = time.sleep, random: Callable[[], float] = random.random) -> None:
        if not isinstance(retries, int) or retries < 0:
            raise ValueError(f"RetryPolicy: retries must be an int >= 0, got {retries!r}")
        if backoff < 0 or backoff_max < 0:
            raise ValueError(f"RetryPolicy: backoff and backoff_max must be >= 0, got {backoff!r}, {backoff_max!r}")
        self.retries, self.backoff, self.backoff_max = retries, backoff, backoff_max
        self.sleep, self.random = sleep, random

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (0-based)."""
        d = min(self.backoff_max, self.backoff * (2 ** attempt)) * (0.5 + self.random() / 2)
        if retry_after is not None:
            d = max(d, min(retry_after, self.backoff_max))
        return d

    def wait(self, attempt: int, retry_after: float | None = None) -> None:
        self.sleep(self.delay(attempt, retry_after))
