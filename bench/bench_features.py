"""What the API's extras cost the engine: logprobs, penalties, logit_bias, a JSON schema, echo.

One LLMEngine on the bundled SmolLM2-135M, a batch of --batch greedy requests of --tokens tokens
each, run to the end; each variant alternates with the plain run --reps times, and the medians of
milliseconds per generated token are printed with their ratio to plain (1.00 = free). A variant's
requests are all alike; plain requests ignore EOS so every run generates the same token count.
The LAST line printed is one JSON object: {variant: ratio}.

Usage: python bench/bench_features.py [--reps 5] [--batch 8] [--tokens 64]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runtime.core.ids import RequestId  # noqa: E402
from runtime.core.request import SamplingParams  # noqa: E402
from runtime.engine.engine import LLMEngine  # noqa: E402
from runtime.models.loader import load_model  # noqa: E402

SCHEMA = {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}


def run(engine: LLMEngine, prompt: list[int], params: SamplingParams, batch: int) -> tuple[float, int]:
    """(seconds, tokens generated) for one batch run to the end."""
    for i in range(batch):
        engine.add_request(RequestId(f"r{i}"), prompt, params, 0.0)
    tokens = 0
    t0 = time.perf_counter()
    while engine.has_work:
        tokens += sum(len(o.new_token_ids) for o in engine.step())
    return time.perf_counter() - t0, tokens


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=64)
    a = ap.parse_args()
    engine = LLMEngine(load_model("bundled:smollm2-135m-instruct"))
    prompt = engine.encode_prompt(engine.render_chat([{"role": "user", "content": "Describe the sea in detail."}]))
    vocab = engine.loaded.config.vocab_size
    plain = SamplingParams(max_tokens=a.tokens, temperature=0, ignore_eos=True)
    variants = {
        "logprobs_k5": replace(plain, logprobs=5),
        "penalties": replace(plain, presence_penalty=0.5, frequency_penalty=0.5),
        "logit_bias_full_vocab": replace(plain, logit_bias=tuple((i, -0.01) for i in range(vocab))),
        "json_schema": replace(plain, grammar=engine.grammars.compile(SCHEMA)),
        "echo_prompt_logprobs": replace(plain, prompt_logprobs=1, logprobs=1),
    }
    run(engine, prompt, plain, a.batch)  # warm up
    ms: dict[str, list[float]] = {"plain": [], **{k: [] for k in variants}}
    for _ in range(a.reps):
        for name, params in variants.items():
            for label, p in (("plain", plain), (name, params)):
                s, n = run(engine, prompt, p, a.batch)
                ms[label].append(1e3 * s / max(1, n))
    med = {k: statistics.median(v) for k, v in ms.items()}
    for k, v in med.items():
        print(f"{k:24s} {v:7.3f} ms/token  x{v / med['plain']:.3f}", file=sys.stderr)
    print(json.dumps({k: round(v / med["plain"], 3) for k, v in med.items() if k != "plain"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
