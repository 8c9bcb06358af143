"""Per-access-key request rate limit: a token bucket per key, answered with 429 when empty.

Each key may send ``burst`` requests at once and ``rate`` per second on average. The check runs after the
signature is verified, so nobody can drain another key's bucket by naming its access key.

Memory stays bounded whatever the number of keys: a bucket that has refilled to ``burst`` carries no state
worth keeping (a new bucket starts full), so idle buckets are dropped, and the table never holds more than
``max_keys`` buckets (the oldest-used go first).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable

TOO_MANY_REQUESTS = "too many requests"


class RateLimiter:
    """``allow(key)`` is True while ``key`` has a token; thread-safe. ``rate <= 0`` turns limiting off."""

    def __init__(
        self,
        rate: float,
        burst: int,
        *,
        max_keys: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rate = float(rate)
        self.burst = max(1, int(burst))
        self.max_keys = max(1, max_keys)
        self._clock = clock
        self._lock = threading.Lock()
        # key -> (tokens, time of last update); ordered by last use, least recent first.
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        # Time for an empty bucket to refill: after that long unused, a bucket equals a new one.
        self._idle_s = self.burst / self.rate if self.rate > 0 else 0.0
        self._next_sweep = 0.0

    def allow(self, key: str) -> bool:
        if self.rate <= 0:
            return True
        now = self._clock()
        with self._lock:
            if now >= self._next_sweep:
                self._sweep(now)
            entry = self._buckets.pop(key, None)
            if entry is None:
                tokens = float(self.burst)
            else:
                tokens, last = entry
                tokens = min(float(self.burst), tokens + max(0.0, now - last) * self.rate)
            allowed = tokens >= 1.0
            if allowed:
                tokens -= 1.0
            self._buckets[key] = (tokens, now)  # re-inserted at the end: most recently used
            while len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
            return allowed

    def retry_after(self, key: str) -> float:
        """Seconds until ``key`` has a token again (0 when it has one); for a Retry-After header."""
        if self.rate <= 0:
            return 0.0
        with self._lock:
            entry = self._buckets.get(key)
            if entry is None:
                return 0.0
            tokens, last = entry
            tokens = min(float(self.burst), tokens + max(0.0, self._clock() - last) * self.rate)
            return 0.0 if tokens >= 1.0 else (1.0 - tokens) / self.rate

    def __len__(self) -> int:
        with self._lock:
            return len(self._buckets)

    def _sweep(self, now: float) -> None:
        # Buckets are ordered by last use, so the idle ones are at the front: stop at the first active one.
        # Amortised O(1) per call; sweeping at most once per idle period keeps the lock short.
        while self._buckets:
            key, (_tokens, last) = next(iter(self._buckets.items()))
            if now - last < self._idle_s:
                break
            del self._buckets[key]
        self._next_sweep = now + max(self._idle_s, 1.0)
