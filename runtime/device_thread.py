"""The device's owner thread, and the asyncio-facing handle to it.

One thread owns the DeviceLoop (its instances, engines, KV budget, arbiter). The event loop
talks to it through a command queue: submit a request (admission runs in the device thread,
against the exact current state), abort one, or run a function between grants (load, unload,
evict, status). Outputs come back through per-request asyncio queues. Torch releases the GIL
while computing, so the HTTP side stays responsive during an iteration.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from runtime.core.admission import Decision
from runtime.core.arbiter import Grant
from runtime.core.ids import RequestId
from runtime.core.request import SamplingParams
from runtime.device import DeviceLoop
from runtime.engine.engine import RequestOutput

T = TypeVar("T")
log = logging.getLogger(__name__)
IDLE_TICK_S = 0.5  # when idle, the device still shrinks KV this often


class EngineDeadError(RuntimeError):
    pass


class AdmissionRefused(Exception):
    def __init__(self, decision: Decision):
        super().__init__(decision.detail)
        self.decision = decision


class InstanceUnavailable(Exception):
    pass


@dataclass(frozen=True)
class _Add:
    iid: str
    rid: RequestId
    prompt_ids: list[int]
    params: SamplingParams
    admission: bool
    # When the request reached the pod (time.monotonic): its deadlines count from here, so the
    # wait for the device thread to finish its current step is not free.
    received_s: float
    elapsed_s: float = 0.0  # spent before it reached the pod (DeviceLoop.anchor)
    first_token_age_s: float | None = None  # a continued stream's first token came this long ago


@dataclass(frozen=True)
class _Abort:
    iid: str
    rid: RequestId


@dataclass(frozen=True)
class _Call:
    fn: Callable[[DeviceLoop], Any]
    future: asyncio.Future[Any]
    delivers: bool  # fn returns (value, outputs): outputs go to their streams


class _Stop:
    pass


# after each grant: (device, grant, seconds of the grant); the arbiter's own cost is in device.stats
TickObserver = Callable[[DeviceLoop, Grant | None, float], None]


class AsyncDevice:
    def __init__(self, device: DeviceLoop, on_tick: TickObserver | None = None,
                 admittable: Callable[[str], bool] | None = None):
        self.device = device
        self.on_tick = on_tick
        self._admittable = admittable or (lambda iid: True)
        self._cmds: queue.SimpleQueue[_Add | _Abort | _Call | _Stop] = queue.SimpleQueue()
        self._streams: dict[RequestId, asyncio.Queue[RequestOutput | BaseException]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ids = itertools.count()
        self._error: BaseException | None = None
        # When the thread last came round its loop (a step, a command, or an idle tick): a
        # thread alive but stuck (a hung kernel, a deadlock) shows as time since this.
        self._beat = time.monotonic()

    # -- lifecycle --------------------------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._beat = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="device", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._cmds.put(_Stop())
        if self._thread is not None:
            self._thread.join(timeout=30)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stalled_s(self, now: float) -> float:
        """Seconds since the device thread last made progress (0 until it has started)."""
        return max(0.0, now - self._beat) if self._thread is not None else 0.0

    # -- asyncio side -----------------------------------------------------------------------
    def new_id(self, prefix: str) -> RequestId:
        return RequestId(f"{prefix}-{next(self._ids)}")

    async def call(self, fn: Callable[[DeviceLoop], T]) -> T:
        """Run fn(device) in the device thread between grants; return its result."""
        if not self.alive:
            raise EngineDeadError(f"device is not running: {self._error!r}")
        fut: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._cmds.put(_Call(fn, fut, delivers=False))
        return await fut

    async def call_delivering(self, fn: Callable[[DeviceLoop], tuple[T, list[RequestOutput]]]) -> T:
        """Like call, for functions that end requests (evictions): their final outputs reach
        the requests' streams before the result returns."""
        if not self.alive:
            raise EngineDeadError(f"device is not running: {self._error!r}")
        fut: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._cmds.put(_Call(fn, fut, delivers=True))
        return await fut

    async def generate(self, iid: str, rid: RequestId, prompt_ids: list[int], params: SamplingParams,
                       admission: bool = True, elapsed_s: float = 0.0,
                       first_token_age_s: float | None = None) -> AsyncGenerator[RequestOutput, None]:
        """Yield outputs until the request finishes. Raises AdmissionRefused before any output
        if the device refuses it. Closing the iterator early aborts the request, which frees
        its KV blocks before the next iteration. ``elapsed_s``: time the request spent before it
        reached this pod, which its deadlines keep counting, and ``first_token_age_s`` for a
        continued stream (``DeviceLoop.anchor``)."""
        if self._error is not None or not self.alive:
            raise EngineDeadError(f"device is not running: {self._error!r}")
        q: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self._streams[rid] = q
        self._cmds.put(_Add(iid, rid, prompt_ids, params, admission, time.monotonic(), elapsed_s, first_token_age_s))
        finished = False
        try:
            while True:
                item = await q.get()
                if isinstance(item, BaseException):
                    finished = True  # never admitted or device gone: nothing to abort
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self._streams.pop(rid, None)
            if not finished:
                self._cmds.put(_Abort(iid, rid))

    def _deliver(self, outs: list[RequestOutput]) -> None:
        for o in outs:
            q = self._streams.get(o.rid)
            if q is not None:
                q.put_nowait(o)

    def _fail(self, rid: RequestId, err: BaseException) -> None:
        q = self._streams.get(rid)
        if q is not None:
            q.put_nowait(err)

    def _fail_all(self, err: BaseException) -> None:
        for q in self._streams.values():
            q.put_nowait(err)

    # -- device thread ----------------------------------------------------------------------
    def _handle(self, cmd: _Add | _Abort | _Call) -> list[RequestOutput]:
        assert self._loop is not None
        dev, loop = self.device, self._loop
        if isinstance(cmd, _Add):
            inst = dev.instances.get(cmd.iid)
            if inst is None or not self._admittable(cmd.iid):
                loop.call_soon_threadsafe(self._fail, cmd.rid, InstanceUnavailable(cmd.iid))
                return []
            now = time.monotonic()
            try:
                received = min(cmd.received_s, now)
                anchor = dev.anchor(cmd.iid, len(cmd.prompt_ids), now, received, cmd.elapsed_s,
                                    cmd.params.resumed_tokens, cmd.first_token_age_s)
                if cmd.admission:
                    d = dev.admit(cmd.iid, len(cmd.prompt_ids), now, max_tokens=cmd.params.max_tokens, anchor=anchor,
                                  prefix=inst.engine.prefix_hit(cmd.prompt_ids, cmd.params))
                    if handed_back := dev.take_handed_back():  # a longer prompt gave way: it goes elsewhere
                        loop.call_soon_threadsafe(self._deliver, handed_back)
                    if not d.admitted:
                        loop.call_soon_threadsafe(self._fail, cmd.rid, AdmissionRefused(d))
                        return []
                inst.engine.add_request(cmd.rid, cmd.prompt_ids, cmd.params, anchor.arrival_s, anchor.resumed,
                                        anchor.first_token_s)
            except ValueError as e:  # the request's own fault (e.g. too long): a 400
                loop.call_soon_threadsafe(self._fail, cmd.rid, e)
            except Exception as e:  # our fault: this request fails, the device goes on
                log.exception("admitting %s failed", cmd.rid)
                loop.call_soon_threadsafe(self._fail, cmd.rid, EngineDeadError(f"internal error: {e!r}"))
        elif isinstance(cmd, _Abort):
            inst = dev.instances.get(cmd.iid)
            if inst is not None:
                inst.engine.abort(cmd.rid)
        else:
            try:
                result = cmd.fn(dev)
            except Exception as e:  # reported to the caller, the device keeps running
                loop.call_soon_threadsafe(_set_exc, cmd.future, e)
            else:
                if cmd.delivers:
                    result, outs = result
                    loop.call_soon_threadsafe(self._deliver, outs)
                loop.call_soon_threadsafe(_set_result, cmd.future, result)
        return []

    def _run(self) -> None:
        assert self._loop is not None
        loop, dev = self._loop, self.device
        try:
            while True:
                self._beat = time.monotonic()
                cmd: _Add | _Abort | _Call | _Stop | None
                if dev.has_work:
                    cmd = None
                else:
                    try:
                        cmd = self._cmds.get(timeout=IDLE_TICK_S)
                    except queue.Empty:
                        dev.plan_memory()  # idle: let instances shrink
                        if self.on_tick is not None:
                            self.on_tick(dev, None, 0.0)
                        continue
                while True:
                    if cmd is None:
                        try:
                            cmd = self._cmds.get_nowait()
                        except queue.Empty:
                            break
                    if isinstance(cmd, _Stop):
                        return
                    self._handle(cmd)
                    self._beat = time.monotonic()
                    cmd = None
                t0 = time.perf_counter()
                grant, outs = dev.step() if dev.has_work else (None, [])
                if outs:
                    loop.call_soon_threadsafe(self._deliver, outs)
                if self.on_tick is not None:
                    self.on_tick(dev, grant, time.perf_counter() - t0)
        except BaseException as e:  # surface to every waiting request instead of hanging them
            self._error = e
            if not loop.is_closed():
                loop.call_soon_threadsafe(self._fail_all, EngineDeadError(f"device failed: {e!r}"))
            raise


def _set_result(fut: asyncio.Future[Any], value: Any) -> None:
    if not fut.done():
        fut.set_result(value)


def _set_exc(fut: asyncio.Future[Any], err: BaseException) -> None:
    if not fut.done():
        fut.set_exception(err)
