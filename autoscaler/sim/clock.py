"""The simulator's virtual clock: an event heap ordered by (time, sequence number).

The sequence number is the order of ``push`` calls, so events at the same instant run in the order
they were scheduled: a run is a pure function of its inputs. ``now_s`` only moves forward, to the
time of the event just popped. Step events (a device finishing an iteration) are kept apart from
control events (arrivals, retry ticks, loads finishing) so that a device may run several iterations
in one event when no control event can intervene before they end (``horizon_s``).
"""

from __future__ import annotations

import enum
import heapq
import math
from dataclasses import dataclass, field
from typing import Any


class EventKind(enum.Enum):
    ARRIVAL = "arrival"
    TICK = "tick"  # retry waiting requests, keep-alive, autoscaling round
    LOAD_DONE = "load_done"
    STEP_DONE = "step_done"


@dataclass(frozen=True, order=True)
class Event:
    time_s: float
    seq: int
    kind: EventKind = field(compare=False)
    payload: Any = field(compare=False, default=None)


class PastEventError(ValueError):
    """An event scheduled before the current virtual time."""


class EventQueue:
    def __init__(self) -> None:
        self.now_s = 0.0
        self._seq = 0
        self._control: list[Event] = []
        self._steps: list[Event] = []

    def push(self, time_s: float, kind: EventKind, payload: Any = None) -> Event:
        if time_s < self.now_s or math.isnan(time_s):
            raise PastEventError(f"event {kind.value} at {time_s} s is before now ({self.now_s} s)")
        ev = Event(time_s, self._seq, kind, payload)
        self._seq += 1
        heapq.heappush(self._steps if kind is EventKind.STEP_DONE else self._control, ev)
        return ev

    def pop(self) -> Event:
        """The earliest event (ties: the one pushed first); advances ``now_s`` to it."""
        if not self._control and not self._steps:
            raise IndexError("pop from an empty event queue")
        if not self._steps or (self._control and self._control[0] < self._steps[0]):
            ev = heapq.heappop(self._control)
        else:
            ev = heapq.heappop(self._steps)
        self.now_s = ev.time_s
        return ev

    def horizon_s(self) -> float:
        """Time of the next control event (inf when none): nothing but step events happen before."""
        return self._control[0].time_s if self._control else math.inf

    def __len__(self) -> int:
        return len(self._control) + len(self._steps)

    def __bool__(self) -> bool:
        return bool(self._control or self._steps)
