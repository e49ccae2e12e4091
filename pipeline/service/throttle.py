"""Client-side adaptive throttling (Google SRE book, "Handling Overload"), and a clock of time spent waiting;
without Beam.

When the server answers RESOURCE_EXHAUSTED, every retry adds load it has just refused. The client
therefore holds back a share of new calls: p = max(0, (requests - K * accepts) / (requests + 1))
over a sliding window, so the call rate drops while the server pushes back and recovers as it accepts.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import random
import threading
import time
from collections.abc import Iterator


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


class WaitClock:
    """Seconds that any number of threads have spent waiting (held back, backing off, waiting for a rate limit),
    readable while they still wait: a runner's throttling signal then hears of a long wait as it happens, not
    when it ends. Shared by the calls of one worker process; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ended_s = 0.0  # waits that have ended
        self._started: dict[int, float] = {}  # waits under way: their monotonic start
        self._ids = itertools.count()
        self._reported = 0

    @contextlib.contextmanager
    def waiting(self) -> Iterator[None]:
        """The block's time counts as waiting, from its first moment."""
        token = next(self._ids)
        with self._lock:
            self._started[token] = time.monotonic()
        try:
            yield
        finally:
            with self._lock:
                self._ended_s += time.monotonic() - self._started.pop(token)

    def unreported(self) -> int:
        """Whole seconds waited so far (waits under way included) not yet reported; they count as reported from
        now, so that threads reporting in turn never report a second twice."""
        with self._lock:
            now = time.monotonic()
            total = self._ended_s + sum(now - t for t in self._started.values())
            new = int(total) - self._reported
            self._reported += new
        return new
