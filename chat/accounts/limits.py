"""Per-connection abuse limits."""

from __future__ import annotations

import time


class TokenBucket:
    """Allows `rate_per_minute` events a minute on average, with bursts up to the same number.

    A rate of 0 or less disables the limit.
    """

    def __init__(self, rate_per_minute: int, *, clock=time.monotonic) -> None:
        self.capacity = float(rate_per_minute)
        self.tokens = float(rate_per_minute)
        self.per_second = rate_per_minute / 60.0
        self._clock = clock
        self._last = clock()

    def take(self) -> bool:
        """Spend one token; False when the bucket is empty."""
        if self.capacity <= 0:
            return True
        now = self._clock()
        self.tokens = min(self.capacity, self.tokens + (now - self._last) * self.per_second)
        self._last = now
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True

    def retry_after(self) -> float:
        """Seconds until the next token."""
        return max(0.0, (1.0 - self.tokens) / self.per_second) if self.per_second else 0.0
