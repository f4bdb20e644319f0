"""Per-device arbiter: which instance runs the next iteration(s).

Only one instance computes on a device at a time. Before every grant the arbiter picks the
instance holding the request with the earliest next-token deadline (EDF):
    deadline = arrival + load_delay + TTFT_SLO(prompt) + TPOT_SLO * tokens_emitted
until the first token; after it, the first token's actual time replaces its deadline:
    deadline = first_token + TPOT_SLO * tokens_emitted
Idle instances are not candidates, so they cost nothing. A grant is a quota of iterations: one
for a prefill or on a CPU, a few for GPU decode (to amortise the hand-off). Ties break by
instance id, so decisions are deterministic.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

# Deadlines and admission plan against SLOs 5% tighter than promised (the paper's scheduler
# margin): EDF runs each token just in time, so an estimate a little short of the real step
# would otherwise land the last token just past its SLO. The SLO itself (scoring) is unchanged.
SLO_MARGIN = 0.05

# The smallest prefill chunk a step may carry when a decode deadline is near: the prompt must
# still progress, and below a block or so the per-step overhead dominates.
MIN_PREFILL_CHUNK = 32

# The longest a step carrying a prefill chunk may take, by the estimate. A step cannot be
# interrupted, so a request arriving just as it starts waits for all of it before its own prefill:
# a whole 512-token chunk (1.5 s on a 2-core CPU) would sink any 0.5 s TTFT. 0.2 s leaves a short
# prompt ~0.3 s for its own prefill; per-token prefill cost is flat from ~64 tokens on a CPU, so
# long prompts lose little, and on a GPU (a 512 chunk in ~30 ms) the cap never binds.
MAX_PREFILL_STEP_S = 0.2


class DeviceKind(enum.Enum):
    CPU = "cpu"
    GPU = "gpu"


class Phase(enum.Enum):
    PREFILL = "prefill"
    DECODE = "decode"


def next_token_deadline(arrival_s: float, ttft_slo_s: float, tpot_slo_s: float, tokens_emitted: int,
                        load_delay_s: float = 0.0, first_token_s: float | None = None) -> float:
    if first_token_s is not None and tokens_emitted > 0:
        # The TPOT SLO is the mean time per token after the first: the last token is due at
        # first + TPOT x (n - 1). The paper's formula equals this only when the first token came
        # exactly at its deadline; an early first token would lend its TTFT slack to every later
        # token, and EDF would let the stream drift past its TPOT.
        return first_token_s + tpot_slo_s * tokens_emitted
    return arrival_s + load_delay_s + ttft_slo_s + tpot_slo_s * tokens_emitted


@dataclass(frozen=True)
class Candidate:
    """What the arbiter needs to know about one instance with work."""

    instance_id: str
    deadline_s: float  # earliest next-token deadline among its requests
    phase: Phase  # what its next iteration would be
    decode_quota: int = 1  # iterations per grant for GPU decode (4 for 3B, 2 for 7B, 1 for 13B)


@dataclass(frozen=True)
class Grant:
    instance_id: str
    iterations: int
    deadline_s: float


def pick(candidates: Iterable[Candidate], device: DeviceKind) -> Grant | None:
    """EDF choice among instances that have work; None when the device has nothing to do."""
    best: Candidate | None = None
    for c in candidates:
        if best is None or (c.deadline_s, c.instance_id) < (best.deadline_s, best.instance_id):
            best = c
    if best is None:
        return None
    quota = 1
    if device is DeviceKind.GPU and best.phase is Phase.DECODE:
        quota = max(1, best.decode_quota)
    return Grant(best.instance_id, quota, best.deadline_s)


def prefill_chunk_budget(prefill_s: Callable[[int], float], slack_s: float, max_tokens: int,
                         floor: int = MIN_PREFILL_CHUNK) -> int | None:
    """The most prompt tokens one step may prefill so that it ends within ``slack_s`` (the time to
    the device's earliest next-token deadline of a decoding request, or the step cap if sooner),
    by the estimate ``prefill_s(tokens)``; at least ``floor``, at most ``max_tokens``. None (no
    cap) when the slack is infinite. A decode waits for the whole step it shares with a chunk, and
    a chunk that ends past the stream's deadline makes it late however the arbiter orders instances."""
    if math.isinf(slack_s):
        return None
    lo, hi = min(floor, max_tokens), max_tokens
    if prefill_s(hi) <= slack_s:
        return hi
    while lo < hi:  # largest n in [floor, max] with prefill_s(n) <= slack (monotone estimate)
        mid = (lo + hi + 1) // 2
        if prefill_s(mid) <= slack_s:
            lo = mid
        else:
            hi = mid - 1
    return lo
