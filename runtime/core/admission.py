"""Admission: may a request join an instance on this device now?

Yes only if, with it added,
  compute  Σ over the device's instances of est_decode(avg context, batch) / TPOT <= 1
           (each instance's share of the device needed to emit one token per TPOT);
  prefill  an EDF replay of the device from now (pending prefills in chunks, and each decoding
           instance as a stream of iterations due every TPOT from its next-token deadline) meets
           every deadline that it met without the newcomer. Decodes that are ahead of schedule
           yield the device to a prefill exactly as the arbiter would, so a burst of prompts may
           use the slack of running streams without making any of them late;
  memory   the request's KV reservation fits in the device's free blocks;
  context  the prompt leaves room for at least one output token.
A refusal carries its reason and a Retry-After hint so the caller can go elsewhere at once.
"""

from __future__ import annotations

import enum
import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass

from runtime.core.estimator import LatencyEstimator


class RefusalReason(enum.Enum):
    COMPUTE = "compute"
    PREFILL = "prefill"
    MEMORY = "memory"
    CONTEXT = "context"


@dataclass(frozen=True)
class PendingPrefill:
    tokens_left: int
    deadline_s: float  # absolute time its first token is due


@dataclass(frozen=True)
class InstanceLoad:
    instance_id: str
    estimator: LatencyEstimator
    tpot_s: float
    batch: int  # requests decoding
    avg_context: float  # mean context of those requests
    prefills: tuple[PendingPrefill, ...] = ()
    max_context_tokens: int = 1 << 30
    # Earliest next-token deadline among the decoding requests; None means "due now" (the
    # cautious reading when the caller does not know).
    decode_deadline_s: float | None = None

    def demand(self, extra_requests: int = 0, extra_context: float = 0.0) -> float:
        batch = self.batch + extra_requests
        if batch <= 0:
            return 0.0
        ctx = (self.avg_context * self.batch + extra_context) / batch
        return self.estimator.decode_s(ctx, batch) / self.tpot_s


@dataclass(frozen=True)
class NewRequest:
    prompt_tokens: int
    ttft_deadline_s: float  # absolute
    reserve_blocks: int


@dataclass(frozen=True)
class Decision:
    admitted: bool
    reason: RefusalReason | None = None
    retry_after_s: float = 0.0
    detail: str = ""


ADMIT = Decision(True)


def device_demand(instances: Sequence[InstanceLoad], target: str | None = None, new_prompt: int = 0) -> float:
    return sum(i.demand(1, new_prompt) if i.instance_id == target else i.demand() for i in instances)


REPLAY_CHUNK_TOKENS = 512  # prefill granularity in the replay (the engine's default chunk)
REPLAY_MAX_ITERATIONS = 5_000  # a bound on the replay's work; far beyond any real horizon
LATENESS_TOLERANCE_S = 1e-6  # float noise, not slack


@dataclass
class _Stream:
    """One decoding instance in the replay: its next iteration is due at deadline_s."""

    deadline_s: float
    batch: int
    avg_context: float
    tpot_s: float
    est: LatencyEstimator
    cost_s: float = 0.0

    def __post_init__(self) -> None:
        self.cost_s = self.est.decode_s(self.avg_context, self.batch)

    def join(self, tokens: int) -> None:
        """One more request in the batch: every later iteration costs a little more."""
        self.avg_context = (self.avg_context * self.batch + tokens) / (self.batch + 1)
        self.batch += 1
        self.cost_s = self.est.decode_s(self.avg_context, self.batch)


