"""Brief on-device profile of a loaded instance, for the latency estimator.

Runs real engine steps with throwaway requests: one prefill per length, and a few decode steps
per (context, batch) point. The result is a LatencyProfile in the same shape as the published
tables, so the runtime and the simulator share the estimator code.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence

from runtime.core.estimator import LatencyProfile
from runtime.core.ids import RequestId
from runtime.core.request import SamplingParams
from runtime.engine.engine import LLMEngine

_PARAMS = SamplingParams(max_tokens=1 << 20, temperature=0, ignore_eos=True)


def _tokens(n: int, vocab: int, salt: int) -> list[int]:
    return [3 + (i * 7919 + salt * 104729) % (vocab - 3) for i in range(n)]


def profile_engine(engine: LLMEngine, prefill_lengths: Sequence[int] = (32, 128, 512),
                   decode_points: Sequence[tuple[int, Sequence[int]]] = ((128, (1, 4, 16)), (512, (1, 4, 16))),
                   decode_steps: int = 3) -> LatencyProfile:
    if engine.has_work:
        raise RuntimeError("profile an instance before it takes requests")
    kv = engine.scheduler.kv
    caching, kv.prefix_caching = kv.prefix_caching, False  # every timed prompt is computed whole
    try:
        return _profile(engine, prefill_lengths, decode_points, decode_steps)
    finally:
        kv.prefix_caching = caching


def _profile(engine: LLMEngine, prefill_lengths: Sequence[int],
             decode_points: Sequence[tuple[int, Sequence[int]]], decode_steps: int) -> LatencyProfile:
    vocab = engine.loaded.config.vocab_size
    limit = engine.max_model_len - decode_steps - 2
    budget = engine.config.max_num_batched_tokens
    warm = RequestId("__profile_warmup")  # first calls pay one-time costs (allocator, kernels)
    engine.add_request(warm, _tokens(min(32, limit), vocab, 1), SamplingParams(max_tokens=1, temperature=0), 0.0)
    engine.step()
    engine.abort(warm)
    prefill: list[tuple[int, float]] = []
    for n in sorted({min(n, limit, budget) for n in prefill_lengths}):
        rid = RequestId(f"__profile_p{n}")
        engine.add_request(rid, _tokens(n, vocab, n), SamplingParams(max_tokens=1, temperature=0), 0.0)
        t = time.perf_counter()
        engine.step()
        prefill.append((n, (time.perf_counter() - t) * 1e3))
        engine.abort(rid)
    decode: list[tuple[int, list[tuple[int, float]]]] = []
    for ctx, batches in decode_points:
        ctx = min(ctx, limit)
        row: list[tuple[int, float]] = []
        for b in batches:
            b = min(b, engine.config.max_num_seqs)
            rids = [RequestId(f"__profile_d{ctx}_{b}_{i}") for i in range(b)]
            for i, rid in enumerate(rids):
                engine.add_request(rid, _tokens(ctx, vocab, i), _PARAMS, 0.0)
            while any(not r.output_token_ids for r in (engine.scheduler.get(x) for x in rids) if r):
                engine.step()  # prefill everyone (not timed)
            times = []
            for _ in range(decode_steps):
                t = time.perf_counter()
                engine.step()
                times.append((time.perf_counter() - t) * 1e3)
            row.append((b, statistics.median(times)))
            for rid in rids:
                engine.abort(rid)
        decode.append((ctx, sorted(set(row))))
    assert engine.kv_blocks_used == 0
    return LatencyProfile.from_tables(prefill, decode, safety=1.1)
