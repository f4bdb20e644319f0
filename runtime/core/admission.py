"""Admission: may a request join an instance on this device now?

Yes only if, with it added,
  context  the prompt leaves room for at least one output token;
  memory   the request's KV reservation fits in the device's free blocks;
  deadlines an EDF replay of the device from now, as the arbiter would run it, adds no lateness
           to any job: pending prefills (in chunks, due at their TTFT deadlines) and each
           decoding instance (one iteration at a time, due at its earliest next-token deadline,
           which then moves on by TPOT). The TPOT SLO is on the mean, so a request with a bounded
           output only needs its last token on time (arrival + TTFT + TPOT x (n - 1)); a token in
           the middle may slip if the stream catches up. Decodes ahead of schedule yield the device to a prefill,
           so a burst of prompts may use the slack of running streams but never make one late.
           When every request's output length is bounded (max_tokens), the replay runs until all
           of them finish: that is the whole future of the work on the device, and admission is
           exact up to the estimator's error. Otherwise the replay runs to the last prefill
           deadline and the steady-state rule of the paper guards the rest:
  compute  Σ over the device's instances of est_decode(avg context, batch) / TPOT <= 1
           (each instance's share of the device needed to emit one token per TPOT).
A newcomer whose own prefill, alone on the device from now, would end past its deadline is
refused on prefill at once, before any replay: nothing could serve it in time.
Displacement (``displace=True``, beyond the paper): a newcomer refused on prefill deadlines is
admitted instead if handing back one waiting prompt that has no token out yet and at least 1.5 x
the newcomer's prefill time left makes every deadline hold again (see `displacing`). The count of
jobs on time stays the same and device time is freed for the next arrival; the handed-back request
goes elsewhere with its continuation, as after an eviction. In a burst this sheds the longest
prompt rather than the next short one.
The newcomer's own first token is held to its SLO (``NewRequest.own_slack_s``: the room between
its planning deadline, 5% tighter, and the SLO), every admitted job's to the planning deadline:
the margin guards work already taken against estimate error, while refusing a newcomer that the
(pessimistic) estimate still serves within its SLO turns a likely hit into a sure miss.
A refusal carries its reason (compute when decode work no longer fits, prefill when a first
token would be late) and a Retry-After hint so the caller can go elsewhere at once. An idle
device admits whatever fits in memory and context: there is nothing to protect, and no other
device would serve the newcomer sooner.
"""

from __future__ import annotations

import dataclasses
import enum
import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from runtime.core.estimator import LatencyEstimator

UNBOUNDED = math.inf  # an output length nobody bounded
REPLAY_CHUNK_TOKENS = 512  # default prefill granularity in the replay (the engine's largest chunk)


class RefusalReason(enum.Enum):
    COMPUTE = "compute"
    PREFILL = "prefill"
    MEMORY = "memory"
    CONTEXT = "context"


@dataclass(frozen=True)
class PendingPrefill:
    tokens_left: int
    deadline_s: float  # absolute time its first token is due
    output_tokens: float = UNBOUNDED  # tokens it may still decode after its first
    key: str = ""  # the request's id: names it in lateness and in a displacement ("p<i>" if empty)
    displaceable: bool = False  # no token out yet: it can be handed back whole (see `admit`)


@dataclass(frozen=True)
class PendingDecode:
    tokens_left: float  # tokens it may still emit (UNBOUNDED if unknown)
    deadline_s: float  # absolute time its next token is due


@dataclass(frozen=True)
class InstanceLoad:
    instance_id: str
    estimator: LatencyEstimator
    tpot_s: float
    batch: int  # requests decoding
    avg_context: float  # mean context of those requests
    prefills: tuple[PendingPrefill, ...] = ()
    max_context_tokens: int = 1 << 30
    # Earliest next-token deadline among the decoding requests; None means "on schedule" (due
    # one TPOT from now) when the caller does not know.
    decode_deadline_s: float | None = None
    # The decoding requests one by one; None: `batch` requests, unbounded, due at decode_deadline_s.
    decodes: tuple[PendingDecode, ...] | None = None
    prefill_chunk_tokens: int = REPLAY_CHUNK_TOKENS  # prompt tokens per prefill step

    def __post_init__(self) -> None:
        if self.prefill_chunk_tokens < 1:
            raise ValueError(f"prefill_chunk_tokens must be >= 1, got {self.prefill_chunk_tokens}")

    def demand(self, extra_requests: int = 0, extra_context: float = 0.0) -> float:
        batch = self.batch + extra_requests
        if batch <= 0:
            return 0.0
        ctx = (self.avg_context * self.batch + extra_context) / batch
        return self.estimator.decode_s(ctx, batch) / self.tpot_s

    def pending_decodes(self, now: float) -> tuple[PendingDecode, ...]:
        if self.decodes is not None:
            return self.decodes
        due = now + self.tpot_s if self.decode_deadline_s is None else self.decode_deadline_s
        return tuple(PendingDecode(UNBOUNDED, due) for _ in range(self.batch))

    def bounded(self) -> bool:
        return (self.decodes is not None or self.batch == 0) and all(
            math.isfinite(p.output_tokens) for p in self.prefills)


