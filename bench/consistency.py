"""Check a running mesh (`make run`) gives every greedy request the answer it gives alone.

First each (function, question) pair is asked once, one request at a time: the reference. Then
--rounds rounds of --per-round requests go at once, mixed streamed and not, over the same pairs,
and every answer must equal its reference: batching, the prefix cache, preemption and the moves
that continue a request elsewhere must not change a single character. With --kill-every S a
random runtime pod of this host is stopped every S seconds, SIGKILL and SIGTERM in turn (the
mesh restarts it), so answers also cross pod deaths and hand-offs; --freeze adds SIGSTOP to the
turn (a frozen pod: the mesh must notice it, move its requests and restart it).

Prints one line per round, then the activator's continuation and failover counts, and as its
LAST line one JSON object; exits 1 when any answer differed or failed.

Usage: python bench/consistency.py [--url http://127.0.0.1:8080] [--rounds 20] [--kill-every 8]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import random
import re
import signal
import subprocess
import sys
from collections import Counter
from typing import Any

import httpx
from soak import mesh_is_up

FUNCTIONS = (("chat", 24), ("tiny-echo", 20))  # functions/examples, and the tokens asked of each
QUESTIONS = tuple(f"Question {i}: what is {i} plus {i * 3}?" for i in range(12))


async def ask(c: httpx.AsyncClient, url: str, function: str, question: str, tokens: int,
              stream: bool) -> tuple[int, str]:
    body = {"model": function, "messages": [{"role": "user", "content": question}], "max_tokens": tokens,
            "temperature": 0, "stream": stream}
    if not stream:
        r = await c.post(url + "/v1/chat/completions", json=body)
        return r.status_code, r.json()["choices"][0]["message"]["content"] if r.status_code == 200 else r.text[:120]
    text: list[str] = []
    async with c.stream("POST", url + "/v1/chat/completions", json=body) as r:
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                return 599, json.dumps(chunk)[:120]
            if chunk["choices"]:
                text.append(chunk["choices"][0]["delta"].get("content") or "")
    return r.status_code, "".join(text)


def pods() -> list[int]:
    out = subprocess.run(["pgrep", "-f", "runtime.cli serve"], capture_output=True, text=True, check=False).stdout
    return [int(p) for p in out.split()]


async def chaos(every_s: float, log: list[str], freeze: bool = False) -> None:
    """Every ``every_s``: SIGKILL, SIGTERM (and with ``freeze``, SIGSTOP: a frozen pod, which the
    mesh must notice and restart) in turn, to a random running pod."""
    signals = [signal.SIGKILL, signal.SIGTERM] + ([signal.SIGSTOP] if freeze else [])
    for i in itertools.count():
        await asyncio.sleep(every_s)
        running = pods()
        if running:
            pid = random.choice(running)
            sig = signals[i % len(signals)]
            with contextlib.suppress(ProcessLookupError):  # it ended meanwhile
                os.kill(pid, sig)
                log.append(f"{sig.name} {pid}")


def counter(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics", timeout=10).text
    return sum(float(v) for v in re.findall(rf"^{name}\{{[^}}]*\}} (\S+)$", text, re.M))


async def run(url: str, rounds: int, per_round: int, kill_every: float | None, seed: int,
              freeze: bool = False) -> dict[str, Any]:
    rng = random.Random(seed)
    async with httpx.AsyncClient(timeout=180) as c:
        reference = {(fn, q): (await ask(c, url, fn, q, n, False))[1] for fn, n in FUNCTIONS for q in QUESTIONS}
        kills: list[str] = []
        killer = asyncio.ensure_future(chaos(kill_every, kills, freeze)) if kill_every else None
        same, differ = 0, Counter[str]()
        try:
            for k in range(rounds):
                jobs = [(*FUNCTIONS[i % len(FUNCTIONS)], rng.choice(QUESTIONS), i % 3 == 0) for i in range(per_round)]
                got = await asyncio.gather(*(ask(c, url, fn, q, n, s) for fn, n, q, s in jobs))
                for (fn, _, q, _), (status, text) in zip(jobs, got, strict=True):
                    if status == 200 and text == reference[fn, q]:
                        same += 1
                    else:
                        differ[f"{fn}: {status} {text[:60]!r} instead of {reference[fn, q][:60]!r}"] += 1
                print(f"round {k}: {same} the same, {sum(differ.values())} not; pods stopped: {len(kills)}",
                      file=sys.stderr, flush=True)
        finally:
            if killer is not None:
                killer.cancel()
    return {"rounds": rounds, "per_round": per_round, "same": same, "differ": dict(differ.most_common(10)),
            "pods_stopped": kills,
            "continuations": counter(url, "slinfer_activator_continuations_total"),
            "failovers": counter(url, "slinfer_activator_failovers_total")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", default="http://127.0.0.1:8080", help="the activator (make run's PORT)")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--per-round", type=int, default=24)
    ap.add_argument("--kill-every", type=float, default=None, metavar="S",
                    help="stop a random runtime pod of this host every S seconds (SIGKILL, SIGTERM in turn)")
    ap.add_argument("--freeze", action="store_true",
                    help="with --kill-every, SIGSTOP in turn too: a frozen pod the mesh must notice and restart")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    if not mesh_is_up(a.url, "consistency"):
        return 2
    result = asyncio.run(run(a.url, a.rounds, a.per_round, a.kill_every, a.seed, a.freeze))
    for what, n in result["differ"].items():
        print(f"differs x{n}: {what}", file=sys.stderr)
    print(json.dumps(result))
    return 1 if result["differ"] else 0


if __name__ == "__main__":
    sys.exit(main())
