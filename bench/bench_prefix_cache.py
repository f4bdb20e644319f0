"""What prefix caching saves an LLM function: time to first token when its requests share a
system prompt, with the cache on and off.

One LLMEngine on the bundled SmolLM2-135M. A function's system prompt (--system-tokens long,
rendered with the chat template) and short user questions. Two scenarios, each alternating
cache on / off --reps times (fresh engines; one warm-up request before the first two, so both
start with the prompt cached or not as they would in service):
  sequential: one request at a time, as a rarely called function sees them;
  burst: --burst requests arrive together (their first tokens all wait for the prefills);
  cold burst: the same on a fresh engine, the system prompt cached nowhere yet (the first
  request computes it while the others wait a step to share it).
Medians of the mean time to first token (ms). The LAST line printed is one JSON object:
{scenario: off / on ratio}.

Usage: python bench/bench_prefix_cache.py [--reps 5] [--system-tokens 400] [--burst 8]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runtime.core.ids import RequestId  # noqa: E402
from runtime.core.request import SamplingParams  # noqa: E402
from runtime.engine.engine import EngineConfig, LLMEngine  # noqa: E402
from runtime.models.loader import load_model  # noqa: E402

QUESTIONS = ["What is the capital of France?", "Summarize the refund policy.", "Is shipping free?",
             "How do I reset my password?", "Can I change my order?", "Where is my parcel?",
             "Do you ship abroad?", "What are your opening hours?"]
PARAMS = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)


SENTENCE = ("You answer customer questions for a shop that sells books, maps and travel guides. "
            "Be brief, polite and exact; never invent a policy. ")


def system_prompt(eng: LLMEngine, tokens: int) -> str:
    """SENTENCE repeated, cut at the word where it reaches ``tokens`` tokens."""
    words = (SENTENCE * (2 + tokens // max(1, len(eng.encode_prompt(SENTENCE))))).split()
    n = len(words)
    while n > 1 and len(eng.encode_prompt(" ".join(words[: n - 1]))) >= tokens:
        n -= 1
    return " ".join(words[:n])


def ttft_ms(eng: LLMEngine, prompts: list[list[int]], tag: str) -> float:
    """Mean time from arrival to first token of requests that all arrive now."""
    t0 = time.perf_counter()
    first: dict[str, float] = {}
    for i, ids in enumerate(prompts):
        eng.add_request(RequestId(f"{tag}{i}"), ids, PARAMS, 0.0)
    while eng.has_work:
        for o in eng.step():
            first.setdefault(o.rid, time.perf_counter() - t0)
    return statistics.mean(first.values()) * 1e3


def run(loaded, caching: bool, system: str, burst: int, tag: str) -> dict[str, float]:
    eng = LLMEngine(loaded, EngineConfig(prefix_caching=caching))
    prompts = [eng.encode_prompt(eng.render_chat([{"role": "user", "content": q}], system_prompt=system))
               for q in QUESTIONS]
    cold = ttft_ms(eng, [prompts[i % len(prompts)] for i in range(burst)], tag + "c")  # nothing cached yet
    eng = LLMEngine(loaded, EngineConfig(prefix_caching=caching))
    ttft_ms(eng, prompts[:1], tag + "w")  # warm-up: the function has served before
    seq = statistics.mean(ttft_ms(eng, [p], f"{tag}s{i}") for i, p in enumerate(prompts[1:4]))
    burst_ms = ttft_ms(eng, [prompts[i % len(prompts)] for i in range(burst)], tag + "b")
    return {"sequential": seq, "burst": burst_ms, "cold burst": cold}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--system-tokens", type=int, default=400)
    ap.add_argument("--burst", type=int, default=8)
    a = ap.parse_args()
    loaded = load_model("bundled:smollm2-135m-instruct")
    system = system_prompt(LLMEngine(loaded, EngineConfig(kv_cache_bytes=0)), a.system_tokens)
    res: dict[bool, list[dict[str, float]]] = {True: [], False: []}
    for r in range(a.reps):
        for caching in (r % 2 == 0, r % 2 != 0):  # alternate which goes first
            res[caching].append(run(loaded, caching, system, a.burst, f"{r}{caching}"))
    ratios = {}
    for scenario in ("sequential", "burst", "cold burst"):
        on = statistics.median(x[scenario] for x in res[True])
        off = statistics.median(x[scenario] for x in res[False])
        ratios[scenario] = round(off / on, 2)
        print(f"{scenario:>10}: time to first token {off:7.1f} ms without the cache, {on:7.1f} ms with it "
              f"(x{off / on:.2f})")
    print(json.dumps(ratios))


if __name__ == "__main__":
    main()
