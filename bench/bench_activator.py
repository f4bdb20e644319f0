"""Activator benchmark on the bundled SmolLM2-135M: what the activator adds, and cold vs warm TTFT.

Runs `slinfer up` (one runtime pod, a child process) and measures from this process:
  overhead   the same request sent straight to the runtime pod and through the activator,
             interleaved pairs, non-streaming (1 output token) and streaming (time to the first
             content chunk); overhead = quantile(through activator) - quantile(direct). The
             headline uses a tiny random model (~10 ms a request): what the activator adds does
             not depend on the model, and SmolLM2's own run-to-run spread on a shared 2-core host
             (tens of ms) would swamp a millisecond difference; SmolLM2's figure is printed too
  warm TTFT  streaming TTFT through the activator with the instance loaded
  cold TTFT  streaming TTFT through the activator with the function unloaded (keep-alive 0, so
             it unloads after every request): weights in the pod's host cache; then in a second
             mesh whose pods keep no host cache (--weight-cache-mb 0), weights read from disk
The LAST line printed is one JSON object (see the keys at the bottom).

Usage: python bench/bench_activator.py [--pairs 400] [--cold-reps 5]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
MODEL = "bundled:smollm2-135m-instruct"
ECHO = "random:llama-tiny?seed=0"  # ~10 ms per request: keeps the runtime's own noise out of the difference
PROMPT = [{"role": "user", "content": "What is the capital of France?"}]


def spec_yaml(name: str, keep_alive_s: float, model: str = MODEL) -> str:
    # A loose SLO: this measures the path, not admission (which may refuse a tight TTFT on a
    # shared 2-core host, and the request would then wait instead of being timed).
    return (f"name: {name}\nmodel: {model}\nmax_context_tokens: 512\nmax_output_tokens: 64\n"
            f"slo: {{ttft_base_s: 10s, tpot_s: 2s}}\n"
            f"keep_alive_s: {keep_alive_s}\nmax_instances: 1\ntimeout_s: 120\n")


@contextmanager
def mesh(weight_cache_mb: int) -> Iterator[dict[str, Any]]:
    """`slinfer up` in a child process with one pod; yields its up.json."""
    with tempfile.TemporaryDirectory(prefix="slinfer-bench-") as tmp:
        fdir = Path(tmp) / "functions"
        fdir.mkdir()
        (fdir / "warm.yaml").write_text(spec_yaml("warm", 3600))
        (fdir / "cold.yaml").write_text(spec_yaml("cold", 0))
        (fdir / "echo.yaml").write_text(spec_yaml("echo", 3600, ECHO))
        state = Path(tmp) / "state"
        ports = [str(_free_port()), str(_free_port())]
        cmd = [sys.executable, "-m", "runtime.cli", "up", "--pods", "1", "--functions-dir", str(fdir),
               "--port", ports[0], "--autoscaler-port", ports[1], "--state-dir", str(state),
               "--weight-cache-mb", str(weight_cache_mb), "--kv-budget-mb", "256", "--log-level", "warning"]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 180
            while not (state / "up.json").exists():
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"slinfer up did not start (see {state}/logs)")
                time.sleep(0.1)
            yield json.loads((state / "up.json").read_text())
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def hosted(info: dict[str, Any], function: str) -> bool:
    st = httpx.get(info["autoscaler"] + "/status", headers={"Authorization": f"Bearer {info['token']}"}).json()
    return any(i["function"] == function for n in st["nodes"] for i in n["instances"])


def wait_unloaded(info: dict[str, Any], function: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while hosted(info, function):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{function} was not unloaded")
        time.sleep(0.05)


def call(client: httpx.Client, base: str, model: str, stream: bool, max_tokens: int = 1) -> float:
    """Seconds until the answer (non-streaming) or the stream's first chunk (streaming)."""
    body = {"model": model, "messages": PROMPT, "temperature": 0, "max_tokens": max_tokens, "stream": stream}
    t0 = time.perf_counter()
    if not stream:
        r = client.post(base + "/v1/chat/completions", json=body)
        r.raise_for_status()
        return time.perf_counter() - t0
    first = None
    with client.stream("POST", base + "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if first is None and line.startswith("data: {"):  # the runtime sends its first chunk
                first = time.perf_counter() - t0  # once the first token exists (role + token)
    if first is None:
        raise RuntimeError("the stream had no content")
    return first


def quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def overhead(client: httpx.Client, act: str, pod: str, pairs: int, stream: bool,
             model: str) -> dict[str, float]:
    direct: list[float] = []
    via: list[float] = []
    for i in range(pairs):  # interleaved, alternating which goes first
        order = [(pod, direct), (act, via)] if i % 2 == 0 else [(act, via), (pod, direct)]
        for base, out in order:
            out.append(call(client, base, model, stream))
    return {"direct_p50_ms": quantile(direct, 0.5) * 1e3, "via_p50_ms": quantile(via, 0.5) * 1e3,
            "overhead_p50_ms": (quantile(via, 0.5) - quantile(direct, 0.5)) * 1e3,
            "overhead_p99_ms": (quantile(via, 0.99) - quantile(direct, 0.99)) * 1e3}


def cold_ttfts(client: httpx.Client, info: dict[str, Any], reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        wait_unloaded(info, "cold")
        out.append(call(client, info["activator"], "cold", stream=True))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=400)
    ap.add_argument("--cold-reps", type=int, default=5)
    a = ap.parse_args()
    result: dict[str, Any] = {}
    with httpx.Client(timeout=300) as client:
        with mesh(weight_cache_mb=2048) as info:
            act, pod = info["activator"], info["pods"][0]
            for model in ("warm", "echo"):  # scale from zero, then warm up both paths
                call(client, act, model, stream=False)
                for _ in range(10):
                    call(client, pod, model, stream=True)
                    call(client, act, model, stream=True)
            runs = {}
            for model, pairs in (("echo", a.pairs), ("warm", max(20, min(50, a.pairs // 4)))):
                for stream in (False, True):
                    r = runs[model, stream] = overhead(client, act, pod, pairs, stream, model)
                    what = "streaming TTFT" if stream else "non-streaming, 1 token"
                    label = "tiny model" if model == "echo" else "SmolLM2"
                    print(f"{label}, {what}, {pairs} interleaved pairs: direct p50 {r['direct_p50_ms']:.2f} ms, "
                          f"via activator {r['via_p50_ms']:.2f} ms; overhead p50 {r['overhead_p50_ms']:.2f} ms, "
                          f"p99 {r['overhead_p99_ms']:.2f} ms", flush=True)
            warm = statistics.median(call(client, act, "warm", stream=True) for _ in range(20))
            call(client, act, "cold", stream=True)  # first load: profiles the model, fills the host cache
            cached = cold_ttfts(client, info, a.cold_reps)
            print(f"warm TTFT {warm * 1e3:.0f} ms; cold TTFT, weights in host cache: "
                  f"{', '.join(f'{x * 1e3:.0f}' for x in cached)} ms", flush=True)
        with mesh(weight_cache_mb=0) as info:
            call(client, info["activator"], "cold", stream=True)  # imports and profile, not counted
            disk = cold_ttfts(client, info, a.cold_reps)
            print(f"cold TTFT, weights from disk: {', '.join(f'{x * 1e3:.0f}' for x in disk)} ms")
    plain, streamed = runs["echo", False], runs["echo", True]
    result = {  # the headline overhead: the worse of streaming TTFT and non-streaming, tiny model
        "overhead_p50_ms": round(max(plain["overhead_p50_ms"], streamed["overhead_p50_ms"]), 3),
        "overhead_p99_ms": round(max(plain["overhead_p99_ms"], streamed["overhead_p99_ms"]), 3),
        "overhead_nonstream_p50_ms": round(plain["overhead_p50_ms"], 3),
        "overhead_stream_ttft_p50_ms": round(streamed["overhead_p50_ms"], 3),
        "overhead_smollm2_p50_ms": round(max(runs["warm", False]["overhead_p50_ms"],
                                             runs["warm", True]["overhead_p50_ms"]), 3),
        "cold_ttft_cached_s": round(statistics.median(cached), 4),
        "cold_ttft_disk_s": round(statistics.median(disk), 4),
        "warm_ttft_s": round(warm, 4),
        "pairs": a.pairs,
    }
    ok = result["overhead_p50_ms"] < 2.0 and result["cold_ttft_cached_s"] < 1.0 + result["warm_ttft_s"]
    print(f"targets (overhead p50 < 2 ms; cold from cache < 1 s + warm): {'met' if ok else 'NOT met'}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
