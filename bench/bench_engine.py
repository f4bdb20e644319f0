"""Engine benchmark: our engine vs HF transformers eager on the bundled SmolLM2-135M.

Same process, same thread count, fp32, interleaved repetitions, medians. Measures:
  decode ms/step at batch 1, aggregate decode tok/s at batch 16 (context ~128),
  prefill tok/s for a 512-token prompt (HF computes logits for every position; we need the last).
Also measures memory bandwidth here to print the batch-1 floor (reading every weight once).
The LAST line printed is one JSON object (see the keys at the bottom).

Usage: python bench/bench_engine.py [--reps 5] [--steps 16] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runtime.core.ids import RequestId  # noqa: E402
from runtime.core.request import SamplingParams  # noqa: E402
from runtime.engine.engine import EngineConfig, LLMEngine  # noqa: E402
from runtime.models.loader import load_model  # noqa: E402

CTX = 128


def prompt_ids(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, 40000, (n,), generator=g).tolist()


def ours_decode(loaded, batch: int, steps: int) -> float:
    """Median seconds per engine step (plan + forward + sample + apply) at a steady batch."""
    eng = LLMEngine(loaded, EngineConfig(max_num_seqs=batch, max_num_batched_tokens=2048,
                                         kv_cache_bytes=512 * 1024 * 1024))
    sp = SamplingParams(max_tokens=steps + 8, temperature=0, ignore_eos=True)
    for i in range(batch):
        eng.add_request(RequestId(f"r{i}"), prompt_ids(CTX, i), sp, 0.0)
    rids = [RequestId(f"r{i}") for i in range(batch)]
    while any(not eng.scheduler.get(r).output_token_ids for r in rids):  # prefill everyone
        eng.step()
    eng.step()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        outs = eng.step()
        times.append(time.perf_counter() - t)
        assert len(outs) == batch
    return statistics.median(times)


def hf_decode(hf, batch: int, steps: int) -> float:
    from transformers import DynamicCache

    ids = torch.tensor([prompt_ids(CTX, i) for i in range(batch)])
    with torch.inference_mode():
        out = hf(ids, past_key_values=DynamicCache(), use_cache=True)
        cache = out.past_key_values
        nxt = out.logits[:, -1:].argmax(-1)
        out = hf(nxt, past_key_values=cache, use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
        times = []
        for _ in range(steps):
            t = time.perf_counter()
            out = hf(nxt, past_key_values=cache, use_cache=True)
            nxt = out.logits[:, -1:].argmax(-1)
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def ours_prefill(loaded, n: int) -> float:
    eng = LLMEngine(loaded, EngineConfig(max_num_batched_tokens=n))
    eng.add_request(RequestId("p"), prompt_ids(n, 99), SamplingParams(max_tokens=1, temperature=0), 0.0)
    t = time.perf_counter()
    outs = eng.step()
    dt = time.perf_counter() - t
    assert outs and outs[0].finished
    return dt


def hf_prefill(hf, n: int) -> float:
    ids = torch.tensor([prompt_ids(n, 99)])
    with torch.inference_mode():
        t = time.perf_counter()
        out = hf(ids)
        out.logits[:, -1].argmax(-1)
        return time.perf_counter() - t


def bandwidth_gb_s() -> float:
    x = torch.ones(64 * 1024 * 1024)  # 256 MB, far beyond any cache
    x.sum()
    ts = []
    for _ in range(5):
        t = time.perf_counter()
        x.sum()
        ts.append(time.perf_counter() - t)
    return x.numel() * 4 / statistics.median(ts) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--model", default="bundled:smollm2-135m-instruct")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from transformers import AutoModelForCausalLM

    loaded = load_model(a.model)
    hf = AutoModelForCausalLM.from_pretrained(str(loaded.folder), dtype=torch.float32,
                                              attn_implementation="eager").eval()
    weight_bytes = loaded.model.num_params * 4
    res: dict[str, list[float]] = {k: [] for k in ("o1", "h1", "o16", "h16", "op", "hp", "bw")}
    ours_prefill(loaded, 512)  # warm-up both
    hf_prefill(hf, 512)
    for rep in range(a.reps):
        res["o1"].append(ours_decode(loaded, 1, a.steps))
        res["h1"].append(hf_decode(hf, 1, a.steps))
        res["o16"].append(ours_decode(loaded, 16, a.steps))
        res["h16"].append(hf_decode(hf, 16, a.steps))
        res["op"].append(ours_prefill(loaded, 512))
        res["hp"].append(hf_prefill(hf, 512))
        res["bw"].append(bandwidth_gb_s())
        print(f"rep {rep}: b1 {res['o1'][-1] * 1e3:.1f} vs {res['h1'][-1] * 1e3:.1f} ms | "
              f"b16 {16 / res['o16'][-1]:.0f} vs {16 / res['h16'][-1]:.0f} tok/s | "
              f"prefill512 {512 / res['op'][-1]:.0f} vs {512 / res['hp'][-1]:.0f} tok/s", flush=True)
    med = {k: statistics.median(v) for k, v in res.items()}
    floor_ms = weight_bytes / (med["bw"] * 1e9) * 1e3
    summary = {
        "decode_b1_ms_ours": round(med["o1"] * 1e3, 2),
        "decode_b1_ms_hf": round(med["h1"] * 1e3, 2),
        "decode_b16_tok_s_ours": round(16 / med["o16"], 1),
        "decode_b16_tok_s_hf": round(16 / med["h16"], 1),
        "prefill512_tok_s_ours": round(512 / med["op"], 1),
        "prefill512_tok_s_hf": round(512 / med["hp"], 1),
        "decode_b1_floor_ms": round(floor_ms, 2),
        "threads": a.threads,
        "dtype": "float32",
        "decode_b1_ratio": round(med["o1"] / med["h1"], 3),
        "decode_b16_ratio": round(med["h16"] / med["o16"], 3),
        "prefill512_ratio": round(med["hp"] / med["op"], 3),
        "decode_b1_x_floor": round(med["o1"] * 1e3 / floor_ms, 2),
        "bandwidth_gb_s": round(med["bw"], 1),
        "weight_mb": round(weight_bytes / 1e6, 1),
    }
    print(f"ours/HF: decode b1 step time {summary['decode_b1_ratio']}x (target <= 0.7), "
          f"b16 throughput {summary['decode_b16_ratio']}x (>= 0.95), prefill {summary['prefill512_ratio']}x (>= 1.0); "
          f"b1 step = {summary['decode_b1_x_floor']}x the {floor_ms:.1f} ms weight-read floor")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
