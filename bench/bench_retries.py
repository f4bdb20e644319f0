"""How held requests retry under a burst: the activator's retry gate against none.

A mesh of one runtime pod (a tiny random model, so the device is not what is measured) gets bursts
of concurrent streaming requests through the activator. Two scenarios:
  warm   --requests (300) streams of --tokens (200) tokens on a loaded instance: more than it
         admits at once, so most are held and retried as room frees
  cold   --cold-requests (60) streams of 30 tokens while the function is scaled to zero: all are
         held through the load, then the fresh instance takes them
each run with the retry gate (``--slots``, default 2: the window of tries out at once starts
there, doubles while they are admitted, and no held request tries after one was refused since
the last change) and without it (0: every held request retries every instance on every change),
alternating, ``--reps`` times each:
  refusals/req  admission refusals the pod answered (its slinfer_admission_refusals_total) per
                request served
  wall          from the first request sent to the last stream ended
  TTFT p50/p90  client-side, to the first content chunk
Medians over the repetitions; the ratios are gated / ungated. The LAST line printed is one JSON
object.

Usage: python bench/bench_retries.py [--requests 300] [--tokens 200] [--cold-requests 60] [--reps 3] [--slots 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from activator.app import ActivatorSettings  # noqa: E402
from autoscaler.service.controller import ControllerSettings  # noqa: E402
from autoscaler.service.local import PodResources  # noqa: E402
from autoscaler.service.mesh import MeshSettings, mesh_in_thread  # noqa: E402
from functions import FunctionSpec  # noqa: E402

TOKEN = "bench-retries"
FN = FunctionSpec(name="echo", model="random:llama-tiny?seed=0", max_context_tokens=512, max_output_tokens=400,
                  keep_alive_s=1.0)
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def refusals(pod_urls: list[str]) -> float:
    total = 0.0
    for url in pod_urls:
        for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
            if line.startswith("slinfer_admission_refusals_total{"):
                total += float(line.rsplit(" ", 1)[1])
    return total


async def burst(url: str, n: int, tokens: int) -> tuple[float, list[float], dict[int, int]]:
    async def one(client: httpx.AsyncClient, i: int) -> tuple[int, float]:
        body = {"model": "echo", "prompt": "x" * (20 + i % 40), "max_tokens": tokens, "temperature": 0,
                "ignore_eos": True, "stream": True}
        t = time.monotonic()
        ttft = float("nan")
        async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
            async for line in r.aiter_lines():
                if ttft != ttft and line.startswith("data: {") and '"text":""' not in line:
                    ttft = time.monotonic() - t
        return r.status_code, ttft

    limits = httpx.Limits(max_connections=n + 10)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        t0 = time.monotonic()
        res = await asyncio.gather(*(one(client, i) for i in range(n)))
        wall = time.monotonic() - t0
    statuses: dict[int, int] = {}
    for s, _ in res:
        statuses[s] = statuses.get(s, 0) + 1
    return wall, sorted(t for _, t in res if t == t), statuses


def run(slots: int, scenario: str, n: int, tokens: int) -> dict[str, float]:
    settings = MeshSettings((FN,), TOKEN, pods=1, port=0, autoscaler_port=0,
                            resources=PodResources(kv_budget_mb=64, weight_cache_mb=256, memory_mb=1024, threads=1),
                            controller=ControllerSettings(TOKEN, profile=True),
                            activator=ActivatorSettings(demand_interval_s=0.1, retry_slots=slots))
    with mesh_in_thread(settings) as mesh:
        pods = [node["url"] for node in httpx.get(f"{mesh.autoscaler_url}/status", headers=AUTH).json()["nodes"]]
        if scenario == "warm":  # load the instance and warm the paths; the burst keeps it loaded
            asyncio.run(burst(mesh.url, 4, 8))
        else:  # load it once (its profile is taken then), and wait until its 1 s keep-alive unloads it
            asyncio.run(burst(mesh.url, 2, 4))
            deadline = time.monotonic() + 60
            while any(i["function"] == "echo" for node in httpx.get(f"{mesh.autoscaler_url}/status",
                                                                   headers=AUTH).json()["nodes"]
                      for i in node["instances"]):
                assert time.monotonic() < deadline, "the function was never unloaded"
                time.sleep(0.1)
        before = refusals(pods)
        wall, ttfts, statuses = asyncio.run(burst(mesh.url, n, tokens))
        refused = refusals(pods) - before
    served = statuses.get(200, 0)
    return {"slots": slots, "served": served, "refusals_per_request": refused / max(1, served), "wall_s": wall,
            "ttft_p50_s": ttfts[len(ttfts) // 2], "ttft_p90_s": ttfts[int(len(ttfts) * 0.9)]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--cold-requests", type=int, default=60)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--slots", type=int, default=2)
    a = ap.parse_args()
    keys = ("refusals_per_request", "wall_s", "ttft_p50_s", "ttft_p90_s")
    out: dict[str, Any] = {"requests": a.requests, "tokens": a.tokens, "cold_requests": a.cold_requests,
                           "reps": a.reps, "slots": a.slots}
    for scenario, n, tokens in (("warm", a.requests, a.tokens), ("cold", a.cold_requests, 30)):
        rows: dict[int, list[dict[str, float]]] = {a.slots: [], 0: []}
        for rep in range(a.reps):
            for slots in (a.slots, 0) if rep % 2 == 0 else (0, a.slots):
                row = run(slots, scenario, n, tokens)
                rows[slots].append(row)
                print(scenario, json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}),
                      flush=True)
        med = {s: {k: statistics.median(r[k] for r in rs) for k in keys} for s, rs in rows.items()}
        for k in keys:
            ratio = med[a.slots][k] / med[0][k] if med[0][k] else float("nan")
            print(f"{scenario} {k:>22}: gated {med[a.slots][k]:8.3f}   ungated {med[0][k]:8.3f}   ratio {ratio:.2f}")
        out[scenario] = {"gated": med[a.slots], "ungated": med[0],
                         "ratio": {k: round(med[a.slots][k] / med[0][k], 3) if med[0][k] else None for k in keys},
                         "all_served": all(r["served"] == n for rs in rows.values() for r in rs)}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
