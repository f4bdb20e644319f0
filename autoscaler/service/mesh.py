"""The embedded mesh (``slinfer up``): runtime pods as children, the autoscaler and the activator,
all driven from one event loop in this process. Three HTTP servers on loopback: the activator
(the only one users call), the autoscaler API, and each pod (reached only by those two).

The autoscaler can be restarted on its own (``restart_autoscaler``): the pods keep running and
the activator keeps its waiting requests, re-reporting their demand until the new autoscaler
places them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from activator.app import ActivatorSettings, create_app
from autoscaler.service.api import create_api
from autoscaler.service.controller import Controller, ControllerSettings
from autoscaler.service.local import LocalPods, PodResources, free_port
from functions import FunctionSpec
from functions.http import BodyLimit, http_protocol

log = logging.getLogger("slinfer.mesh")


@dataclass(frozen=True)
class MeshSettings:
    functions: tuple[FunctionSpec, ...]
    token: str
    pods: int = 2
    host: str = "127.0.0.1"
    port: int = 8080  # the activator; 0 picks a free port
    autoscaler_port: int = 8081
    resources: PodResources = field(default_factory=PodResources)
    state_dir: Path | None = None  # logs, deployed functions
    controller: ControllerSettings | None = None
    activator: ActivatorSettings | None = None
    log_level: str = "warning"


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop when installed (uvicorn's own choice, and about a third less per-request overhead
    in the activator), else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


class _Server(uvicorn.Server):
    """A uvicorn server that leaves signals to the mesh (several servers share one loop)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


class Mesh:
    def __init__(self, settings: MeshSettings) -> None:
        self.settings = settings
        s = settings
        self.port = s.port or free_port(s.host)
        self.autoscaler_port = s.autoscaler_port or free_port(s.host)
        logs = s.state_dir / "logs" if s.state_dir else None
        self.pods = LocalPods(s.pods, s.token, s.resources, s.host, log_dir=logs)
        self.controller: Controller | None = None
        self._client: httpx.AsyncClient | None = None
        self._tasks: dict[str, asyncio.Task[Any]] = {}
        self._servers: dict[str, _Server] = {}

    @property
    def url(self) -> str:
        return f"http://{self.settings.host}:{self.port}"

    @property
    def autoscaler_url(self) -> str:
        return f"http://{self.settings.host}:{self.autoscaler_port}"

    async def _serve(self, name: str, app: Any, port: int) -> None:
        read_timeout_s = (self.settings.activator or ActivatorSettings()).read_timeout_s
        config = uvicorn.Config(app, host=self.settings.host, port=port, log_level=self.settings.log_level,
                                timeout_graceful_shutdown=3, lifespan="on", http=http_protocol(read_timeout_s))
        server = self._servers[name] = _Server(config)
        self._tasks[name] = asyncio.create_task(server.serve(), name=name)
        while not server.started:
            if self._tasks[name].done():
                self._tasks[name].result()  # raises why it failed (port taken, ...)
                raise RuntimeError(f"{name} exited during start-up")
            await asyncio.sleep(0.01)

    async def start(self) -> None:
        s = self.settings
        self.pods.start()
        self._tasks["supervisor"] = asyncio.create_task(self.pods.supervise(), name="supervisor")
        await self.pods.wait_ready()
        self._client = httpx.AsyncClient(limits=httpx.Limits(max_connections=200))
        await self.start_autoscaler()
        act = s.activator or ActivatorSettings()
        act = ActivatorSettings(**{**act.__dict__, "autoscaler_url": self.autoscaler_url, "token": s.token})
        await self._serve("activator", create_app(act), self.port)

    async def start_autoscaler(self) -> None:
        s = self.settings
        assert self._client is not None
        store = s.state_dir / "functions" if s.state_dir else None
        self.controller = Controller(self.pods, {f.name: f for f in s.functions},
                                     s.controller or ControllerSettings(s.token), self._client, store_dir=store)
        self._tasks["controller"] = asyncio.create_task(self.controller.run(), name="controller")
        act = s.activator or ActivatorSettings()  # the same body limits as the activator's
        api = BodyLimit(create_api(self.controller, s.token), act.max_request_bytes, act.read_timeout_s)
        await self._serve("autoscaler", api, self.autoscaler_port)

    async def stop_autoscaler(self) -> None:
        if self.controller is not None:
            self.controller.close()
        await self._stop("autoscaler")
        await self._stop("controller")
        self.controller = None

    async def restart_autoscaler(self) -> None:
        await self.stop_autoscaler()
        await self.start_autoscaler()

    async def _stop(self, name: str) -> None:
        server = self._servers.pop(name, None)
        task = self._tasks.pop(name, None)
        if server is not None:
            server.should_exit = True
        if task is not None:
            if server is None:
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(task, 10)

    async def stop(self) -> None:
        await self._stop("activator")
        await self.stop_autoscaler()
        await self._stop("supervisor")
        self.pods.stop()
        if self._client is not None:
            await self._client.aclose()

    async def run_until(self, stop: asyncio.Event) -> None:
        await self.start()
        try:
            await stop.wait()
        finally:
            await self.stop()


@contextlib.contextmanager
def mesh_in_thread(settings: MeshSettings, timeout_s: float = 180.0) -> Iterator[MeshHandle]:
    """Run a Mesh on its own event loop in a background thread (tests, benchmarks)."""
    import threading

    loop = new_event_loop()
    mesh = Mesh(settings)
    thread = threading.Thread(target=loop.run_forever, name="mesh", daemon=True)
    thread.start()
    handle = MeshHandle(mesh, loop)
    try:
        handle.call(mesh.start(), timeout_s)
        yield handle
    finally:
        with contextlib.suppress(Exception):
            handle.call(mesh.stop(), 60)
        mesh.pods.stop()  # in case start failed half-way
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()


@dataclass
class MeshHandle:
    mesh: Mesh
    loop: asyncio.AbstractEventLoop

    def call(self, coro: Any, timeout_s: float = 60.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    @property
    def url(self) -> str:
        return self.mesh.url

    @property
    def autoscaler_url(self) -> str:
        return self.mesh.autoscaler_url
