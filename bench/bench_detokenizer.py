"""What streaming detokenization costs per token, as outputs grow: ours against decoding every
output id again each token (what we did before, and the definition of the text).

SmolLM2's tokenizer on real text (this README, repeated), one token per call as the engine adds
them, a 4-character stop string held back as with `stop`. Interleaved repetitions, medians of
the mean milliseconds per token. The LAST line printed is one JSON object: {tokens: ratio}.

Usage: python bench/bench_detokenizer.py [--reps 5] [--lengths 512,2048,4096]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runtime.engine.detokenizer import IncrementalDetokenizer  # noqa: E402
from runtime.models.loader import load_model  # noqa: E402

STOP = ("\n\n\n\n",)


class DecodeEverything:
    """Before: each call decodes all ids so far, then holds back as ours does."""

    def __init__(self, tokenizer: Any):
        self._tok, self._ids, self.text = tokenizer, [], ""

    def add(self, ids: list[int]) -> str:
        self._ids.extend(ids)
        full = self._tok.decode(self._ids, skip_special_tokens=True)
        hits = [i for i in (full.find(s, max(0, len(self.text) - 3)) for s in STOP) if i >= 0]
        full = full[: min(hits)] if hits else full.rstrip("\ufffd")[: max(len(self.text), len(full) - 3)]
        delta = full[len(self.text):]
        self.text = max(full, self.text, key=len)
        return delta


def ms_per_token(det: Any, ids: list[int]) -> float:
    t = time.perf_counter()
    for i in ids:
        det.add([i])
    return (time.perf_counter() - t) / len(ids) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--lengths", default="512,2048,4096")
    a = ap.parse_args()
    tok = load_model("bundled:smollm2-135m-instruct").tokenizer
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    lengths = [int(n) for n in a.lengths.split(",")]
    ids = tok.encode(text * (1 + max(lengths) // 1000))
    ratios = {}
    for n in lengths:
        ours, before = [], []
        for _ in range(a.reps):
            before.append(ms_per_token(DecodeEverything(tok), ids[:n]))
            ours.append(ms_per_token(IncrementalDetokenizer(tok, STOP), ids[:n]))
        o, b = statistics.median(ours), statistics.median(before)
        ratios[n] = round(b / o, 1)
        print(f"{n:>5} tokens: ours {o:.4f} ms/token, decoding everything {b:.4f} ms/token, x{b / o:.1f}")
    print(json.dumps(ratios))


if __name__ == "__main__":
    main()