def replay_lateness(instances: Sequence[InstanceLoad], extra: tuple[str, PendingPrefill] | None,
                    now: float, horizon_s: float | None = None,
                    chunk_tokens: int = REPLAY_CHUNK_TOKENS) -> dict[str, float]:
    """Replay the device under EDF from now: every pending prefill runs to completion, and the
    decode streams run while they are due no later than horizon_s (default: the last prefill
    deadline), so two replays with one horizon cover the same stretch of time.

    Jobs: each pending prefill (in chunks of chunk_tokens, due at its TTFT deadline) and each
    decoding instance (one iteration at a time, due at its next-token deadline, which then moves
    on by its TPOT). A finished prefill joins its instance's decode stream. Ties go to decode.
    A stream left behind by a prefill keeps running past the horizon until it is back on time.
    Returns the lateness (seconds, > 0) of every job that finishes late, keyed "p<k>" for the
    k-th existing prefill in EDF order, "new" for the newcomer, "d:<instance>" for a decode
    stream (its worst iteration)."""
    est = {i.instance_id: i.estimator for i in instances}
    tpot = {i.instance_id: i.tpot_s for i in instances}
    streams: dict[str, _Stream] = {}
    for inst in instances:
        if inst.batch > 0:  # unknown deadline: take it as on schedule, due one TPOT from now
            d = now + inst.tpot_s if inst.decode_deadline_s is None else inst.decode_deadline_s
            streams[inst.instance_id] = _Stream(d, inst.batch, inst.avg_context, inst.tpot_s, inst.estimator)
    jobs: list[tuple[float, int, str, int]] = []
    for inst in instances:
        for p in inst.prefills:
            jobs.append((p.deadline_s, len(jobs), inst.instance_id, p.tokens_left))
    if extra is not None:
        iid, p = extra
        jobs.append((p.deadline_s, -1, iid, p.tokens_left))
    jobs.sort(key=lambda j: (j[0], j[1]))
    horizon = max((j[0] for j in jobs), default=now) if horizon_s is None else horizon_s
    late: dict[str, float] = {}

    def finish(key: str, t: float, deadline: float) -> None:
        if t > deadline:
            late[key] = max(late.get(key, 0.0), t - deadline)

    # Streams in a heap by (deadline, id); the one popped is the one EDF would run.
    heap = [(st.deadline_s, sid) for sid, st in streams.items()]
    heapq.heapify(heap)
    t = now
    i = 0  # next prefill in EDF order; prefills never reorder among themselves
    left = jobs[0][3] if jobs else 0
    for _ in range(REPLAY_MAX_ITERATIONS):
        urgent = streams[heap[0][1]] if heap else None
        if i < len(jobs):
            due = jobs[i][0]
        elif urgent is not None and (urgent.deadline_s <= horizon or t + urgent.cost_s > urgent.deadline_s):
            due = math.inf  # streams run to the horizon, and on while behind (to see how late)
        else:
            break
        if urgent is not None and urgent.deadline_s <= due:
            sid = heap[0][1]
            t += urgent.cost_s
            finish(f"d:{sid}", t, urgent.deadline_s)
            urgent.deadline_s += urgent.tpot_s
            heapq.heapreplace(heap, (urgent.deadline_s, sid))
            continue
        deadline, key, iid, tokens = jobs[i]
        chunk = min(left, chunk_tokens)
        t += est[iid].prefill_s(chunk)
        left -= chunk
        if left > 0:
            continue
        finish("new" if key < 0 else f"p{key}", t, deadline)
        joined = streams.get(iid)
        if joined is None:
            streams[iid] = _Stream(deadline + tpot[iid], 1, float(tokens), tpot[iid], est[iid])
            heapq.heappush(heap, (deadline + tpot[iid], iid))
        else:
            joined.join(tokens)
        i += 1
        left = jobs[i][3] if i < len(jobs) else 0
    return late


def admit(instances: Sequence[InstanceLoad], target: str, req: NewRequest, free_blocks: int, now: float) -> Decision:
    inst = next((i for i in instances if i.instance_id == target), None)
    if inst is None:
        raise KeyError(f"instance {target!r} is not on this device")
    if req.prompt_tokens >= inst.max_context_tokens:
        return Decision(False, RefusalReason.CONTEXT, 0.0,
                        f"prompt has {req.prompt_tokens} tokens; the context is {inst.max_context_tokens}")
    if req.reserve_blocks > free_blocks:
        return Decision(False, RefusalReason.MEMORY, 1.0,
                        f"needs {req.reserve_blocks} KV blocks, {free_blocks} free")
    demand = device_demand(instances, target, req.prompt_tokens)
    if demand > 1.0:
        return Decision(False, RefusalReason.COMPUTE, 1.0, f"decode demand would be {demand:.2f} of the device")
    newcomer = PendingPrefill(req.prompt_tokens, req.ttft_deadline_s)
    after = replay_lateness(instances, (target, newcomer), now)
    horizon = max([newcomer.deadline_s, *(p.deadline_s for i in instances for p in i.prefills)])
    before = replay_lateness(instances, None, now, horizon)
    # Only lateness the newcomer adds counts: a job already late is late either way.
    hurt = {k: v for k, v in after.items() if v > before.get(k, 0.0) + LATENESS_TOLERANCE_S}
    if hurt:
        worst = max(hurt.values())
        keys = sorted(hurt)
        who = ", ".join(keys[:6]) + (f" and {len(keys) - 6} more" if len(keys) > 6 else "")
        return Decision(False, RefusalReason.PREFILL, max(0.1, worst),
                        f"deadlines would be missed by up to {worst:.3f}s ({who})")
    return ADMIT
