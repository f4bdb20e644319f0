"""Writing a simulation's results: runs.json (every score, with its misses by cause and by function
rank, and TTFT CDF), runs.csv (one row per run) and PNG plots (SLO attainment vs functions per
system, TTFT CDF, nodes in use). Plots use matplotlib's Agg backend (no display)."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

from autoscaler.sim.scoring import MissCause, Score, ttft_cdf
from autoscaler.sim.simulator import RunResult

Runs = Mapping[str, Mapping[int, tuple[Score, RunResult]]]

CSV_FIELDS = ("system", "model", "functions", "requests", "slo_met", "attainment", "slo_met_excl_cold",
              "attainment_excl_cold", "dropped", "ttft_p50_s", "ttft_p99_s", "decode_tok_per_node_s_cpu",
              "decode_tok_per_node_s_gpu", "avg_nodes_cpu", "avg_nodes_gpu", "avg_nodes_total", "preemptions",
              "preempted_requests", "loads", "loads_from_disk", "missed_dropped", "missed_ttft_load",
              "missed_ttft", "missed_tpot", "wall_s")


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def write_json(path: Path, summary: Mapping[str, Any], runs: Runs, wall_s: Mapping[tuple[str, int], float]) -> None:
    doc = {"summary": summary, "runs": [
        {**{k: (_finite(v) if isinstance(v, float) else v) for k, v in asdict(s).items()},
         "wall_s": wall_s.get((name, n)), "ttft_cdf": ttft_cdf(r), "ttft_cdf_excl_cold": ttft_cdf(r, count_cold_start=False),
         "stats": asdict(r.stats)}
        for name, by_n in runs.items() for n, (s, r) in sorted(by_n.items())]}
    path.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")


def write_csv(path: Path, runs: Runs, wall_s: Mapping[tuple[str, int], float]) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(CSV_FIELDS)
        for name, by_n in runs.items():
            for n, (s, _) in sorted(by_n.items()):
                w.writerow([s.system, s.model, s.functions, s.requests, s.slo_met, f"{s.attainment:.4f}",
                            s.slo_met_excl_cold, f"{s.attainment_excl_cold:.4f}", s.dropped,
                            f"{s.ttft_p50_s:.3f}", f"{s.ttft_p99_s:.3f}",
                            f"{s.decode_tok_per_node_s.get('cpu', 0.0):.2f}",
                            f"{s.decode_tok_per_node_s.get('gpu', 0.0):.2f}",
                            f"{s.avg_nodes_in_use.get('cpu', 0.0):.3f}", f"{s.avg_nodes_in_use.get('gpu', 0.0):.3f}",
                            f"{s.avg_nodes_in_use['total']:.3f}", s.preemptions, s.preempted_requests, s.loads,
                            s.loads_from_disk, *(s.misses[c.value] for c in MissCause),
                            f"{wall_s.get((name, n), 0.0):.2f}"])


def write_plots(out: Path, runs: Runs, model: str) -> list[Path]:
    import logging

    import matplotlib

    matplotlib.use("Agg")
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    import matplotlib.pyplot as plt

    paths = []
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, by_n in runs.items():
        ns = sorted(by_n)
        ax.plot(ns, [by_n[n][0].attainment for n in ns], marker="o", label=name)
    ax.axhline(0.95, color="grey", linestyle=":", linewidth=1)
    ax.set(xlabel="functions", ylabel="requests meeting SLO (fraction)", title=f"SLO attainment, {model}",
           ylim=(0, 1.02))
    ax.legend()
    paths.append(_save(fig, out / "slo_attainment.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, by_n in runs.items():
        n = max(by_n)
        cdf = ttft_cdf(by_n[n][1])
        if cdf:
            ax.step([c[0] for c in cdf], [c[1] for c in cdf], where="post", label=f"{name} ({n} fn)")
    ax.set(xlabel="TTFT (s, cold starts counted)", ylabel="fraction of requests", xscale="log",
           title=f"TTFT CDF, {model}")
    ax.legend()
    paths.append(_save(fig, out / "ttft_cdf.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, by_n in runs.items():
        ns = sorted(by_n)
        ax.plot(ns, [by_n[n][0].avg_nodes_in_use["total"] for n in ns], marker="o", label=name)
    ax.set(xlabel="functions", ylabel="average nodes in use", title=f"Nodes used, {model}")
    ax.legend()
    paths.append(_save(fig, out / "nodes_used.png"))
    return paths


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
