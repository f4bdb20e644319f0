"""Several model instances sharing one device, token by token.

One thread owns a DeviceLoop. Before every grant the EDF arbiter (runtime.core.arbiter) picks the
instance whose most urgent request is closest to its next-token deadline; that instance's engine
runs the granted iterations. Instances without work are not candidates and cost nothing.
Admission (runtime.core.admission) decides whether a request may join an instance at all.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from functions import FunctionSpec
from runtime.core.admission import (
    REPLAY_CHUNK_TOKENS,
    Decision,
    InstanceLoad,
    NewRequest,
    PendingDecode,
    PendingPrefill,
    admit,
    prefill_time,
)
from runtime.core.arbiter import (
    MAX_PREFILL_STEP_S,
    SLO_MARGIN,
    Candidate,
    DeviceKind,
    Grant,
    Phase,
    next_token_deadline,
    pick,
    prefill_chunk_budget,
)
from runtime.core.block_pool import NO_HIT, PrefixHit
from runtime.core.estimator import LatencyEstimator
from runtime.core.ids import RequestId
from runtime.core.memory import (
    ActionKind,
    DeviceActions,
    KVHolding,
    MemoryConfig,
    admissible_blocks,
    context_bound,
    reservation_blocks,
    resize_target,
)
from runtime.core.request import Request
from runtime.engine.engine import LLMEngine, RequestOutput

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Anchor:
    """Where a request's deadlines count from (``DeviceLoop.anchor``)."""

    arrival_s: float
    resumed: int = 0  # a continued stream's earlier output tokens, counted as emitted
    first_token_s: float | None = None  # when that stream's first token came, if known


@dataclass
class Instance:
    iid: str
    spec: FunctionSpec
    engine: LLMEngine
    estimator: LatencyEstimator
    load_delay_s: float = 0.0  # counted in every request's deadline while it is hosted here
    decode_quota: int = 1

    def requests(self) -> list[Request]:
        s = self.engine.scheduler
        return [*s.running, *s.waiting]

    @property
    def tpot_s(self) -> float:
        return self.spec.slo.tpot_s * (1 - SLO_MARGIN)

    def ttft_s(self, prompt_tokens: int) -> float:
        return self.spec.slo.ttft_s(prompt_tokens) * (1 - SLO_MARGIN)

    def deadline(self, req: Request) -> float:
        k = req.deadline_resumed
        if k:  # a continued stream on its original schedule: from its first token if known, else arrival
            return next_token_deadline(req.arrival_s, self.ttft_s(len(req.prompt_token_ids) - k), self.tpot_s,
                                       k + len(req.output_token_ids), self.load_delay_s, req.deadline_first_s)
        return next_token_deadline(req.arrival_s, self.ttft_s(len(req.prompt_token_ids)), self.tpot_s,
                                   len(req.output_token_ids), self.load_delay_s, req.first_token_s)

    def first_deadline(self, prompt_tokens: int, arrival_s: float, resumed: int = 0,
                       first_token_s: float | None = None) -> float:
        """When the next token of a request not yet started here is due (``deadline`` of it)."""
        return next_token_deadline(arrival_s, self.ttft_s(prompt_tokens - resumed), self.tpot_s, resumed,
                                   self.load_delay_s, first_token_s if resumed else None)

    def kv_holding(self, lookahead_tokens: int) -> KVHolding:
        eng = self.engine
        reserved = eng.reserved_blocks(lookahead_tokens)
        return KVHolding(eng.pool.num_blocks, reserved, eng.bytes_per_block, self.lent_blocks(reserved))

    def lent_blocks(self, reserved_blocks: int) -> int:
        """Cached prefix blocks held beyond what this instance's requests need (their
        reservation, or what they hold): the device takes these back on demand."""
        pool = self.engine.pool
        return max(0, min(pool.num_cached, pool.num_blocks - max(reserved_blocks, pool.num_used)))

    def tokens_left(self, req: Request) -> int:
        """Tokens req may still emit: max_tokens, and never past the context."""
        return max(0, min(req.params.max_tokens - len(req.output_token_ids),
                          self.engine.max_model_len - req.num_tokens))

    def load(self, prefill_chunk_tokens: int = REPLAY_CHUNK_TOKENS) -> InstanceLoad:
        decoding = [r for r in self.engine.scheduler.running if r.num_computed_tokens >= len(r.prompt_token_ids)]
        prefills = tuple(
            PendingPrefill(r.num_tokens - r.num_computed_tokens, self.deadline(r), max(0, self.tokens_left(r) - 1),
                           key=r.rid, displaceable=not r.output_token_ids)
            for r in self.requests() if r.num_computed_tokens < len(r.prompt_token_ids)
        )
        decodes = tuple(PendingDecode(self.tokens_left(r), self.deadline(r)) for r in decoding)
        avg = sum(r.num_tokens for r in decoding) / len(decoding) if decoding else 0.0
        due = min((d.deadline_s for d in decodes), default=None)
        return InstanceLoad(self.iid, self.estimator, self.tpot_s, len(decoding), avg, prefills,
                            self.engine.max_model_len, due, decodes, prefill_chunk_tokens)


