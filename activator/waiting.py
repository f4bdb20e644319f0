"""Holding requests that no instance admitted: a bounded count per function, and demand reports.

A request that misses (no ready instance, or every instance refused admission) takes a place in
its function's waiting room until an instance admits it. The room is bounded; a full room raises
``QueueFull`` (the caller answers 503 with Retry-After). While anything waits, ``DemandReporter``
tells the autoscaler how many requests wait per function, again and again, so an autoscaler that
restarts learns the demand from the next report: the requests themselves never leave here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Iterator

from activator.routes import RouteSource, RouteView

log = logging.getLogger("slinfer.activator.waiting")


class QueueFull(Exception):
    def __init__(self, function: str, limit: int) -> None:
        super().__init__(f"function '{function}' has {limit} requests waiting for capacity already; "
                         f"retry later")
        self.function = function
        self.limit = limit


class WaitingRoom:
    """Requests waiting per function, bounded by ``limit``; a wake-up per function for waiters."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.counts: dict[str, int] = {}
        self._wake: dict[str, asyncio.Event] = {}
        self.arrived = asyncio.Event()  # set when a function's count goes 0 -> 1
        # Requests that arrived per function since the last demand report (each client request
        # once, not its retries or continuations): keeps serving functions alive, and gives the
        # autoscaler each function's arrival rate (preemption spares busier functions).
        self.arrivals: Counter[str] = Counter()
        self._trying: dict[str, int] = {}
        self.wakes: Counter[str] = Counter()  # per function: changes that may have freed room
        # function -> the route-table version on which its held requests last found no room. Only
        # a function whose requests have tried the current table is demand: one still on its way
        # to a freshly published instance would otherwise scale the function out again.
        self.tried: dict[str, int] = {}

    @contextlib.contextmanager
    def hold(self, function: str) -> Iterator[None]:
        n = self.counts.get(function, 0)
        if n >= self.limit:
            raise QueueFull(function, self.limit)
        self.counts[function] = n + 1
        if n == 0:
            self.arrived.set()
        try:
            yield
        finally:
            left = self.counts[function] - 1
            if left:
                self.counts[function] = left
            else:
                del self.counts[function]
                self.tried.pop(function, None)

    def depth(self, function: str) -> int:
        return self.counts.get(function, 0)

    @contextlib.contextmanager
    def trying(self, function: str) -> Iterator[None]:
        """A held request is being tried on an instance: it is not demand while that lasts (a
        non-streaming request is tried for its whole generation, on the instance that was made
        for it; counting it would scale the function out)."""
        self._trying[function] = self._trying.get(function, 0) + 1
        try:
            yield
        finally:
            self._trying[function] -= 1

    def missed(self, function: str, version: int) -> None:
        """Every instance of ``function`` in route table ``version`` refused a request."""
        self.tried[function] = max(self.tried.get(function, version), version)

    def demand(self, version: int | None = None) -> dict[str, int]:
        """Requests per function waiting now, not counting those being tried, nor (given the
        current route-table version) functions whose requests have not yet tried that table."""
        out = {fn: n - self._trying.get(fn, 0) for fn, n in self.counts.items()
               if version is None or self.tried.get(fn, -1) >= version}
        return {fn: n for fn, n in out.items() if n > 0}

    def wake(self, function: str) -> None:
        """Something changed for ``function`` (a request finished): waiters try again."""
        self.wakes[function] += 1
        ev = self._wake.pop(function, None)
        if ev is not None:
            ev.set()

    def woken(self, function: str) -> asyncio.Event:
        return self._wake.setdefault(function, asyncio.Event())


class DemandReporter:
    """Reports ``room.demand()`` to the autoscaler every ``interval_s`` while non-empty, and at once
    when a function starts waiting."""

    def __init__(self, room: WaitingRoom, source: RouteSource, routes: RouteView, interval_s: float = 0.5) -> None:
        # Activity rides along, so the autoscaler keeps serving functions alive even when its
        # status polls miss their short requests.
        self.room = room
        self.source = source
        self.routes = routes
        self.interval_s = interval_s

    async def run(self) -> None:
        while True:
            if not self.room.counts and not self.room.arrivals:
                self.room.arrived.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.room.arrived.wait(), self.interval_s)
                if not self.room.counts and not self.room.arrivals:
                    continue
            self.room.arrived.clear()
            arrived, self.room.arrivals = dict(sorted(self.room.arrivals.items())), Counter()
            try:
                version = self.routes.table.version
                await self.source.report_demand(self.room.demand(version), arrived, version)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # autoscaler restarting: the next report carries the demand
                log.debug("demand report failed: %r", e)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.room.arrived.wait(), self.interval_s)