@dataclass(frozen=True)
class NewRequest:
    prompt_tokens: int
    ttft_deadline_s: float  # absolute
    reserve_blocks: int
    output_tokens: float = UNBOUNDED  # tokens it may decode after its first (max_tokens - 1)
    # How far past ttft_deadline_s its own first token may be planned: the room between the
    # planning deadline (the SLO less the scheduler's margin) and the SLO itself. The margin guards
    # admitted work against estimate error; refusing a newcomer that the (already pessimistic)
    # estimate still serves within its SLO would make a sure miss of a likely hit.
    own_slack_s: float = 0.0
    # Leading prompt tokens whose KV the instance has cached (prefix caching): not computed again.
    cached_tokens: int = 0

    @property
    def prefill_tokens(self) -> int:
        return self.prompt_tokens - self.cached_tokens


@dataclass(frozen=True)
class Decision:
    admitted: bool
    reason: RefusalReason | None = None
    retry_after_s: float = 0.0
    detail: str = ""
    # Admitted on condition that this pending prefill (instance id, key) is handed back first.
    displace: tuple[str, str] | None = None


ADMIT = Decision(True)


def device_demand(instances: Sequence[InstanceLoad], target: str | None = None, new_prompt: int = 0) -> float:
    return sum(i.demand(1, new_prompt) if i.instance_id == target else i.demand() for i in instances)


REPLAY_TAIL_S = 5.0  # how far past the last prefill deadline the replay follows decode streams
REPLAY_MAX_ITERATIONS = 20_000  # a bound on the replay's work; far beyond any real horizon
LATENESS_TOLERANCE_S = 1e-6  # float noise, not slack


COST_REFRESH_TOKENS = 32  # re-estimate a stream's step cost after its context grew this much


@dataclass
class _Stream:
    """One decoding instance in the replay. Every request emits one token per iteration, so a
    request is kept as (iteration of its last token, its deadline at iteration 0) and nothing
    per request changes while the stream runs: an iteration costs O(1) plus its finishers."""

    iid: str
    est: LatencyEstimator
    tpot_s: float
    context: float
    k: int = 0  # iterations run
    n: int = 0  # requests in the batch
    ends: dict[int, list[float]] = field(default_factory=dict)  # last iteration -> base deadlines
    unbounded: list[float] = field(default_factory=list)  # base deadlines of requests without an end
    base_min: float = math.inf  # earliest base deadline among all requests
    cost_s: float = 0.0
    _costed_at: float = 0.0  # context at the last cost estimate

    deadline_s: float = math.inf  # the earliest next-token deadline, base_min + TPOT x k (cached)

    def _refresh(self) -> None:
        bases = [*self.unbounded, *(d for ds in self.ends.values() for d in ds)]
        self.base_min = min(bases, default=math.inf)
        self.deadline_s = self.base_min + self.tpot_s * self.k
        self._cost()

    def _cost(self) -> None:
        if self.n:
            self.cost_s = self.est.decode_s(self.context, self.n)
            self._costed_at = self.context

    def add(self, tokens_left: float, deadline_s: float, context: float, recost: bool = True) -> None:
        """A request joins (``recost=False`` while filling a batch: the caller costs it once)."""
        self.context = (self.context * self.n + context) / (self.n + 1)
        self.n += 1
        base = deadline_s - self.tpot_s * self.k
        if math.isfinite(tokens_left):
            self.ends.setdefault(self.k + max(1, math.ceil(tokens_left)), []).append(base)
        else:
            self.unbounded.append(base)
        self.base_min = min(self.base_min, base)
        self.deadline_s = self.base_min + self.tpot_s * self.k
        if recost:
            self._cost()

    def run_ahead(self, t: float, limit_s: float, late: dict[str, float]) -> tuple[float, int]:
        """The iterations EDF would run back to back (next-token deadline before ``limit_s``: no
        other job is due sooner) that change nothing but the clock: none finishes a request, none
        re-estimates the cost. Exactly what ``iterate`` would do one by one, without its
        bookkeeping; returns the clock after them and how many ran. Most of a replay is such runs
        of one stream while a prefill waits for its turn or after the last one."""
        steps_free = min(self.ends, default=REPLAY_MAX_ITERATIONS + self.k) - self.k - 1
        first_due = min(self.unbounded, default=math.inf)  # unbounded: every token must be on time
        steps = 0
        while (steps < steps_free and self.deadline_s < limit_s
               and self.context + 1 - self._costed_at < COST_REFRESH_TOKENS):
            t += self.cost_s
            if t > self.deadline_s and t > first_due + self.tpot_s * self.k:
                key = f"d:{self.iid}"
                late[key] = max(late.get(key, 0.0), t - (first_due + self.tpot_s * self.k))
            self.k += 1
            self.deadline_s += self.tpot_s
            self.context += 1
            steps += 1
        return t, steps

    def iterate(self, t: float, late: dict[str, float]) -> None:
        """One decode iteration that ended at t: every request emits a token. The TPOT SLO is on
        the mean, so a bounded request is late only if its last token is; an unbounded one has no
        last token, so each of its tokens must be on time."""
        now_k = self.k
        self.k += 1
        finished = self.ends.pop(self.k, None)
        due_now = self.deadline_s
        self.deadline_s += self.tpot_s
        if t > due_now:
            key = f"d:{self.iid}"
            for base in [*self.unbounded, *(finished or ())]:
                due = base + self.tpot_s * now_k
                if t > due:
                    late[key] = max(late.get(key, 0.0), t - due)
        self.context += 1  # every request grew by the token it emitted
        if finished:
            self.n -= len(finished)
            self._refresh()
        elif self.context - self._costed_at >= COST_REFRESH_TOKENS:
            self._cost()


