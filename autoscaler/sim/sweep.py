"""Capacity sweep: the paper's load levels and the largest one a system serves within its SLOs.

Load level g keeps the first g functions of each consecutive group of 8 (``Trace.select_groups``):
g = 1..8 give 16..128 functions of the 128-function trace. A system's capacity at a target (0.95,
also 0.90 and 0.99) is the largest function count such that it and every smaller level swept reach
at least that fraction of requests meeting their SLO (0 if even the smallest misses), so a lucky
dip at one heavy level does not overstate it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from autoscaler.sim.config import ClusterSpec, ModelSpec, SystemConfig
from autoscaler.sim.loading import LoadModel
from autoscaler.sim.scoring import Score, score
from autoscaler.sim.simulator import RunResult, simulate
from autoscaler.sim.trace import Trace

TARGETS = (0.90, 0.95, 0.99)


def capacity(attainment: Mapping[int, float | None], target: float) -> int:
    """Largest n (of those swept) with attainment >= target at n and at every smaller n: the load
    up to which the system holds. A level not run (None: the sweep stopped after a collapse)
    counts as a miss. The capacity figure of the simulator and of bench/bench_capacity.py."""
    best = 0
    for n in sorted(attainment):
        v = attainment[n]
        if v is None or v < target:
            break
        best = n
    return best


def capacity_any(attainment: Mapping[int, float | None], target: float) -> int:
    """Largest n with attainment >= target whatever happened at smaller n (a lucky level counts):
    reported beside ``capacity`` because a noisy sweep can pass again after a miss."""
    return max((n for n, v in attainment.items() if v is not None and v >= target), default=0)


def levels(trace: Trace, group_size: int = 8, groups: Sequence[int] | None = None) -> list[tuple[int, Trace]]:
    """(function count, trace) for g = 1..group_size (or the given g's)."""
    out = []
    for g in groups or range(1, group_size + 1):
        t = trace.select_groups(g, group_size)
        out.append((len(t.functions), t))
    return out


def sweep(trace: Trace, model: ModelSpec, cluster: ClusterSpec, systems: Sequence[SystemConfig], *,
          groups: Sequence[int] | None = None, load_model: LoadModel | None = None,
          progress: Callable[[str], None] | None = None) -> dict[str, dict[int, tuple[Score, RunResult]]]:
    """Run every system at every load level; {system: {functions: (score, result)}}."""
    out: dict[str, dict[int, tuple[Score, RunResult]]] = {}
    for cfg in systems:
        out[cfg.name] = {}
        for n, t in levels(trace, groups=groups):
            result = simulate(t, model, cluster, cfg, load_model)
            s = score(result)
            out[cfg.name][n] = (s, result)
            if progress is not None:
                progress(f"{cfg.name} n={n}: {s.slo_met}/{s.requests} SLO met ({s.attainment:.3f})")
    return out
