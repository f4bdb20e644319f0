"""Admission: may a request join an instance on this device now?

Yes only if, with it added,
  compute  Σ over the device's instances of est_decode(avg context, batch) / TPOT <= 1
           (each instance's share of the device needed to emit one token per TPOT);
  prefill  an EDF replay of all pending prefills on the device, from now, meets every deadline
           that it met without the newcomer (prefill gets the share decode leaves free);
  memory   the request's KV reservation fits in the device's free blocks;
  context  the prompt leaves room for at least one output token.
A refusal carries its reason and a Retry-After hint so the caller can go elsewhere at once.
"""

from __future__ import annotations

import enum
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


def replay_misses(instances: Sequence[InstanceLoad], extra: tuple[str, PendingPrefill] | None,
                  decode_share: float, now: float) -> tuple[set[int], float]:
    """Run every pending prefill in EDF order from now at the device share decode leaves free.
    Returns the indices (in EDF order of the existing ones, newcomer = -1) that finish late, and
    the worst lateness in seconds."""
    est = {i.instance_id: i.estimator for i in instances}
    jobs: list[tuple[float, int, str, int]] = []
    k = 0
    for inst in instances:
        for p in inst.prefills:
            jobs.append((p.deadline_s, k, inst.instance_id, p.tokens_left))
            k += 1
    if extra is not None:
        iid, p = extra
        jobs.append((p.deadline_s, -1, iid, p.tokens_left))
    jobs.sort(key=lambda j: (j[0], j[1]))
    share = max(1e-6, 1.0 - decode_share)
    t = now
    misses: set[int] = set()
    worst = 0.0
    for deadline, key, iid, tokens in jobs:
        t += est[iid].prefill_s(tokens) / share
        if t > deadline:
            misses.add(key)
            worst = max(worst, t - deadline)
    return misses, worst


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
    base = device_demand(instances)
    before, _ = replay_misses(instances, None, base, now)
    # The newcomer decodes only after its prefill, so the replay uses today's decode share.
    after, worst = replay_misses(instances, (target, PendingPrefill(req.prompt_tokens, req.ttft_deadline_s)),
                                 base, now)
    if after - before:
        return Decision(False, RefusalReason.PREFILL, max(0.1, worst),
                        f"pending prefills would miss their deadlines by up to {worst:.3f}s")
    return ADMIT
