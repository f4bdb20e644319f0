"""How busy each function has been lately: requests per second over a sliding window.

The activator counts the requests it serves per function and reports them with its demand; the
autoscaler (live, or the simulator's tick) records them here and puts the rates into the
snapshot's ``FunctionView.arrival_rate_per_s``, which preemption reads. ``now`` is passed in.
"""

from __future__ import annotations

from collections import deque

from autoscaler.core.snapshot import FunctionId

__all__ = ["ArrivalRates", "DEFAULT_RATE_WINDOW_S"]

# Five minutes: long enough that a steady function's rate outlasts a quiet spell of a few
# seconds, short enough to follow the trace's popularity changing over its 30 minutes.
DEFAULT_RATE_WINDOW_S = 300.0


class ArrivalRates:
    def __init__(self, window_s: float = DEFAULT_RATE_WINDOW_S) -> None:
        if window_s <= 0:
            raise ValueError(f"the rate window must be > 0 s, got {window_s}")
        self.window_s = window_s
        self._events: dict[FunctionId, deque[tuple[float, int]]] = {}
        self._totals: dict[FunctionId, int] = {}  # the sum of each deque, kept as events come and go

    def record(self, function: FunctionId, now: float, count: int = 1) -> None:
        if count < 0:
            raise ValueError(f"a request count must be >= 0, got {count}")
        if count:
            self._events.setdefault(function, deque()).append((now, count))
            self._totals[function] = self._totals.get(function, 0) + count

    def rates(self, now: float) -> dict[FunctionId, float]:
        """Requests per second in (now - window, now] for every function with any; others are 0."""
        out: dict[FunctionId, float] = {}
        for fn in list(self._events):
            events = self._events[fn]
            while events and events[0][0] <= now - self.window_s:
                self._totals[fn] -= events.popleft()[1]
            if events:
                out[fn] = self._totals[fn] / self.window_s
            else:
                del self._events[fn], self._totals[fn]
        return out
