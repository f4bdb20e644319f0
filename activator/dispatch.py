"""Instance choice: send a request to the function's instance that admits it, waiting if none does.

Order: the function's ready instances with the most requests in flight (from this activator)
first, ties by instance id: load piles onto few instances so idle ones reach their keep-alive.
A runtime 429 (admission refused: compute, prefill, memory or context), 503 or 404 (the instance
is going or gone), a proxy's 502 or 504, or a connection failure means: try the next one. When all miss, the request
waits in the function's ``WaitingRoom`` (which drives the demand reported to the autoscaler) until
the routes change or one of the function's requests finishes, then tries again, until the
function's ``timeout_s`` has passed (``DispatchTimeout`` -> 504). Any other runtime answer (a
2xx, a 4xx about the request itself, or a 500: the pod failed on it) goes back to the caller as it is. A function with no
instance whose model a pod refused to load (the route table's ``unavailable``) is answered at
once (``FunctionUnavailable``): waiting would only end in a timeout.

Every try carries the ``slinfer-elapsed-s`` header: the time the client request has spent so far
(``Elapsed``: from its arrival, across holds and the instances it visits, less the waits while its
function had no instance, i.e. model loads, which the paper excuses), so the pod's deadlines for it
keep counting from its arrival rather than restart (``runtime.device.DeviceLoop.anchor``); a
continued stream's tries also carry ``slinfer-first-token-age-s``, when its first token came.

Held requests of a function retry through a gate (``RetryGate``): a few tries out at a time (a
window that starts at ``retry_slots`` and doubles while they are admitted), and none once one of
them has been refused by every instance since the last change (a finish, new routes, or the
recheck period); a fresh request's first try does not wait for it.

Errors raised (the app maps them to statuses): ``QueueFull`` (503), ``FunctionUnavailable`` (503),
``DispatchTimeout`` (504).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from activator.metrics import ActivatorMetrics
from activator.routes import Endpoint, RouteView
from activator.upstream import UpstreamClient, UpstreamError, UpstreamResponse
from activator.waiting import WaitingRoom
from functions import ELAPSED_HEADER, FIRST_TOKEN_AGE_HEADER, FunctionSpec

# Instance refuses (429), is going or gone (503, 404), or a proxy in front of it says so (502, 504).
# Any other answer, a 500 included (the pod failed on this request: elsewhere it would too), goes
# back to the client as it is.
RETRY_STATUSES = frozenset({404, 429, 502, 503, 504})
RECHECK_S = 0.25  # a waiting request re-tries at least this often (admission frees up by itself)
# A held request's try keeps its retry slot until the pod answers, or this long: a refusal comes
# back within a device step, while an admitted non-streaming request answers only when it is done.
RETRY_HANDOFF_S = 0.02
DEFAULT_RETRY_SLOTS = 2


class DispatchTimeout(Exception):
    def __init__(self, function: str, waited_s: float) -> None:
        super().__init__(f"function '{function}' found no capacity within its timeout "
                         f"({waited_s:.1f} s); retry later")
        self.function = function


class FunctionUnavailable(Exception):
    def __init__(self, function: str, why: str) -> None:
        super().__init__(f"function '{function}' cannot start: {why}")
        self.function = function


class FunctionDeleted(Exception):
    def __init__(self, function: str) -> None:
        super().__init__(f"function '{function}' was deleted while this request waited")
        self.function = function


class RetryGate:
    """How the held requests of one function retry. Without it every held request tries every
    instance on every change, and under a burst a pod spends more of its time refusing than
    serving (400 concurrent requests through `make run`: 14-31 refusals per request served).

    At most ``window`` tries are out at once. The window starts at ``slots``, doubles with each
    try the pod admits within RETRY_HANDOFF_S (up to ``MAX_WINDOW``: an idle fresh instance takes
    a crowd of held requests in a few rounds; a busy one answers later, and the window stays) and
    falls back to ``slots`` at a refusal, after which no held request tries until the next change
    (``refused``)."""

    MAX_WINDOW = 256

    def __init__(self, slots: int) -> None:
        self.slots = max(1, slots)
        self.window = self.slots
        self.out = 0  # tries holding a place in the window
        self.refused: tuple[int, int, int] | None = None  # the change after which one found no room
        self._queue: collections.deque[asyncio.Future[None]] = collections.deque()  # first come, first in

    async def enter(self) -> None:
        """Take a place in the window, waiting (in arrival order) while it is full."""
        if self.out < self.window and not self._queue:
            self.out += 1
            return
        turn = asyncio.get_running_loop().create_future()
        self._queue.append(turn)
        try:
            await turn  # leave() counted this place in ``out`` when it granted the turn
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():
                self.leave(admitted=None)  # granted, then cancelled: give the place on
            elif turn in self._queue:  # (leave() drops a cancelled turn it comes to)
                self._queue.remove(turn)
            raise

    def leave(self, admitted: bool | None) -> None:
        """Give a place back after a try the pod admitted (True), refused (False), or had not
        answered yet (None: the window stays as it is). Synchronous, so a cancellation cannot
        lose a place."""
        self.out -= 1
        if admitted is not None:
            self.window = min(self.MAX_WINDOW, self.window * 2) if admitted else self.slots
        while self._queue and self.out < self.window:
            turn = self._queue.popleft()
            if not turn.done():
                turn.set_result(None)
                self.out += 1


@dataclass
class Elapsed:
    """One client request's time before it reaches a pod, across every instance it visits."""

    arrived_s: float  # time.monotonic() when the client request arrived
    excused_s: float = 0.0  # held while its function had no instance: a model load
    first_token_at: float | None = None  # a continued stream's first token (a runtime reported it)

    def headers(self) -> dict[str, str]:
        now = time.monotonic()
        out = {ELAPSED_HEADER: f"{max(0.0, now - self.arrived_s - self.excused_s):.4f}"}
        if self.first_token_at is not None:
            out[FIRST_TOKEN_AGE_HEADER] = f"{max(0.0, now - self.first_token_at):.4f}"
        return out