@dataclass
class ArbiterStats:
    decisions: int = 0
    failures: int = 0
    displaced: int = 0  # pending prompts handed back so admission could take a shorter one
    total_s: float = 0.0
    last_s: float = 0.0
    grants: dict[str, int] = field(default_factory=dict)
    admissions: int = 0  # admission decisions (each an EDF replay of the device, or two)
    admit_total_s: float = 0.0
    admit_max_s: float = 0.0

    @property
    def mean_us(self) -> float:
        return self.total_s / self.decisions * 1e6 if self.decisions else 0.0

    @property
    def admit_mean_us(self) -> float:
        return self.admit_total_s / self.admissions * 1e6 if self.admissions else 0.0


class DeviceLoop:
    """Owns the device's instances, its KV budget (bytes, shared by all instances) and the
    action queue through which every KV grow/shrink and instance add/remove goes."""

    def __init__(self, kind: DeviceKind = DeviceKind.CPU, kv_budget_bytes: int = 1 << 30,
                 memory: MemoryConfig | None = None, clock: Callable[[], float] = time.monotonic,
                 max_prefill_step_s: float = MAX_PREFILL_STEP_S, displace: bool = True,
                 newcomer_slack: bool = True):
        if not max_prefill_step_s > 0:
            raise ValueError(f"max_prefill_step_s must be > 0 (inf: no cap), got {max_prefill_step_s}")
        self.kind = kind
        self.max_prefill_step_s = max_prefill_step_s  # how long a step with a prefill chunk may take
        # Admission may hand back a longer pending prompt to admit a shorter one (see
        # runtime.core.admission.displacing); the handed-back outputs wait in `handed_back`.
        self.displace = displace
        self.handed_back: list[RequestOutput] = []
        # A newcomer's own first token is judged against its SLO, not the margin-tightened
        # planning deadline (see runtime.core.admission.NewRequest.own_slack_s).
        self.newcomer_slack = newcomer_slack
        self.clock = clock  # the timebase of arrival_s: stamps first tokens
        self.instances: dict[str, Instance] = {}
        self.stats = ArbiterStats()
        self.memory = memory or MemoryConfig()
        self.actions = DeviceActions(kv_budget_bytes)
        self.peak_kv_bytes = 0  # the most KV capacity ever held at once (the no-OOM witness)

    def add_instance(self, inst: Instance) -> None:
        if inst.iid in self.instances:
            raise ValueError(f"instance {inst.iid!r} already on this device")
        held = inst.engine.cache.nbytes
        if held:  # an engine built with KV of its own: it must fit in the budget as a LOAD
            self.reclaim(held)
            a = self.actions.submit(ActionKind.LOAD, inst.iid, held)
            if a not in self.actions.ready():
                raise ValueError(f"instance {inst.iid!r} holds {held} bytes of KV; {self.actions.free} free")
            self.actions.complete(a.action_id)
        self.instances[inst.iid] = inst

    def remove_instance(self, iid: str) -> tuple[Instance, list[RequestOutput]]:
        """Evict every request (with continuations) and release the instance's KV."""
        inst = self.instances.pop(iid)
        outs = inst.engine.evict_all()
        self._release(inst, ActionKind.UNLOAD, inst.engine.pool.num_blocks)
        return inst, outs

    @property
    def kv_bytes(self) -> int:
        return sum(i.engine.cache.nbytes for i in self.instances.values())

    # -- forward-looking memory --------------------------------------------------------------
    def _release(self, inst: Instance, kind: ActionKind, blocks: int) -> None:
        if blocks <= 0:
            return
        a = self.actions.submit(kind, inst.iid, blocks * inst.engine.bytes_per_block)
        inst.engine.resize_kv(inst.engine.pool.num_blocks - blocks)  # synchronous on CPU
        self.actions.complete(a.action_id)  # only now does the memory count as free

    def reclaim(self, need_bytes: int, keep: str | None = None) -> None:
        """Take back cached prefix blocks that instances lend (``Instance.lent_blocks``) until
        ``need_bytes`` are free, the instances lending most first; ``keep``'s own are not
        taken. The least recently freed prefixes go first (``KVCacheManager.compact``)."""
        if need_bytes <= self.actions.free:
            return
        la = self.memory.lookahead_tokens
        lenders = []
        for inst in self.instances.values():
            lent = inst.lent_blocks(inst.engine.reserved_blocks(la)) if inst.iid != keep else 0
            if lent > 0:
                lenders.append((-lent * inst.engine.bytes_per_block, inst.iid, lent))
        for _, iid, lent in sorted(lenders):
            short = need_bytes - self.actions.free
            if short <= 0:
                break
            inst = self.instances[iid]
            self._release(inst, ActionKind.SHRINK, min(lent, -(-short // inst.engine.bytes_per_block)))

    def plan_memory(self) -> None:
        """Size every instance's KV to its reservation x watermark: shrinks first (hysteresis),
        then grows, most urgent instance first, each only against memory already freed."""
        lookahead = self.memory.lookahead_tokens
        grows: list[tuple[float, str, int]] = []
        for inst in self.instances.values():
            eng = inst.engine
            cur = eng.pool.num_blocks
            target = resize_target(self.memory, cur, eng.reserved_blocks(lookahead))
            if target is None:
                continue
            if target < cur:  # cached prefixes stay, lent, until memory is wanted (reclaim)
                self._release(inst, ActionKind.SHRINK, cur - max(target, eng.pool.num_used + eng.pool.num_cached))
            elif target > cur:
                reqs = inst.requests()
                urgency = min((inst.deadline(r) for r in reqs), default=float("inf"))
                grows.append((urgency, inst.iid, target - cur))
        for _, iid, want in sorted(grows):
            inst = self.instances[iid]
            bpb = inst.engine.bytes_per_block
            self.reclaim(want * bpb, keep=iid)
            blocks = min(want, self.actions.free // bpb)  # partial growth beats none
            if blocks <= 0:
                continue  # the engine preempts (recompute) or evicts if it outgrows what it has
            a = self.actions.submit(ActionKind.GROW, iid, blocks * bpb)
            for ready in self.actions.ready():
                other = self.instances[ready.instance_id]
                other.engine.resize_kv(other.engine.pool.num_blocks + ready.amount // other.engine.bytes_per_block)
                self.actions.complete(ready.action_id)
            assert a.state.value == "done", "a grow that fits commits at once on this device"
        self.peak_kv_bytes = max(self.peak_kv_bytes, self.kv_bytes)

    @property
    def has_work(self) -> bool:
        return any(i.engine.has_work for i in self.instances.values())

    def anchor(self, iid: str, prompt_tokens: int, now: float, received_s: float, elapsed_s: float = 0.0,
               resumed: int = 0, first_token_age_s: float | None = None) -> Anchor:
        """Where a request's deadlines count from, for ``admit`` and ``LLMEngine.add_request``.

        ``elapsed_s`` is the time the request had already spent before it reached this pod (held
        by the activator while instances refused it, or served on an instance that was
        preempted; the activator leaves out waits for a model load, which the paper excuses);
        ``resumed`` the output tokens a continued stream already has, and ``first_token_age_s``
        how long ago its first token came. As the paper has it, the deadlines keep running: from
        ``received_s - elapsed_s``, with the resumed tokens counted as emitted and timed from the
        stream's first token (the mean-TPOT rule, as for any stream) when its age is known. A
        request that could not meet that next deadline even alone on the device is served as if
        it had just arrived (best effort) rather than refused everywhere: late work never takes
        priority over work that can still be on time.
        """
        if elapsed_s <= 0:
            return Anchor(received_s)
        inst = self.instances[iid]
        first = received_s - first_token_age_s if resumed and first_token_age_s is not None else None
        kept = Anchor(received_s - elapsed_s, resumed, first)
        due = inst.first_deadline(prompt_tokens, kept.arrival_s, resumed, first)
        alone = inst.load(self.prefill_chunk_tokens(inst))
        if now + prefill_time(alone, prompt_tokens) > due + self._own_slack(inst, prompt_tokens, resumed):
            return Anchor(received_s)
        return kept

    def _own_slack(self, inst: Instance, prompt_tokens: int, resumed: int) -> float:
        """How far past its planning deadline a newcomer's own first token may be planned (its
        SLO's margin; runtime.core.admission.NewRequest.own_slack_s); none for a continuation's."""
        if not self.newcomer_slack or resumed:
            return 0.0
        return inst.spec.slo.ttft_s(prompt_tokens) * SLO_MARGIN

    def admit(self, iid: str, prompt_tokens: int, now: float, arrival_s: float | None = None,
              max_tokens: int | None = None, anchor: Anchor | None = None, prefix: PrefixHit = NO_HIT) -> Decision:
        """May a request join iid now? arrival_s (default now) anchors its TTFT deadline, so a
        retried request keeps the deadline it arrived with; max_tokens bounds its output (None:
        up to the context), which lets admission see when its work ends; ``anchor`` (from
        ``anchor``) replaces arrival_s for a request whose deadlines began before this pod;
        ``prefix`` is what its prompt finds in iid's prefix cache (``LLMEngine.prefix_hit``): those
        tokens cost no prefill, and blocks other requests hold cost no memory."""
        inst = self.instances[iid]
        eng = inst.engine
        la = self.memory.lookahead_tokens
        need = reservation_blocks(prompt_tokens, la, eng.config.block_size,
                                  context_bound(prompt_tokens, max_tokens, eng.max_model_len)) - prefix.held_blocks
        holdings = {name: i.kv_holding(la) for name, i in self.instances.items()}
        free = admissible_blocks(self.actions.free, holdings.values(), holdings[iid])
        if anchor is None:
            anchor = Anchor(now if arrival_s is None else arrival_s)
        room = eng.max_model_len - prompt_tokens
        outputs = max(0, (room if max_tokens is None else min(max_tokens, room)) - 1)
        due = inst.first_deadline(prompt_tokens, anchor.arrival_s, anchor.resumed, anchor.first_token_s)
        req = NewRequest(prompt_tokens, due, need, outputs, self._own_slack(inst, prompt_tokens, anchor.resumed),
                         prefix.tokens)
        t = time.perf_counter()
        loads = [i.load(self.prefill_chunk_tokens(i)) for i in self.instances.values()]
        d = admit(loads, iid, req, free, now, displace=self.displace)
        dt = time.perf_counter() - t
        self.stats.admissions += 1
        self.stats.admit_total_s += dt
        self.stats.admit_max_s = max(self.stats.admit_max_s, dt)
        if d.displace is not None:
            owner, rid = d.displace
            out = self.instances[owner].engine.evict(RequestId(rid))
            if out is not None:
                self.stats.displaced += 1
                self.handed_back.append(out)
        return d

    def take_handed_back(self) -> list[RequestOutput]:
        """Requests admission handed back since the last call (finish_reason PREEMPTED, no token
        out yet, with a continuation): deliver them to their callers, who go elsewhere."""
        out, self.handed_back = self.handed_back, []
        return out

    def prefill_chunk_tokens(self, inst: Instance) -> int:
        """The prompt tokens one of inst's steps carries when nothing decodes: the step cap, by its
        estimator. Admission replays prefills in chunks of this size, as the loop will run them."""
        most = inst.engine.scheduler.config.max_num_batched_tokens
        cap = prefill_chunk_budget(inst.estimator.prefill_s, self.max_prefill_step_s, most)
        return most if cap is None else cap

    def candidates(self) -> list[Candidate]:
        out = []
        for inst in self.instances.values():
            reqs = inst.requests()
            if not reqs:
                continue
            prefilling = any(r.num_computed_tokens < len(r.prompt_token_ids) for r in reqs)
            out.append(Candidate(inst.iid, min(inst.deadline(r) for r in reqs),
                                 Phase.PREFILL if prefilling else Phase.DECODE, inst.decode_quota))
        return out

    def step(self) -> tuple[Grant | None, list[RequestOutput]]:
        """One grant: size KV memory, pick by EDF, run the granted iterations of that instance."""
        self.plan_memory()
        t0 = time.perf_counter()
        grant = pick(self.candidates(), self.kind)
        dt = time.perf_counter() - t0
        self.stats.decisions += 1
        self.stats.total_s += dt
        self.stats.last_s = dt
        if grant is None:
            return None, []
        self.stats.grants[grant.instance_id] = self.stats.grants.get(grant.instance_id, 0) + 1
        inst = self.instances[grant.instance_id]
        outs: list[RequestOutput] = []
        for _ in range(grant.iterations):
            if not inst.engine.has_work:
                break
            t = time.perf_counter()
            budget = prefill_chunk_budget(inst.estimator.prefill_s,
                                          min(self._decode_slack_s(inst), self.max_prefill_step_s),
                                          inst.engine.scheduler.config.max_num_batched_tokens)
            if self._prompt_due_sooner_elsewhere(inst):
                budget = 0  # this grant is for its decodes; the earlier prompt elsewhere goes next
            self.stats.total_s += time.perf_counter() - t  # part of the per-iteration decision cost
            t = time.perf_counter()
            try:
                outs.extend(inst.engine.step(self.clock, budget, inst.deadline))  # prompts by EDF, as admission replays them
            except Exception:  # one instance's failure must not take the device down
                log.exception("instance %s failed an iteration; evicting its requests", inst.iid)
                self.stats.failures += 1
                outs.extend(inst.engine.evict_all())  # continuations: they can run elsewhere
                break
            self._observe(inst, time.perf_counter() - t)
        return grant, outs

    def _prompt_due_sooner_elsewhere(self, inst: Instance) -> bool:
        """inst decodes and also holds a waiting prompt, and another instance holds a prompt due
        before all of inst's. The engine would fill inst's decode step with a chunk of its own
        prompt, ahead of that earlier one: prompts on a device go by deadline, as admission's
        replay runs them, so that step carries only the decodes."""
        decoding, mine = False, math.inf
        for r in inst.requests():
            if r.num_computed_tokens < len(r.prompt_token_ids):
                mine = min(mine, inst.deadline(r))
            else:
                decoding = True
        if not decoding or mine == math.inf:
            return False
        return any(other.deadline(r) < mine for other in self.instances.values() if other is not inst
                   for r in other.requests() if r.num_computed_tokens < len(r.prompt_token_ids))

    def _decode_slack_s(self, inst: Instance) -> float:
        """Time from now to the earliest next-token deadline of a decoding request on the device
        that EDF ranks before inst's prefills (due earlier than all of them); inf when there is
        none. Decodes due later wait for the prefill anyway, so a smaller chunk would not help them."""
        prefill_due = min((inst.deadline(r) for r in inst.requests()
                           if r.num_computed_tokens < len(r.prompt_token_ids)), default=-math.inf)
        due = min((d for i in self.instances.values() for r in i.engine.scheduler.running
                   if r.num_computed_tokens >= len(r.prompt_token_ids) and (d := i.deadline(r)) < prefill_due),
                  default=math.inf)
        return due - self.clock() if due < math.inf else math.inf

    def _observe(self, inst: Instance, seconds: float) -> None:
        plan = inst.engine.last_plan
        if plan is None or plan.empty:
            return
        seqs = plan.seqs
        if all(len(s.token_ids) == 1 for s in seqs):
            ctx = sum(s.start_pos + 1 for s in seqs) / len(seqs)
            inst.estimator.observe_decode(ctx, len(seqs), seconds)
        elif len(seqs) == 1:
            inst.estimator.observe_prefill(len(seqs[0].token_ids), seconds)
