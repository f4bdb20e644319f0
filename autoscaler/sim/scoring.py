"""Scoring a run as the SLINFER paper does.

A request meets its SLO when
    TTFT <= max(0.5 s, prompt_tokens / 512 s)   and   mean TPOT <= 0.25 s,
TTFT measured from arrival to the first token, mean TPOT = (finish - first token) / (output - 1)
(0 for a one-token output). A dropped request is a miss. With ``count_cold_start=False`` (the
artifact's convention) the time a request spent waiting for a model load is taken out of its TTFT.
The formula is ``functions.SLO`` (the same object the runtime's deadlines use).

Each miss also gets one cause (``MissCause``), and the score breaks requests down by how busy
their function is (``RankBand``): where a capacity figure is lost, without a script of one's own.
"""

from __future__ import annotations

import enum
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from autoscaler.sim.simulator import RequestRecord, RunResult
from functions import SLO


def ttft_s(r: RequestRecord, count_cold_start: bool = True) -> float:
    """Time to first token (inf when dropped)."""
    if r.first_token_s is None:
        return math.inf
    ttft = r.first_token_s - r.arrival_s
    return ttft if count_cold_start else ttft - r.load_delay_s


def mean_tpot_s(r: RequestRecord) -> float:
    if r.first_token_s is None or r.finish_s is None:
        return math.inf
    return (r.finish_s - r.first_token_s) / (r.output_tokens - 1) if r.output_tokens > 1 else 0.0


def meets_slo(r: RequestRecord, slo: SLO | None = None, count_cold_start: bool = True) -> bool:
    slo = slo or SLO()
    if r.first_token_s is None:
        return False
    return ttft_s(r, count_cold_start) <= slo.ttft_s(r.prompt_tokens) and mean_tpot_s(r) <= slo.tpot_s


class MissCause(enum.Enum):
    """Why a request missed its SLO, the first that applies in this order."""

    DROPPED = "dropped"  # never served: no instance admitted it before its first-token deadline
    TTFT_LOAD = "ttft_load"  # first token late, and it had waited for a model load
    TTFT = "ttft"  # first token late, no load
    TPOT = "tpot"  # first token on time, mean time per output token over the SLO


def miss_cause(r: RequestRecord, slo: SLO | None = None) -> MissCause | None:
    """None when the request met its SLO (cold starts counted)."""
    slo = slo or SLO()
    if r.first_token_s is None:
        return MissCause.DROPPED
    if ttft_s(r) > slo.ttft_s(r.prompt_tokens):
        return MissCause.TTFT_LOAD if r.load_delay_s > 0 else MissCause.TTFT
    if mean_tpot_s(r) > slo.tpot_s:
        return MissCause.TPOT
    return None


def _misses(reqs: Sequence[RequestRecord], slo: SLO | None) -> dict[str, int]:
    got = Counter(miss_cause(r, slo) for r in reqs)
    return {c.value: got[c] for c in MissCause}


@dataclass(frozen=True)
class RankBand:
    """The requests of the functions ranked first..last by request count (1 = busiest)."""

    first: int
    last: int
    functions: int
    requests: int
    slo_met: int
    misses: dict[str, int]  # by MissCause value
    served_on: dict[str, int]  # requests whose first token came from each device kind


def rank_bands(result: RunResult, slo: SLO | None = None, first_band: int = 8) -> list[RankBand]:
    """Functions ranked by their request count in the run (ties by name), in bands 1..8, 9..16,
    17..32, ... (each band after the first as wide as all before it): in the paper's traces a few
    functions send most requests, and this shows whether a system loses the busy ones or the tail."""
    counts = Counter(r.function for r in result.requests)
    ranked = sorted(counts, key=lambda f: (-counts[f], f))
    bands = []
    first, last = 1, first_band
    while first <= len(ranked):
        fns = set(ranked[first - 1:last])
        reqs = [r for r in result.requests if r.function in fns]
        misses = _misses(reqs, slo)
        bands.append(RankBand(first, min(last, len(ranked)), len(fns), len(reqs), len(reqs) - sum(misses.values()),
                              misses, dict(Counter(r.device for r in reqs if r.device is not None))))
        first, last = last + 1, 2 * last
    return bands


@dataclass(frozen=True)
class Score:
    system: str
    model: str
    functions: int
    requests: int
    slo_met: int
    slo_met_excl_cold: int
    dropped: int
    attainment: float  # slo_met / requests
    attainment_excl_cold: float
    ttft_p50_s: float
    ttft_p99_s: float
    decode_tok_per_node_s: dict[str, float]  # per device kind: decode tokens / node-seconds in use
    avg_nodes_in_use: dict[str, float]  # per device kind, and "total"
    preemptions: int  # instances evicted
    preempted_requests: int
    loads: int
    loads_from_disk: int
    misses: dict[str, int]  # by MissCause value; they sum to requests - slo_met
    by_rank: tuple[RankBand, ...]


def _quantile(sorted_values: Sequence[float], q: float) -> float:
    if not sorted_values:
        return math.nan
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def score(result: RunResult, slo: SLO | None = None) -> Score:
    reqs = result.requests
    n = len(reqs)
    met = sum(meets_slo(r, slo) for r in reqs)
    met_ex = sum(meets_slo(r, slo, count_cold_start=False) for r in reqs)
    ttfts = sorted(ttft_s(r) for r in reqs)
    st = result.stats
    duration = st.duration_s or 1.0
    tok = {k: (st.decode_tokens[k] / st.node_seconds[k] if st.node_seconds[k] else 0.0) for k in st.decode_tokens}
    nodes = {k: v / duration for k, v in st.node_seconds.items()}
    nodes["total"] = sum(st.node_seconds.values()) / duration
    return Score(result.system, result.model, result.functions, n, met, met_ex,
                 sum(r.first_token_s is None for r in reqs), met / n if n else 1.0, met_ex / n if n else 1.0,
                 _quantile(ttfts, 0.5), _quantile(ttfts, 0.99), tok, nodes, st.evictions, st.preempted_requests,
                 st.loads, st.loads_from_disk, _misses(reqs, slo), tuple(rank_bands(result, slo)))


def ttft_cdf(result: RunResult, points: int = 200, count_cold_start: bool = True) -> list[tuple[float, float]]:
    """(TTFT seconds, fraction of all requests with at most that TTFT); dropped ones never count,
    so the curve tops out at the served fraction."""
    values = sorted(t for t in (ttft_s(r, count_cold_start) for r in result.requests) if math.isfinite(t))
    n = len(result.requests)
    if not values or not n:
        return []
    step = max(1, len(values) // points)
    out = [(values[i], (i + 1) / n) for i in range(0, len(values), step)]
    if out[-1][0] != values[-1]:
        out.append((values[-1], len(values) / n))
    return out