@dataclass
class Upstream:
    """An open response from a runtime instance; ``close()`` releases it exactly once."""

    response: UpstreamResponse
    endpoint: Endpoint
    dispatcher: Dispatcher
    function: str
    waited_s: float
    _closed: bool = False

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self.response.aclose()
        self.dispatcher.release(self.function, self.endpoint)


class Dispatcher:
    def __init__(self, routes: RouteView, room: WaitingRoom, client: UpstreamClient,
                 metrics: ActivatorMetrics, retry_slots: int = DEFAULT_RETRY_SLOTS) -> None:
        self.routes = routes
        self.room = room
        self.client = client
        self.metrics = metrics
        self.retry_slots = retry_slots  # 0: no gate, every held request retries on every change
        self.inflight: dict[str, int] = {}  # by instance id; owned by the event loop
        self._gates: dict[str, RetryGate] = {}

    def _change(self, function: str) -> tuple[int, int, int]:
        """What held requests of ``function`` have seen change: finishes, routes, recheck periods."""
        return self.room.wakes[function], self.routes.table.version, int(time.monotonic() / RECHECK_S)

    async def _try_gated(self, gate: RetryGate, change: tuple[int, int, int], ep: Endpoint, path: str,
                         content: bytes, headers: dict[str, str]) -> UpstreamResponse | None | Literal[False]:
        """``_try`` holding a place in the function's retry window until the answer, or at most
        RETRY_HANDOFF_S; False, without trying, when a held request was refused everywhere since
        ``change``."""
        await gate.enter()
        if gate.refused == change:
            gate.leave(admitted=None)
            return False
        task = asyncio.ensure_future(self._try(ep, path, content, headers))
        held = True
        try:
            await asyncio.wait({task}, timeout=RETRY_HANDOFF_S)
            held = False
            answered = task.done() and not task.cancelled() and task.exception() is None
            gate.leave(admitted=(task.result() is not None) if answered else None)
            return await task
        finally:
            if held:  # cancelled while the try was out: give its place back, leak no connection
                gate.leave(admitted=None)
                if not task.done():
                    task.cancel()
                elif not task.cancelled() and task.exception() is None and (resp := task.result()) is not None:
                    asyncio.ensure_future(resp.aclose())

    def order(self, function: str) -> list[Endpoint]:
        eps = self.routes.table.endpoints_of(function)
        return sorted(eps, key=lambda e: (-self.inflight.get(e.instance_id, 0), e.instance_id))

    def release(self, function: str, ep: Endpoint, finished: bool = True) -> None:
        n = self.inflight.get(ep.instance_id, 1) - 1
        if n > 0:
            self.inflight[ep.instance_id] = n
        else:
            self.inflight.pop(ep.instance_id, None)
        if finished:  # a request left the instance: one that waits may fit now
            self.room.wake(function)

    async def _try(self, ep: Endpoint, path: str, content: bytes,
                   headers: dict[str, str]) -> UpstreamResponse | None:
        try:
            resp = await self.client.post(ep.url + path, content, headers)
        except UpstreamError:
            return None  # the pod is gone or restarting; the autoscaler re-places its instances
        if resp.status_code in RETRY_STATUSES:
            await resp.aclose()
            return None
        return resp

    async def open(self, spec: FunctionSpec, path: str, body: Mapping[str, Any], raw: bytes | None = None,
                   deadline: float | None = None, elapsed: Elapsed | None = None,
                   headers: Mapping[str, str] | None = None) -> Upstream:
        """An open response from an instance of ``spec`` (see the module doc). ``raw`` is the
        body already serialised (the client's own bytes, when they need no change); ``elapsed``
        the client request's clock (a new one from now if None), which this open adds to;
        ``headers`` more headers for the pod."""
        name = spec.name
        t0 = time.monotonic()
        elapsed = elapsed or Elapsed(t0)
        deadline = t0 + spec.timeout_s if deadline is None else deadline
        content = raw if raw is not None else json.dumps(body).encode()
        hdrs = {"content-type": "application/json", **(headers or {})}
        async with contextlib.AsyncExitStack() as stack:
            waiting = False
            while True:
                version = self.routes.table.version
                if name not in self.routes.table.functions:
                    raise FunctionDeleted(name)  # nothing will ever serve it: no wait until timeout_s
                endpoints = self.order(name)
                if not endpoints and (why := self.routes.table.unavailable.get(name)) is not None:
                    raise FunctionUnavailable(name, why)
                gate = self._gates.setdefault(name, RetryGate(self.retry_slots))
                change = self._change(name)
                for ep in endpoints:
                    gated = waiting and self.retry_slots > 0
                    if gated and gate.refused == change:
                        break  # another held request found no room since the last change: wait for one
                    self.inflight[ep.instance_id] = self.inflight.get(ep.instance_id, 0) + 1
                    hdrs.update(elapsed.headers())
                    try:
                        if gated:
                            with self.room.trying(name):
                                got = await self._try_gated(gate, change, ep, path, content, hdrs)
                            if got is False:
                                self.release(name, ep, finished=False)
                                break
                            resp = got
                        elif waiting:
                            with self.room.trying(name):
                                resp = await self._try(ep, path, content, hdrs)
                        else:
                            resp = await self._try(ep, path, content, hdrs)
                    except asyncio.CancelledError:  # the client left (or shutdown) mid-try
                        self.release(name, ep, finished=False)
                        raise
                    if resp is not None:
                        waited = time.monotonic() - t0
                        if waiting:
                            self.metrics.wait.labels(name).observe(waited)
                        return Upstream(resp, ep, self, name, waited)
                    self.release(name, ep, finished=False)
                else:
                    if endpoints:
                        gate.refused = change  # every instance refused it: held requests need not try
                self.room.missed(name, version)
                if not waiting:
                    stack.enter_context(self.room.hold(name))  # raises QueueFull
                    waiting = True
                    self.metrics.queue_depth.labels(name).inc()
                    stack.callback(self.metrics.queue_depth.labels(name).dec)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise DispatchTimeout(name, time.monotonic() - t0)
                held = time.monotonic()
                await self._wait_for_change(name, min(left, RECHECK_S))
                if not endpoints:  # nothing to refuse it: it waited for a load
                    elapsed.excused_s += time.monotonic() - held

    async def _wait_for_change(self, name: str, timeout_s: float) -> None:
        routes = asyncio.ensure_future(self.routes.changed(timeout_s))
        woken = asyncio.ensure_future(self.room.woken(name).wait())
        try:
            await asyncio.wait({routes, woken}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            routes.cancel()
            woken.cancel()
