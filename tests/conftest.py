"""Shared fixtures: a real uvicorn server on a free local port, and one serving two tiny models."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit

import pytest
import uvicorn
from fastapi import FastAPI

from functions import FunctionSpec
from runtime.engine.engine import LLMEngine
from runtime.pod import Pod, PodConfig
from runtime.server.app import create_app

# One pod, 32 MiB of KV shared by its instances, tiny profiling so start-up stays fast.
TINY_POD = PodConfig(block_size=16, kv_budget_bytes=32 * 1024 * 1024, profile_prefill=(16, 64),
                     profile_decode=((64, (1, 4)),))
ADMIN_TOKEN = "test-admin-token"
TINY_MODELS = {"tiny": "random:llama-tiny?seed=0", "tiny-qwen": "random:qwen2-tiny?seed=1"}


@contextmanager
def serve_app(app: FastAPI, startup_timeout_s: float = 30.0, http: Any = "auto") -> Iterator[str]:
    """Run `app` under uvicorn on 127.0.0.1 in a background thread; yield its base URL.

    The socket is bound here (port 0) and handed to uvicorn, so no other process can take the
    port between choosing and binding it."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                            timeout_graceful_shutdown=5, http=http)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name=f"uvicorn-{port}",
                              daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + startup_timeout_s
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError("uvicorn exited during startup (see the log above)")
            if time.monotonic() > deadline:
                raise TimeoutError(f"uvicorn did not start within {startup_timeout_s} s")
            time.sleep(0.01)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def tiny_spec(name: str, ref: str, max_context_tokens: int = 256, **kw: object) -> FunctionSpec:
    return FunctionSpec(name=name, model=ref, max_context_tokens=max_context_tokens,
                        max_output_tokens=max_context_tokens - 1, **kw)  # type: ignore[arg-type]


def make_app(functions: list[FunctionSpec], config: PodConfig = TINY_POD) -> FastAPI:
    return create_app(Pod(config), admin_token=ADMIN_TOKEN, functions=functions)


@pytest.fixture(scope="module")
def tiny_server() -> Iterator[str]:
    """Base URL of a live server with "tiny" (Llama shape) and "tiny-qwen" (Qwen2 shape), both
    random weights with a byte tokenizer, block_size 16, 4 MiB of KV, max_model_len 256."""
    app = make_app([tiny_spec(name, ref) for name, ref in TINY_MODELS.items()])
    with serve_app(app) as base_url:
        yield base_url


@pytest.fixture
def paced_device(monkeypatch: pytest.MonkeyPatch) -> float:
    """Every engine step in this process takes at least 10 ms more, as on a slower device.

    Tests that act mid-stream (evict on the first token) otherwise race a tiny model that can
    finish 200 steps inside one admin call on a fast machine. Returns the added seconds per step."""
    pause = 0.01
    step = LLMEngine.step

    def paced(self: LLMEngine, *args: object, **kw: object) -> object:
        time.sleep(pause)
        return step(self, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(LLMEngine, "step", paced)
    return pause


def slow_post(url: str, head: bytes, parts: list[bytes], pause_s: float, wait_s: float) -> tuple[bytes, float]:
    """Send ``head`` then ``parts`` of a body ``pause_s`` apart over a raw socket, then wait up to
    ``wait_s`` for the answer: (what came back, seconds from the last part to the answer)."""
    u = urlsplit(url)
    with socket.create_connection((u.hostname, u.port), timeout=wait_s) as sock:
        sock.sendall(head)
        for part in parts:
            time.sleep(pause_s)
            sock.sendall(part)
        t0 = time.monotonic()
        got = b""
        try:
            while b"\r\n\r\n" not in got or not got.rstrip().endswith(b"}"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                got += chunk
        except TimeoutError:
            pass
        return got, time.monotonic() - t0
