"""The activator's view of where functions run: a versioned route table it receives, never builds.

The autoscaler owns placement and publishes a ``RouteTable`` (deployed functions + their ready
instances) with a version that grows on every change. The activator only reads it through
``RouteView``; the seam to the autoscaler is ``RouteSource`` (long-poll for the next version, and
demand signals back), so tests can hand the activator a fixed table.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx

from functions import FunctionSpec, parse_function_spec

log = logging.getLogger("slinfer.activator.routes")


@dataclass(frozen=True)
class Endpoint:
    """One ready instance of a function: where to send its requests."""

    instance_id: str
    node_id: str
    url: str  # base URL of the runtime pod, e.g. http://127.0.0.1:9001


@dataclass(frozen=True)
class RouteTable:
    version: int = 0
    functions: Mapping[str, FunctionSpec] = field(default_factory=dict)
    endpoints: Mapping[str, tuple[Endpoint, ...]] = field(default_factory=dict)
    unavailable: Mapping[str, str] = field(default_factory=dict)  # function -> why it cannot start
    # base URLs of pods the autoscaler took as gone (dead or frozen, not shutting down in order):
    # what is in flight there will not finish, so the activator cuts it and moves it elsewhere
    gone: tuple[str, ...] = ()

    def endpoints_of(self, name: str) -> tuple[Endpoint, ...]:
        return self.endpoints.get(name, ())

    def to_json(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "functions": [s.to_dict() for _, s in sorted(self.functions.items())],
            "endpoints": {name: [{"instance_id": e.instance_id, "node_id": e.node_id, "url": e.url} for e in eps]
                          for name, eps in sorted(self.endpoints.items())},
            "unavailable": dict(sorted(self.unavailable.items())),
            "gone": list(self.gone),
        }

    @staticmethod
    def from_json(data: Mapping[str, Any]) -> RouteTable:
        specs = [parse_function_spec(d) for d in data.get("functions", [])]
        eps = {name: tuple(Endpoint(e["instance_id"], e["node_id"], e["url"]) for e in lst)
               for name, lst in dict(data.get("endpoints", {})).items()}
        unavailable = {str(k): str(v) for k, v in dict(data.get("unavailable", {})).items()}
        gone = tuple(str(u) for u in data.get("gone", []))
        return RouteTable(int(data["version"]), {s.name: s for s in specs}, eps, unavailable, gone)


class RouteSource(Protocol):
    """The activator's link to the autoscaler."""

    async def next_table(self, after_version: int) -> RouteTable:
        """The table once its version is > ``after_version`` (or the current one after a while)."""
        ...

    async def report_demand(self, waiting: Mapping[str, int], arrived: Mapping[str, int] | None = None,
                            routes_version: int = 0) -> None:
        """Requests per function that no instance admitted and are waiting now, the client requests
        that arrived per function since the last report, and the route table version the misses saw."""
        ...


class RouteView:
    """The current table and a wake-up for whoever waits for a change. Owned by one task
    (``follow``); readers only read ``table`` and await ``changed()``."""

    def __init__(self, table: RouteTable | None = None, on_gone: Callable[[str], None] | None = None) -> None:
        self.table = table or RouteTable()
        self._changed = asyncio.Event()
        self.on_gone = on_gone  # called with each pod URL that newly appears in ``gone``

    def publish(self, table: RouteTable) -> None:
        if table.version == self.table.version and table == self.table:
            return
        if self.on_gone is not None:
            for url in sorted(set(table.gone) - set(self.table.gone)):
                self.on_gone(url)
        self.table = table
        self._changed.set()
        self._changed = asyncio.Event()

    async def changed(self, timeout_s: float) -> None:
        """Return when the table changes or after ``timeout_s``."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), timeout_s)

    async def follow(self, source: RouteSource, retry_s: float = 0.2) -> None:
        """Keep ``table`` current from ``source`` until cancelled; survives autoscaler restarts."""
        while True:
            try:
                self.publish(await source.next_table(self.table.version))
            except asyncio.CancelledError:
                raise
            except Exception as e:  # the autoscaler restarting or unreachable: keep the old table
                log.debug("route table fetch failed: %r", e)
                await asyncio.sleep(retry_s)


class HTTPRouteSource:
    """The autoscaler's HTTP API: ``GET /routes?after=V`` (long-poll) and ``POST /demand``."""

    def __init__(self, base_url: str, token: str, client: httpx.AsyncClient, poll_s: float = 20.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {token}"}
        self.client = client
        self.poll_s = poll_s

    async def next_table(self, after_version: int) -> RouteTable:
        r = await self.client.get(f"{self.base_url}/routes", params={"after": after_version, "wait_s": self.poll_s},
                                  headers=self.headers, timeout=self.poll_s + 5)
        r.raise_for_status()
        return RouteTable.from_json(r.json())

    async def report_demand(self, waiting: Mapping[str, int], arrived: Mapping[str, int] | None = None,
                            routes_version: int = 0) -> None:
        arrived = dict(arrived or {})
        body = {"waiting": dict(waiting), "active": sorted(arrived), "arrived": arrived, "routes_version": routes_version}
        r = await self.client.post(f"{self.base_url}/demand", json=body,
                                   headers=self.headers, timeout=5)
        r.raise_for_status()


class StaticRouteSource:
    """A fixed table (tests, or an activator pointed at pods by hand); demand is recorded only."""

    def __init__(self, table: RouteTable) -> None:
        self.table = table
        self.demand: list[dict[str, int]] = []
        self.arrived: dict[str, int] = {}  # requests that arrived per function, summed over the reports

    async def next_table(self, after_version: int) -> RouteTable:
        if self.table.version <= after_version:
            await asyncio.sleep(3600)
        return self.table

    async def report_demand(self, waiting: Mapping[str, int], arrived: Mapping[str, int] | None = None,
                            routes_version: int = 0) -> None:
        self.demand.append(dict(waiting))
        for fn, n in (arrived or {}).items():
            self.arrived[fn] = self.arrived.get(fn, 0) + n