@dataclass(frozen=True)
class Replay:
    late: dict[str, float]  # lateness (s, > 0) by job: "p<k>", "new", "d:<instance>"
    demand_left: float  # Σ cost/TPOT of the decode streams still running when the replay ends


def replay(instances: Sequence[InstanceLoad], extra: tuple[str, PendingPrefill] | None, now: float,
           horizon_s: float | None = None, tail_s: float = REPLAY_TAIL_S) -> Replay:
    """Replay the device under EDF from now.

    Every pending prefill runs to completion (in its instance's prefill_chunk_tokens), then joins its
    instance's decode stream. Decode streams run while their next token is due no later than
    horizon_s + tail_s (horizon default: the last prefill deadline), and on while they are
    behind (for one more tail_s at most), to see how late they get; a request leaves its stream
    after its last token. Ties go
    to decode. Two replays with one horizon cover the same stretch of time, so their lateness
    can be compared job by job; what still runs at the end is summed as steady-state demand."""
    est = {i.instance_id: i.estimator for i in instances}
    tpot = {i.instance_id: i.tpot_s for i in instances}
    chunk_tokens = {i.instance_id: i.prefill_chunk_tokens for i in instances}
    streams: dict[str, _Stream] = {}
    for inst in instances:
        for d in inst.pending_decodes(now):
            s = streams.setdefault(inst.instance_id, _Stream(inst.instance_id, inst.estimator, inst.tpot_s, 0.0))
            s.add(d.tokens_left, d.deadline_s, inst.avg_context, recost=False)
    for s in streams.values():
        s._cost()
    jobs: list[tuple[float, int, str, int, float]] = []
    names: list[str] = []
    for inst in instances:
        for p in inst.prefills:
            names.append(p.key or f"p{len(jobs)}")
            jobs.append((p.deadline_s, len(jobs), inst.instance_id, p.tokens_left, p.output_tokens))
    if extra is not None:
        iid, p = extra
        jobs.append((p.deadline_s, -1, iid, p.tokens_left, p.output_tokens))
    jobs.sort(key=lambda j: (j[0], j[1]))
    end = (max((j[0] for j in jobs), default=now) if horizon_s is None else horizon_s) + tail_s
    late: dict[str, float] = {}
    # Streams in a heap by (deadline, id): the top is the one EDF would run. A stream's entry is
    # pushed again after each of its iterations; entries that no longer match are skipped.
    heap = [(s.deadline_s, sid) for sid, s in streams.items()]
    heapq.heapify(heap)
    t = now
    i = 0  # next prefill in EDF order; prefills never reorder among themselves
    left = jobs[0][3] if jobs else 0
    iterations = 0
    while iterations < REPLAY_MAX_ITERATIONS:
        iterations += 1
        while heap and (heap[0][1] not in streams or streams[heap[0][1]].deadline_s != heap[0][0]):
            heapq.heappop(heap)
        urgent = streams[heap[0][1]] if heap else None
        if i < len(jobs):
            due = jobs[i][0]
        elif urgent is not None and (urgent.deadline_s <= end
                                     or (t + urgent.cost_s > urgent.deadline_s and t <= end + tail_s)):
            due = math.inf
        else:
            break
        if urgent is not None and urgent.deadline_s <= due:
            limit = min([due if i < len(jobs) else end,
                         *(s.deadline_s for s in streams.values() if s is not urgent)])
            t, ahead = urgent.run_ahead(t, limit, late)
            if ahead:
                iterations += ahead - 1
                heapq.heapreplace(heap, (urgent.deadline_s, urgent.iid))
                continue
            t += urgent.cost_s
            urgent.iterate(t, late)
            if urgent.n:  # its entry is the heap's top: replace it in one step
                heapq.heapreplace(heap, (urgent.deadline_s, urgent.iid))
            else:
                heapq.heappop(heap)
                del streams[urgent.iid]
            continue
        deadline, key, iid, tokens, outputs = jobs[i]
        chunk = min(left, chunk_tokens[iid])
        t += est[iid].prefill_s(chunk)
        left -= chunk
        if left > 0:
            continue
        if t > deadline:
            k = "new" if key < 0 else names[key]
            late[k] = max(late.get(k, 0.0), t - deadline)
        if outputs > 0:
            joined = streams.get(iid)
            if joined is None:
                joined = streams[iid] = _Stream(iid, est[iid], tpot[iid], 0.0)
            # Mean TPOT is measured from the first token: one that came early buys no slack.
            joined.add(outputs, min(t, deadline) + tpot[iid], float(tokens))
            heapq.heappush(heap, (joined.deadline_s, iid))
        i += 1
        left = jobs[i][3] if i < len(jobs) else 0
    return Replay(late, sum(s.cost_s / s.tpot_s for s in streams.values()))


