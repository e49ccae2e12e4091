"""Client-side adaptive throttling (Google SRE book, "Handling Overload"), without Beam.

When the server answers RESOURCE_EXHAUSTED, every retry adds load it has just refused. The client
therefore holds back a share of new calls: p = max(0, (requests - K * accepts) / (requests + 1))
over a sliding window, so the call rate drops while the server pushes back and recovers as it accepts.
"""

from __future__ import annotations

import collections
import random
import threading
import time


class AdaptiveThrottler:
    """Counts sent and accepted calls over `window_s` and says when to hold a new one back."""

    def __init__(self, window_s: float = 30.0, overload_ratio: float = 2.0):
        self.window_s = window_s
        self.overload_ratio = overload_ratio
        self._events: collections.deque[tuple[float, bool]] = collections.deque()
        self._accepts = 0  # accepted events in the window, kept so that no call scans the window
        self._lock = threading.Lock()

    def _prune(self, now: float) -> None:
        while self._events and self._events[0][0] < now - self.window_s:
            self._accepts -= self._events.popleft()[1]

    def reject_probability(self) -> float:
        with self._lock:
            self._prune(time.monotonic())
            requests, accepts = len(self._events), self._accepts
        return max(0.0, (requests - self.overload_ratio * accepts) / (requests + 1))

    def should_hold(self) -> bool:
        """True when this call should wait; held calls are not counted as requests, so it cannot starve."""
        return random.random() < self.reject_probability()

    def _record(self, accepted: bool) -> None:
        now = time.monotonic()
        with self._lock:
            self._prune(now)
            self._events.append((now, accepted))
            self._accepts += accepted

    def accepted(self) -> None:
        self._record(True)

    def rejected(self) -> None:
        self._record(False)
