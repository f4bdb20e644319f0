"""The engine's owner thread, and the asyncio-facing handle to it.

One thread owns the LLMEngine (its scheduler, KV pool and model); the event loop talks to it
through a command queue and receives outputs through per-request asyncio queues. Torch releases
the GIL while computing, so the server stays responsive during a step.
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass

from runtime.core.ids import RequestId
from runtime.core.request import SamplingParams
from runtime.engine.engine import LLMEngine, RequestOutput


@dataclass(frozen=True)
class _Add:
    rid: RequestId
    prompt_ids: list[int]
    params: SamplingParams


@dataclass(frozen=True)
class _Abort:
    rid: RequestId


class _Stop:
    pass


class EngineDeadError(RuntimeError):
    pass


StepObserver = Callable[[LLMEngine, float | None], None]  # step seconds, None: state changed


class AsyncEngine:
    def __init__(self, engine: LLMEngine, on_step: StepObserver | None = None):
        self.engine = engine
        self._cmds: queue.SimpleQueue[_Add | _Abort | _Stop] = queue.SimpleQueue()
        self._streams: dict[RequestId, asyncio.Queue[RequestOutput | BaseException]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._on_step = on_step
        self._ids = itertools.count()
        self._error: BaseException | None = None

    # -- lifecycle --------------------------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._cmds.put(_Stop())
        if self._thread is not None:
            self._thread.join(timeout=30)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- asyncio side -----------------------------------------------------------------------
    def new_id(self, prefix: str) -> RequestId:
        return RequestId(f"{prefix}-{next(self._ids)}")

    async def generate(self, rid: RequestId, prompt_ids: list[int], params: SamplingParams) -> AsyncGenerator[RequestOutput, None]:
        """Yield outputs until the request finishes. Closing the iterator early (client gone)
        aborts the request, which frees its KV blocks before the next step."""
        if self._error is not None or not self.alive:
            raise EngineDeadError(f"engine is not running: {self._error!r}")
        q: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self._streams[rid] = q
        self._cmds.put(_Add(rid, prompt_ids, params))
        finished = False
        try:
            while True:
                item = await q.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self._streams.pop(rid, None)
            if not finished:
                self._cmds.put(_Abort(rid))

    def _deliver(self, outs: list[RequestOutput]) -> None:
        for o in outs:
            q = self._streams.get(o.rid)
            if q is not None:
                q.put_nowait(o)

    def _fail_all(self, err: BaseException) -> None:
        for q in self._streams.values():
            q.put_nowait(err)

    def _fail_one(self, rid: RequestId, err: BaseException) -> None:
        q = self._streams.get(rid)
        if q is not None:
            q.put_nowait(err)

    # -- engine thread ----------------------------------------------------------------------
    def _run(self) -> None:
        assert self._loop is not None
        loop, eng = self._loop, self.engine
        try:
            while True:
                cmd = None if eng.has_work else self._cmds.get()
                handled = cmd is not None
                while True:
                    if cmd is None:
                        try:
                            cmd = self._cmds.get_nowait()
                            handled = True
                        except queue.Empty:
                            break
                    if isinstance(cmd, _Stop):
                        return
                    if isinstance(cmd, _Add):
                        try:
                            eng.add_request(cmd.rid, cmd.prompt_ids, cmd.params, time.monotonic())
                        except ValueError as e:
                            loop.call_soon_threadsafe(self._fail_one, cmd.rid, e)
                    else:
                        eng.abort(cmd.rid)
                    cmd = None
                if handled and not eng.has_work and self._on_step is not None:
                    self._on_step(eng, None)  # e.g. an abort emptied the engine: refresh gauges
                if eng.has_work:
                    t0 = time.perf_counter()
                    outs = eng.step()
                    if outs:
                        loop.call_soon_threadsafe(self._deliver, outs)
                    if self._on_step is not None:
                        self._on_step(eng, time.perf_counter() - t0)
        except BaseException as e:  # surface to every waiting request instead of hanging them
            self._error = e
            if not loop.is_closed():
                loop.call_soon_threadsafe(self._fail_all, EngineDeadError(f"engine failed: {e!r}"))
            raise
