"""Soak a running mesh (`make run`) with mixed traffic, well-behaved and not, and check every answer.

Each round sends, all at once, --per-round requests of these kinds in turn plus a few CloudEvents:
  malformed  a body that is not JSON                           -> 400
  too-long   a chat prompt longer than the function's context  -> 400
  stream     a short streamed chat answer                      -> 200 with content
  abandon    a 200-token answer whose client gives up at --abandon-s (a client timeout)
  echo       a completion of at most 5 tokens from tiny-echo   -> 200, 1-5 tokens
  nested     JSON nested 100,000 deep                          -> 400
  surrogate  a prompt with a lone UTF-16 surrogate ("\ud800")  -> 400
  oversize   a 9 MiB body (the limit is 8)                     -> 413
  json       a chat answer from tiny-echo under a JSON schema    -> 200, JSON that follows it
  logprobs   a completion with logprobs (every other streamed)  -> 200, one logprob per token
  event      a binary-mode CloudEvent to /functions/tiny-echo  -> 200
Per round it prints the wall time and the resident memory (MB) of every `runtime.cli` process on
this host (the mesh and its pods: a leak shows as growth over many rounds). Any other outcome is
printed and makes the exit status 1. The LAST line is one JSON object.

Abandoning clients are what a serving system meets every day (client timeouts, users who close the
tab); work for them that nobody reads slows everyone else's. Run it against two checkouts to
compare them (the README's "Clients that give up" does).

Usage: python bench/soak.py [--url http://127.0.0.1:8080] [--rounds 10] [--per-round 60]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from collections import Counter
from typing import Any

import httpx

CHAT = "chat"  # functions/examples: SmolLM2-135M-Instruct
ECHO = "tiny-echo"  # functions/examples: a tiny random model, max context 256
KINDS = ("malformed", "too-long", "stream", "abandon", "echo", "nested", "surrogate", "oversize", "json",
         "logprobs")
# bounded JSON: the random model writes what the grammar allows and the grammar ends it
SCHEMA = {"type": "object", "required": ["ok", "n"], "additionalProperties": False,
          "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0, "maximum": 99}}}


async def one(c: httpx.AsyncClient, url: str, kind: str, i: int, abandon_s: float) -> tuple[str, str]:
    """(kind, outcome); outcome "ok" when the answer is the expected one."""
    if kind == "malformed":
        r = await c.post(url + "/v1/completions", content=b'{"model": "chat", "prompt": ',
                         headers={"content-type": "application/json"})
        return kind, "ok" if r.status_code == 400 else f"status {r.status_code}"
    if kind == "too-long":
        r = await c.post(url + "/v1/chat/completions", json={
            "model": ECHO, "messages": [{"role": "user", "content": "x " * 2000}], "max_tokens": 4})
        return kind, "ok" if r.status_code == 400 else f"status {r.status_code}"
    if kind == "stream":
        body = {"model": CHAT, "messages": [{"role": "user", "content": f"Count to {i}"}], "max_tokens": 8,
                "temperature": 0, "stream": True}
        pieces = 0
        async with c.stream("POST", url + "/v1/chat/completions", json=body) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    chunk = json.loads(line[6:])
                    pieces += bool(chunk["choices"] and chunk["choices"][0]["delta"].get("content"))
        return kind, "ok" if r.status_code == 200 and pieces > 0 else f"status {r.status_code}, {pieces} pieces"
    if kind == "abandon":
        body = {"model": CHAT, "messages": [{"role": "user", "content": "Tell a long story."}], "max_tokens": 200}
        try:
            r = await c.post(url + "/v1/chat/completions", json=body, timeout=abandon_s)
        except httpx.TimeoutException:
            return kind, "ok"
        return kind, "ok" if r.status_code == 200 else f"status {r.status_code}"
    if kind in ("nested", "surrogate", "oversize"):
        raw = {"nested": b'{"model": "tiny-echo", "prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
               "surrogate": b'{"model": "tiny-echo", "prompt": "a\\ud800", "max_tokens": 2}',
               "oversize": b'{"model": "tiny-echo", "prompt": "' + b"x" * (9 << 20) + b'"}'}[kind]
        r = await c.post(url + "/v1/completions", content=raw, headers={"content-type": "application/json"})
        want = 413 if kind == "oversize" else 400
        return kind, "ok" if r.status_code == want else f"status {r.status_code}"
    if kind == "echo":
        r = await c.post(url + "/v1/completions", json={"model": ECHO, "prompt": f"p{i}", "max_tokens": 5,
                                                        "temperature": 0})
        tokens = r.json().get("usage", {}).get("completion_tokens") if r.status_code == 200 else None
        # a random model may draw its end-of-sequence token early: 1-5 tokens
        return kind, "ok" if tokens in range(1, 6) else f"status {r.status_code}, {tokens} tokens"
    if kind == "json":
        r = await c.post(url + "/v1/chat/completions", json={
            "model": ECHO, "messages": [{"role": "user", "content": f"j{i}"}], "max_tokens": 30,
            "response_format": {"type": "json_schema", "json_schema": {"name": "soak", "schema": SCHEMA}}})
        try:
            value = json.loads(r.json()["choices"][0]["message"]["content"])
            good = set(value) == {"ok", "n"} and 0 <= value["n"] <= 99
        except (ValueError, KeyError, TypeError):
            good = False
        return kind, "ok" if r.status_code == 200 and good else f"status {r.status_code}, {r.text[:80]}"
    if kind == "logprobs":
        r = await c.post(url + "/v1/completions", json={"model": ECHO, "prompt": f"l{i}", "max_tokens": 5,
                                                        "logprobs": 2, "stream": i % 2 == 0})
        if r.status_code != 200:
            return kind, f"status {r.status_code}"
        if i % 2:
            tokens = r.json()["usage"]["completion_tokens"]
            n = len(r.json()["choices"][0]["logprobs"]["tokens"])
        else:  # streamed: every token's logprob, with the chunk carrying its text
            chunks = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
            n = sum(len(ch["choices"][0]["logprobs"]["tokens"]) for ch in chunks if ch["choices"])
            tokens = n if chunks and chunks[-1]["choices"] and chunks[-1]["choices"][0]["finish_reason"] else -1
        return kind, "ok" if n == tokens and n in range(1, 6) else f"{n} logprobs for {tokens} tokens"
    headers = {"ce-specversion": "1.0", "ce-id": f"soak-{i}", "ce-source": "/bench/soak",
               "ce-type": "dev.slinfer.soak", "content-type": "text/plain"}
    r = await c.post(url + f"/functions/{ECHO}", headers=headers, content=b"hello")
    return "event", "ok" if r.status_code == 200 and r.headers.get("ce-id") else f"status {r.status_code}"


def rss_mb() -> dict[str, int]:
    out = subprocess.run(["ps", "-eo", "pid,rss,args"], capture_output=True, text=True, check=False).stdout
    return {f[0]: int(f[1]) // 1024 for f in (line.split(None, 2) for line in out.splitlines()[1:])
            if len(f) == 3 and "runtime.cli" in f[2]}


async def soak(url: str, rounds: int, per_round: int, abandon_s: float) -> dict[str, Any]:
    outcomes: Counter[tuple[str, str]] = Counter()
    walls, rss = [], []
    async with httpx.AsyncClient(timeout=120) as c:
        for k in range(rounds):
            t0 = time.monotonic()
            jobs = [one(c, url, KINDS[i % len(KINDS)], i, abandon_s) for i in range(per_round)]
            jobs += [one(c, url, "event", i, abandon_s) for i in range(max(1, per_round // 12))]
            for got in await asyncio.gather(*jobs, return_exceptions=True):
                outcomes[got if isinstance(got, tuple) else ("error", repr(got)[:120])] += 1
            walls.append(time.monotonic() - t0)
            rss.append(rss_mb())
            print(f"round {k}: {walls[-1]:.1f} s, RSS MB {rss[-1]}", file=sys.stderr, flush=True)
    bad = {f"{kind}: {what}": n for (kind, what), n in outcomes.items() if what != "ok"}
    return {"rounds": rounds, "per_round": per_round, "wall_s": round(sum(walls), 2),
            "round_s_median": round(sorted(walls)[len(walls) // 2], 2),
            "ok": sum(n for (_, what), n in outcomes.items() if what == "ok"), "unexpected": bad,
            "rss_mb_first": rss[0] if rss else {}, "rss_mb_last": rss[-1] if rss else {}}


def mesh_is_up(url: str, who: str) -> bool:
    """Whether a mesh answers at ``url``; if not, says how to start one (``who``: the script)."""
    try:
        httpx.get(url + "/healthz", timeout=5).raise_for_status()
    except httpx.HTTPError as e:
        print(f"{who}: no mesh at {url} ({e}); start one with `make run`", file=sys.stderr)
        return False
    return True


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", default="http://127.0.0.1:8080", help="the activator (make run's PORT)")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--per-round", type=int, default=60)
    ap.add_argument("--abandon-s", type=float, default=0.3, help="when abandoning clients give up")
    a = ap.parse_args()
    if not mesh_is_up(a.url, "soak"):
        return 2
    result = asyncio.run(soak(a.url, a.rounds, a.per_round, a.abandon_s))
    for what, n in result["unexpected"].items():
        print(f"unexpected: {what} x{n}", file=sys.stderr)
    print(json.dumps(result))
    return 1 if result["unexpected"] else 0


if __name__ == "__main__":
    sys.exit(main())