def admit(instances: Sequence[InstanceLoad], target: str, req: NewRequest, free_blocks: int, now: float,
          displace: bool = False) -> Decision:
    inst = next((i for i in instances if i.instance_id == target), None)
    if inst is None:
        raise KeyError(f"instance {target!r} is not on this device")
    if req.prompt_tokens >= inst.max_context_tokens:
        return Decision(False, RefusalReason.CONTEXT, 0.0,
                        f"prompt has {req.prompt_tokens} tokens; the context is {inst.max_context_tokens}")
    if req.reserve_blocks > free_blocks:
        return Decision(False, RefusalReason.MEMORY, 1.0,
                        f"needs {req.reserve_blocks} KV blocks, {free_blocks} free")
    if all(i.batch == 0 and not i.prefills for i in instances):
        # An idle device has no deadline to protect, and nowhere is the newcomer served sooner.
        # Refusing it on a pessimistic estimate would also starve the estimator of the very
        # observations that correct it (a profile taken on a busy host would refuse forever).
        return ADMIT
    own_s = prefill_time(inst, req.prefill_tokens)
    if now + own_s > req.ttft_deadline_s + req.own_slack_s + LATENESS_TOLERANCE_S:
        # Late even if it ran alone from now: no replay can do better, and no eviction would help
        # (a COMPUTE reason here would invite the autoscaler to preempt an instance for nothing).
        late = now + own_s - req.ttft_deadline_s
        return Decision(False, RefusalReason.PREFILL, max(0.1, late),
                        f"the new request's prefill alone ends {late:.3f}s past its first-token deadline")
    demand = device_demand(instances, target, req.prompt_tokens)
    bounded = math.isfinite(req.output_tokens) and all(i.bounded() for i in instances)
    if demand > 1.0 and not bounded:  # nothing will end: the paper's steady-state rule decides
        return Decision(False, RefusalReason.COMPUTE, 1.0, f"decode demand would be {demand:.2f} of the device")
    newcomer = PendingPrefill(req.prefill_tokens, req.ttft_deadline_s, req.output_tokens)
    after = replay(instances, (target, newcomer), now)
    if not _hurt(after.late, {}, req.own_slack_s) and after.demand_left <= 1.0:
        return ADMIT  # nothing late, nothing left over: no need to compare with the device without it
    own = after.late.get("new", 0.0) - req.own_slack_s
    horizon = max([newcomer.deadline_s, *(p.deadline_s for i in instances for p in i.prefills)])
    if own > LATENESS_TOLERANCE_S and after.demand_left <= 1.0:
        # Its own first token would be late: refused for that whatever the device without it looks
        # like (that replay could only name more jobs it hurts, and it is half the cost of a
        # refusal; most refusals of requests that waited too long end here).
        refusal = Decision(False, RefusalReason.PREFILL, max(0.1, own),
                           f"deadlines would be missed by at least {own:.3f}s (new)")
        if not displace:
            return refusal
        return displacing(instances, target, newcomer, own_s, now, horizon, slack_s=req.own_slack_s) or refusal
    before = replay(instances, None, now, horizon)
    # Work still running when the replay ends must fit in the long run.
    if after.demand_left > 1.0 and after.demand_left > before.demand_left + LATENESS_TOLERANCE_S:
        return Decision(False, RefusalReason.COMPUTE, 1.0,
                        f"decode demand would be {after.demand_left:.2f} of the device")
    # Only lateness the newcomer adds counts: a job already late is late either way.
    hurt = _hurt(after.late, before.late, req.own_slack_s)
    if hurt:
        worst = max(hurt.values())
        keys = sorted(hurt)
        who = ", ".join(keys[:6]) + (f" and {len(keys) - 6} more" if len(keys) > 6 else "")
        refusal = Decision(False, RefusalReason.PREFILL, max(0.1, worst),
                           f"deadlines would be missed by up to {worst:.3f}s ({who})")
        if not displace:
            return refusal
        return displacing(instances, target, newcomer, own_s, now, horizon, before, req.own_slack_s) or refusal
    return ADMIT


