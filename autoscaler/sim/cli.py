"""`slinfer simulate`: replay a trace on a simulated cluster under several systems.

    slinfer simulate --trace ../shared/data/traces/azure_30min_128fn.json --model llama-2-7b \
        --cpus 4 --gpus 4 --systems sllm,sllm+c,sllm+c+s,slinfer --sweep --out DIR

Without --sweep: one run per system at 128 functions (or --functions N, the first N//16 of each
group of 8 when N is a multiple of 16, else the first N functions). Without --trace: the seeded
synthetic trace (``trace.synthetic_trace``). Latencies come from --profile (the published SLINFER
tables by default). Writes runs.json, runs.csv and PNG plots to --out; prints one progress line per
run on stderr and, as its LAST stdout line, one JSON object:
    {"model": ..., "capacity": {system: functions}, "slo_met": {system: {n: fraction}}, ...}
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from autoscaler.sim.config import ClusterSpec, model_from_published, system_config
from autoscaler.sim.loading import LoadModel, LoadSource
from autoscaler.sim.report import write_csv, write_json, write_plots
from autoscaler.sim.scoring import Score, score
from autoscaler.sim.simulator import RunResult, simulate
from autoscaler.sim.sweep import TARGETS, capacity, capacity_any, levels
from autoscaler.sim.trace import Trace, TraceError, load_trace, synthetic_trace

DEFAULT_PROFILE = "../shared/data/profiles/slinfer_published.json"


def parse(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="slinfer simulate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--trace", help="trace JSON in the SLINFER format (default: the seeded synthetic trace)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the synthetic trace")
    ap.add_argument("--duration", type=float, default=1800.0, help="synthetic trace duration (s)")
    ap.add_argument("--profile", default=DEFAULT_PROFILE, help="latency profile JSON (published SLINFER format)")
    ap.add_argument("--model", default="llama-2-7b")
    ap.add_argument("--cpus", type=int, default=4)
    ap.add_argument("--gpus", type=int, default=4)
    ap.add_argument("--systems", default="sllm,sllm+c,sllm+c+s,slinfer",
                    help="comma-separated: sllm, sllm+c, sllm+c+s, slinfer, slinfer-<ablation>[-<ablation>]")
    ap.add_argument("--sweep", action="store_true", help="run g = 1..8 functions of each group of 8")
    ap.add_argument("--functions", type=int, default=None, help="one load level (default: all functions)")
    ap.add_argument("--busiest", type=int, default=None, metavar="K",
                    help="analysis: only the K functions with the most requests, alone on the cluster "
                         "(what they meet there bounds what they meet beside the others)")
    ap.add_argument("--host-cache-gib", type=float, default=None, help="per-node DRAM checkpoint cache")
    ap.add_argument("--loads", choices=[s.value for s in LoadSource], default=LoadSource.TIERED.value,
                    help="where checkpoints load from: tiered = host cache, else disk (default); host-pool = "
                         "every checkpoint in host memory (the SLINFER artifact's loader); instant = no load "
                         "time (how much is cold-start cost)")
    ap.add_argument("--out", default="sim-out", help="output folder")
    return ap.parse_args(argv)


def _trace(a: argparse.Namespace) -> Trace:
    if a.trace:
        return load_trace(a.trace)
    return synthetic_trace(seed=a.seed, duration_s=a.duration,
                           total_rate_per_s=9266 / 1800)


def _one_level(trace: Trace, functions: int | None) -> list[tuple[int, Trace]]:
    if functions is None or functions == len(trace.functions):
        return [(len(trace.functions), trace)]
    if len(trace.functions) % 8 == 0 and functions % (len(trace.functions) // 8) == 0:
        t = trace.select_groups(functions // (len(trace.functions) // 8))
    else:
        t = trace.first_functions(functions)
    return [(len(t.functions), t)]


def _misses(s: Score) -> str:
    """Misses by cause, then by function rank: `1-8 5334/6018` is the 8 busiest functions' SLO-met
    requests of theirs."""
    causes = ", ".join(f"{k} {v}" for k, v in s.misses.items())
    bands = " ".join(f"{b.first}-{b.last} {b.slo_met}/{b.requests}" for b in s.by_rank)
    return f"{causes}; met by function rank: {bands}"


def main(argv: list[str]) -> int:
    a = parse(argv)
    try:
        data = json.loads(Path(a.profile).read_text(encoding="utf-8"))
    except FileNotFoundError:
        print(f"slinfer simulate: profile {a.profile} not found; the published SLINFER tables live in "
              f"{DEFAULT_PROFILE} (next to the project, not part of a clone); pass --profile FILE",
              file=sys.stderr)
        return 2
    try:
        model = model_from_published(data, a.model)
        systems = [system_config(s.strip()) for s in a.systems.split(",") if s.strip()]
        trace = _trace(a)
    except (KeyError, ValueError, TraceError) as e:
        print(f"slinfer simulate: {e}", file=sys.stderr)
        return 2
    cluster = ClusterSpec(cpus=a.cpus, gpus=a.gpus)
    if a.host_cache_gib is not None:
        cluster = ClusterSpec(cpus=a.cpus, gpus=a.gpus, host_cache_bytes=int(a.host_cache_gib * (1 << 30)))
    if a.busiest is not None:
        if a.sweep or a.functions is not None:
            print("slinfer simulate: --busiest takes the whole trace's K busiest functions; "
                  "leave out --sweep and --functions", file=sys.stderr)
            return 2
        try:
            trace = trace.busiest(a.busiest)
        except ValueError as e:
            print(f"slinfer simulate: {e}", file=sys.stderr)
            return 2
    lv = levels(trace) if a.sweep else _one_level(trace, a.functions)
    runs: dict[str, dict[int, tuple[Score, RunResult]]] = {}
    wall: dict[tuple[str, int], float] = {}
    for cfg in systems:
        runs[cfg.name] = {}
        for n, t in lv:
            t0 = time.perf_counter()
            result = simulate(t, model, cluster, cfg, LoadModel(source=LoadSource(a.loads)))
            wall[(cfg.name, n)] = time.perf_counter() - t0
            s = score(result)
            runs[cfg.name][n] = (s, result)
            print(f"[simulate] {a.model} cpus={a.cpus} gpus={a.gpus} {cfg.name} functions={n}: "
                  f"{s.slo_met}/{s.requests} SLO met ({s.attainment:.3f}; {s.attainment_excl_cold:.3f} without "
                  f"cold starts), loads {s.loads}, preemptions {s.preemptions}, {wall[(cfg.name, n)]:.1f}s; "
                  f"misses: {_misses(s)}", file=sys.stderr, flush=True)
    summary = {
        "model": a.model,
        "capacity": {name: capacity({n: s.attainment for n, (s, _) in by_n.items()}, 0.95)
                     for name, by_n in runs.items()},
        "capacity_any": {name: capacity_any({n: s.attainment for n, (s, _) in by_n.items()}, 0.95)
                         for name, by_n in runs.items()},
        "slo_met": {name: {str(n): round(s.attainment, 4) for n, (s, _) in sorted(by_n.items())}
                    for name, by_n in runs.items()},
        "slo_met_requests": {name: {str(n): s.slo_met for n, (s, _) in sorted(by_n.items())}
                             for name, by_n in runs.items()},
        "capacity_at": {str(tgt): {name: capacity({n: s.attainment for n, (s, _) in by_n.items()}, tgt)
                                   for name, by_n in runs.items()} for tgt in TARGETS},
        "cpus": a.cpus, "gpus": a.gpus, "trace": trace.source, "loads": a.loads,
    }
    if "sllm" in runs:  # the paper's headline: SLO-met requests relative to exclusive allocation
        summary["ratio_vs_sllm"] = {
            name: {str(n): round(s.slo_met / max(1, runs["sllm"][n][0].slo_met), 3)
                   for n, (s, _) in sorted(by_n.items()) if n in runs["sllm"]}
            for name, by_n in runs.items()}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "runs.json", summary, runs, wall)
    write_csv(out / "runs.csv", runs, wall)
    write_plots(out, runs, a.model)
    print(f"[simulate] wrote {out}/runs.json, runs.csv, slo_attainment.png, ttft_cdf.png, nodes_used.png",
          file=sys.stderr)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
