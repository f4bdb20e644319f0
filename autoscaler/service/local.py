"""The embedded driver: runtime pods as child processes of this one, restarted when they die.

Each pod is ``python -m runtime.cli serve --no-functions`` with declared resources (device, torch
threads, KV budget, host weight cache) and the shared admin token (in its environment, not on
its command line). A pod keeps its port across restarts, so the autoscaler's node list never
changes; a restarted pod comes back empty and the autoscaler re-places what it lost.

Children run in their own session (a Ctrl-C at the terminal reaches only us, and we stop them in
order) and, on Linux, get SIGTERM if this process dies without stopping them.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import httpx

from autoscaler.core import DeviceKind, NodeId
from autoscaler.service.nodes import NodeSpec

log = logging.getLogger("slinfer.local")
REPO_ROOT = Path(__file__).resolve().parents[2]  # the folder holding runtime/, autoscaler/, ...


@dataclass(frozen=True)
class PodResources:
    device: DeviceKind = DeviceKind.CPU
    kv_budget_mb: int = 256
    weight_cache_mb: int = 2048
    memory_mb: int = 4096  # declared to the autoscaler: weights + KV this pod may hold
    threads: int | None = None
    max_request_mb: float | None = None  # the pods' body limit (None: their default)
    shutdown_drain_s: float | None = None  # on SIGTERM (None: their default)
    read_timeout_s: float | None = None  # the pods' limit on slow headers and bodies (None: their default)
    memory_limit_mb: int | None = None  # what each pod may use in all (None: its cgroup's and the host's)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def _die_with_parent() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class _Child:
    index: int
    port: int
    proc: subprocess.Popen[bytes] | None = None
    log_file: IO[bytes] | None = None
    restarts: int = 0
    failed_probes: int = 0  # liveness probes in a row that failed since it last answered healthy


class LocalPods:
    """``count`` runtime pods on ``host``; a ``NodeSource`` for the autoscaler."""

    def __init__(self, count: int, token: str, resources: PodResources = PodResources(), host: str = "127.0.0.1",
                 ports: list[int] | None = None, log_dir: Path | None = None, extra_env: dict[str, str] | None = None):
        if count < 1:
            raise ValueError(f"need at least one pod, got {count}")
        self.token = token
        self.resources = resources
        self.host = host
        self.log_dir = log_dir
        self.extra_env = dict(extra_env or {})
        ports = ports or [free_port(host) for _ in range(count)]
        self.children = [_Child(i, ports[i]) for i in range(count)]
        self._stopping = False

    def url(self, index: int) -> str:
        return f"http://{self.host}:{self.children[index].port}"

    def nodes(self) -> list[NodeSpec]:
        r = self.resources
        return [NodeSpec(NodeId(f"pod-{c.index}"), self.url(c.index), r.device, r.memory_mb << 20)
                for c in self.children]

    def _command(self, c: _Child) -> list[str]:
        r = self.resources
        cmd = [sys.executable, "-m", "runtime.cli", "serve", "--no-functions", "--host", self.host,
               "--port", str(c.port), "--device", r.device.value, "--kv-budget-mb", str(r.kv_budget_mb),
               "--weight-cache-mb", str(r.weight_cache_mb)]
        if r.threads:
            cmd += ["--threads", str(r.threads)]
        if r.max_request_mb is not None:
            cmd += ["--max-request-mb", str(r.max_request_mb)]
        if r.read_timeout_s is not None:
            cmd += ["--read-timeout-s", str(r.read_timeout_s)]
        if r.shutdown_drain_s is not None:
            cmd += ["--shutdown-drain-s", str(r.shutdown_drain_s)]
        if r.memory_limit_mb is not None:
            cmd += ["--memory-limit-mb", str(r.memory_limit_mb)]
        return cmd

    def _spawn(self, c: _Child) -> None:
        env = {**os.environ, **self.extra_env, "SLINFER_ADMIN_TOKEN": self.token,
               "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            if c.log_file is None:
                c.log_file = open(self.log_dir / f"pod-{c.index}.log", "ab")  # noqa: SIM115 - closed in stop()
        out = c.log_file if c.log_file is not None else subprocess.DEVNULL
        c.proc = subprocess.Popen(self._command(c), cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, start_new_session=True,
                                  preexec_fn=_die_with_parent if sys.platform == "linux" else None)
        log.info("started pod-%d (pid %d) on port %d", c.index, c.proc.pid, c.port)

    def start(self) -> None:
        for c in self.children:
            self._spawn(c)

    async def wait_ready(self, timeout_s: float = 120.0) -> None:
        """Until every pod answers /healthz."""
        deadline = time.monotonic() + timeout_s
        async with httpx.AsyncClient() as client:
            for c in self.children:
                while True:
                    with contextlib.suppress(httpx.HTTPError):
                        if (await client.get(self.url(c.index) + "/healthz", timeout=2)).status_code == 200:
                            break
                    if c.proc is not None and c.proc.poll() is not None and not self._stopping:
                        self._spawn(c)
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"pod-{c.index} did not become healthy in {timeout_s} s "
                                           f"(log: {self.log_dir})")
                    await asyncio.sleep(0.1)

    async def supervise(self, poll_s: float = 0.2, probe_s: float = 10.0, probe_timeout_s: float = 5.0,
                        failure_threshold: int = 3) -> None:
        """Restart pods that exit, and, as a kubelet's liveness probe does (its defaults: every
        10 s, 3 failures), kill and restart one whose /healthz fails or times out that many times
        in a row: a stuck device thread, a frozen process. Until cancelled."""
        next_probe = time.monotonic() + probe_s
        async with httpx.AsyncClient() as client:
            while True:
                for c in self.children:
                    if not self._stopping and c.proc is not None and c.proc.poll() is not None:
                        log.warning("pod-%d exited with %s; restarting it", c.index, c.proc.returncode)
                        c.restarts += 1
                        c.failed_probes = 0
                        self._spawn(c)
                if time.monotonic() >= next_probe:
                    next_probe = time.monotonic() + probe_s
                    await asyncio.gather(*(self._probe(client, c, probe_timeout_s, failure_threshold)
                                           for c in self.children))
                await asyncio.sleep(poll_s)

    async def _probe(self, client: httpx.AsyncClient, c: _Child, timeout_s: float, threshold: int) -> None:
        if self._stopping or c.proc is None or c.proc.poll() is not None:
            return
        try:
            r = await client.get(self.url(c.index) + "/healthz", timeout=timeout_s)
        except httpx.ConnectError:
            return  # not listening yet (starting): not a liveness failure
        except httpx.HTTPError as e:
            why = f"no answer ({type(e).__name__})"
        else:
            if r.status_code == 200 or "terminating" in r.text:  # (a pod shutting down exits by itself)
                c.failed_probes = 0
                return
            why = r.text[:200]
        c.failed_probes += 1
        if c.failed_probes >= threshold and not self._stopping:
            log.warning("pod-%d failed %d liveness probes in a row (%s); killing and restarting it",
                        c.index, c.failed_probes, why)
            c.proc.kill()  # the loop above restarts it

    def kill(self, index: int) -> int:
        """SIGKILL one pod (fault injection); the supervisor restarts it. Returns its old pid."""
        c = self.children[index]
        assert c.proc is not None
        c.proc.kill()
        c.proc.wait()
        return c.proc.pid

    def terminate(self, index: int) -> None:
        """SIGTERM one pod, as Kubernetes ends one (a rolling update, a drain): it hands its running
        requests off and exits; the supervisor restarts it."""
        c = self.children[index]
        assert c.proc is not None
        c.proc.terminate()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Terminate every pod, wait for it, kill what does not exit; reap all."""
        self._stopping = True
        procs = [c.proc for c in self.children if c.proc is not None and c.proc.poll() is None]
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                p.terminate()
        deadline = time.monotonic() + timeout_s
        for p in procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for c in self.children:
            if c.log_file is not None:
                c.log_file.close()
                c.log_file = None