def _hurt(after: dict[str, float], before: dict[str, float], slack_s: float) -> dict[str, float]:
    """Lateness the newcomer adds, job by job; its own counts beyond its slack only."""
    base = dict(before, new=slack_s)
    return {k: v for k, v in after.items() if v > base.get(k, 0.0) + LATENESS_TOLERANCE_S}


DISPLACE_MIN_GAIN = 1.5  # a handed-back prefill has at least this x the newcomer's prefill time left
DISPLACE_TRIES = 3  # the longest candidates tried (two replays each at most)


def prefill_time(inst: InstanceLoad, tokens: int) -> float:
    """Estimated time to prefill ``tokens`` on ``inst``'s device alone, in its chunks."""
    chunk = inst.prefill_chunk_tokens
    return sum(inst.estimator.prefill_s(min(chunk, tokens - start)) for start in range(0, tokens, chunk))


def displacing(instances: Sequence[InstanceLoad], target: str, newcomer: PendingPrefill, own_s: float,
               now: float, horizon: float, before: Replay | None = None, slack_s: float = 0.0) -> Decision | None:
    """Admit a newcomer that fits only if a longer pending prefill gives way: the exchange step of
    Moore and Hodgson's rule for the most jobs on time (when the on-time set overflows, drop its
    longest job), applied online. Candidates have no token out yet (the caller hands them back
    whole, to be served elsewhere or retried) and at least DISPLACE_MIN_GAIN x the newcomer's
    prefill time left, so a swap keeps the count of jobs on time and frees device time for the
    next arrival; a handed-back request can only displace one still longer, so swaps never
    cycle. The longest candidate goes first; it is taken if, without it and with the newcomer,
    the newcomer is on time and no other job is later than on the device as it is."""
    if any(not p.key for i in instances for p in i.prefills):
        return None  # lateness is compared job by job, which needs every job named
    work = ((-prefill_time(i, p.tokens_left), i.instance_id, p.key, i, n)
            for i in instances for n, p in enumerate(i.prefills) if p.displaceable)
    cands = sorted((c for c in work if -c[0] >= DISPLACE_MIN_GAIN * own_s), key=lambda c: c[:3])
    if not cands:
        return None
    if before is None:
        before = replay(instances, None, now, horizon)
    for neg_work, iid, key, inst, n in cands[:DISPLACE_TRIES]:
        rest = tuple(p for m, p in enumerate(inst.prefills) if m != n)
        without = [dataclasses.replace(i, prefills=rest) if i is inst else i for i in instances]
        after = replay(without, (target, newcomer), now, horizon)
        if after.demand_left > 1.0 and after.demand_left > before.demand_left + LATENESS_TOLERANCE_S:
            continue
        if _hurt(after.late, before.late, slack_s):
            continue  # this also keeps "new" within its slack
        return Decision(True, displace=(iid, key),
                        detail=f"admitted in place of {key} ({-neg_work:.2f}s of prefill left, "
                               f"against {own_s:.2f}s)")
    return None
