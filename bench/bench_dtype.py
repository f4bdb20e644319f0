"""What bfloat16 and int8 weights buy on this CPU: our engine on the bundled SmolLM2-135M in
float32, bfloat16 and int8 (a function's ``dtype``), side by side in one process, interleaved
repetitions, medians.

Measures decode ms/step at batch 1, decode tok/s at batch 16 (context ~128), prefill tok/s for a
512-token prompt (bench_engine.py's methods), and the memory of the weights and of one token's KV.
The speed-up needs bf16 instructions (AVX512-BF16 or AMX; this script prints whether torch sees
them); without them bfloat16 still halves memory but computes slower. The LAST line printed is
one JSON object: per dtype, its ratios to float32 (time for batch 1, throughput otherwise, memory
of the weights and a 4k-token context).

Usage: python bench/bench_dtype.py [--reps 5] [--steps 16]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_engine import ours_decode, ours_prefill  # noqa: E402

from functions import Dtype  # noqa: E402
from runtime.engine.engine import EngineConfig, LLMEngine  # noqa: E402
from runtime.models.loader import load_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--steps", type=int, default=16)
    a = ap.parse_args()
    print(f"torch {torch.__version__}, CPU capability: {torch.backends.cpu.get_cpu_capability()}, "
          f"threads {torch.get_num_threads()}")
    models = {d: load_model("bundled:smollm2-135m-instruct", d) for d in Dtype}
    got: dict[Dtype, dict[str, list[float]]] = {d: {"b1": [], "b16": [], "prefill": []} for d in models}
    for r in range(a.reps):
        order = list(models) if r % 2 == 0 else list(reversed(list(models)))
        for d in order:
            got[d]["b1"].append(ours_decode(models[d], 1, a.steps) * 1e3)
            got[d]["b16"].append(16 / ours_decode(models[d], 16, a.steps))
            got[d]["prefill"].append(512 / ours_prefill(models[d], 512))
    med = {d: {k: statistics.median(v) for k, v in m.items()} for d, m in got.items()}
    memory = {}
    for d, m in med.items():
        mdl = models[d].model
        kv = LLMEngine(models[d], EngineConfig(kv_cache_bytes=0)).bytes_per_block / 32
        memory[d] = mdl.nbytes + 4096 * kv  # the weights and one 4k-token context
        print(f"{d.value:>9}: decode b1 {m['b1']:.1f} ms/step, b16 {m['b16']:.0f} tok/s, "
              f"prefill 512 {m['prefill']:.0f} tok/s; weights {mdl.nbytes / 1e6:.0f} MB, KV {kv / 1e3:.1f} kB/token")
    f = med[Dtype.FLOAT32]
    print(json.dumps({d.value: {"decode_b1_time": round(m["b1"] / f["b1"], 3),
                                "decode_b16_throughput": round(m["b16"] / f["b16"], 3),
                                "prefill_throughput": round(m["prefill"] / f["prefill"], 3),
                                "memory": round(memory[d] / memory[Dtype.FLOAT32], 3)}
                      for d, m in med.items() if d is not Dtype.FLOAT32}))

if __name__ == "__main__":
    main()
