"""One device (or one static slot of a device) in the simulator: its instances, their requests,
its memory, and its iteration loop, wired to runtime/core the way runtime/device.py wires a real
device:

  - before every grant: ``memory.resize_target`` sizes each instance's KV to its reservation x
    watermark through the device's ``memory.DeviceActions`` queue (shrinks first, then grows, most
    urgent instance first, partial growth allowed), then ``arbiter.pick`` chooses the instance with
    the earliest next-token deadline (EDF); its grant is 1 iteration for a prefill or on a CPU, the
    model's decode quota for GPU decode;
  - a request may join an instance only if ``admission.admit`` says so (SLO systems), with the free
    KV computed as DeviceLoop.admit does (reservations admitted but not yet backed by a grow are
    spoken for);
  - within an instance prefills go first, one chunk per iteration (slinfer: 512-token chunks,
    earliest first-token deadline first, as runtime/engine; the sllm baselines: FCFS, a whole
    prompt per iteration, vLLM 0.5's default); a decode iteration advances the whole batch by one
    token.
Step times come from the published profile without the safety factor (``DeviceProfile.true``),
divided by the slot's compute share; the estimator that admission consults keeps the authors'
safety factor. The estimator is not corrected online: the simulated device runs exactly the
profile, so the only thing the EWMA could learn is to cancel the safety margin.

Several iterations may run in one event (``next_run``) when nothing could change the outcome:
the remaining iterations of the current grant, or further grants when this instance is the only one
with work on the device, its memory plan would not change and no control event (arrival, retry,
load) comes before the iteration ends. That keeps per-iteration EDF semantics exact and the
simulation fast.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from autoscaler.core import InstanceId, InstanceView, NodeId, NodeView, Resource, Shortfall
from autoscaler.core.snapshot import FunctionId
from autoscaler.sim.config import Admission, ModelSpec, SystemConfig
from runtime.core.admission import (
    Decision,
    InstanceLoad,
    NewRequest,
    PendingDecode,
    PendingPrefill,
    RefusalReason,
    admit,
    device_demand,
)
from runtime.core.arbiter import SLO_MARGIN, Candidate, DeviceKind, Phase, next_token_deadline, pick
from runtime.core.estimator import LatencyEstimator
from runtime.core.lifecycle import InstanceEvent, InstanceState, transition
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

T = TypeVar("T")
ADMIT = Decision(True)
# How a static slot appears to placement: room for exactly one instance (weights + this much KV),
# whatever its real size; the device itself holds the slot's real KV.
STATIC_SLOT_VIEW_KV_BYTES = 1 << 30


class RequestState(enum.Enum):
    """WAITING (cluster queue) -> PREFILL -> DECODE -> DONE; WAITING -> DROPPED; PREFILL/DECODE ->
    WAITING when its instance is evicted (continues elsewhere by recompute)."""

    WAITING = "waiting"
    PREFILL = "prefill"
    DECODE = "decode"
    DONE = "done"
    DROPPED = "dropped"


@dataclass(eq=False)
class SimRequest:
    rid: int
    function: FunctionId
    arrival_s: float
    prompt_tokens: int
    output_tokens: int
    ttft_slo_s: float
    tpot_slo_s: float
    state: RequestState = RequestState.WAITING
    generated: int = 0
    waiting_since_s: float = 0.0  # arrival, or when it was last evicted
    load_delay_s: float = 0.0  # time spent waiting for a model load (added to its deadlines)
    first_token_s: float | None = None
    finish_s: float | None = None
    preemptions: int = 0
    first_device: DeviceKind | None = None
    prefilled: int = 0  # tokens of the current (re)prefill already computed (chunked prefill)

    @property
    def context(self) -> int:
        return self.prompt_tokens + self.generated

    def deadline_s(self, load_delay_s: float | None = None) -> float:
        """As runtime.device: after its first token, the next one is due TPOT x tokens after it."""
        delay = self.load_delay_s if load_delay_s is None else load_delay_s
        keep = 1 - SLO_MARGIN  # as runtime.device: plan against a 5% tighter SLO
        return next_token_deadline(self.arrival_s, self.ttft_slo_s * keep, self.tpot_slo_s * keep, self.generated,
                                   delay, self.first_token_s)


def request_bound(r: SimRequest, system: SystemConfig, model: ModelSpec) -> int:
    """The most tokens ``r`` can hold (``runtime.core.memory.context_bound``): its output is
    bounded by max_tokens (the trace's length) unless ``bounded_outputs`` is off."""
    return context_bound(r.prompt_tokens, r.output_tokens if system.bounded_outputs else None,
                         model.max_context_tokens)


def _mean_context(reqs: list[SimRequest]) -> float:
    """Mean context of a batch (InstanceLoad.avg_context); 0 for none."""
    return sum(r.context for r in reqs) / len(reqs) if reqs else 0.0


@dataclass(eq=False)
class SimInstance:
    iid: InstanceId
    function: FunctionId
    node: SimNode
    weight_bytes: int
    load_start_s: float
    ready_s: float
    state: InstanceState = InstanceState.LOADING
    prefilling: list[SimRequest] = field(default_factory=list)  # in service order (SimNode.add)
    decoding: list[SimRequest] = field(default_factory=list)
    kv_blocks: int = 0
    idle_since_s: float | None = None
    version: int = 0  # bumped on every change; keys the memo
    planned: tuple[int, int] = (-1, -1)  # (version, memory epoch) at which plan_memory left it alone
    memo: dict[str, tuple[int, Any]] = field(default_factory=dict)

    @property
    def has_work(self) -> bool:
        return bool(self.prefilling or self.decoding)

    @property
    def requests(self) -> list[SimRequest]:
        return [*self.decoding, *self.prefilling]

    @property
    def alive(self) -> bool:
        return self.state in (InstanceState.LOADING, InstanceState.READY, InstanceState.DRAINING)


@dataclass
class Run:
    """Iterations of one instance executing in one event: a prefill of ``batch[0]``, or decode
    iterations of ``batch`` ending at ``ends``."""

    inst: SimInstance
    phase: Phase
    batch: list[SimRequest]
    start_s: float
    ends: list[float]
    chunk_tokens: int = 0  # prefill tokens this run computes


class SimNode:
    def __init__(self, node_id: NodeId, host: str, kind: DeviceKind, model: ModelSpec, system: SystemConfig,
                 memory_bytes: int):
        prof = model.devices[kind]
        self.node_id = node_id
        self.host = host
        self.kind = kind
        self.model = model
        self.system = system
        self.true = prof.true
        self.estimator = LatencyEstimator(prof.estimate)
        self.share = system.compute_share
        self.block_tokens = model.block_tokens[kind]
        self.bytes_per_block = self.block_tokens * model.kv_bytes_per_token
        self.memory_bytes = memory_bytes
        self.memory = MemoryConfig(self.block_tokens, system.lookahead_tokens, system.watermark,
                                   math.ceil(system.min_instance_tokens / self.block_tokens))
        self.actions = DeviceActions(memory_bytes)
        self.cap = model.cap(kind, system.batch_cap)
        self.quota = model.decode_quota_gpu if kind is DeviceKind.GPU else 1
        self.static_kv_blocks = max(0, memory_bytes - model.weight_bytes) // self.bytes_per_block
        self.instances: dict[InstanceId, SimInstance] = {}
        self.run: Run | None = None
        self.current: SimInstance | None = None
        self.quota_left = 0
        self.spilled: list[SimRequest] = []  # preempted for lack of KV; the simulator requeues them
        self.decode_tokens = 0
        self.busy_s = 0.0
        # Derived values (views, loads, reservations) are cached until the device's state changes:
        # every mutation calls _touch().
        self.version = 0
        self._cache_version = -1
        self._view: NodeView | None = None
        self._loads: list[InstanceLoad] | None = None
        self._cands: list[Candidate] | None = None
        self._planned_version = -1  # the version plan_memory last left unchanged
        self._memory_epoch = 0  # bumped whenever memory is released (a stuck grow may now fit)
        self._decode_ms: dict[tuple[int, int], float] = {}

    def step_decode_s(self, context: float, batch: int) -> float:
        """Time of one decode iteration on this device (context rounded to a whole token)."""
        key = (round(context), batch)
        got = self._decode_ms.get(key)
        if got is None:
            got = self._decode_ms[key] = self.true.decode_s(key[0], batch) / self.share
        return got

    def _touch(self, inst: SimInstance | None) -> None:
        self.version += 1
        if inst is not None:
            inst.version += 1

    @staticmethod
    def _memo(inst: SimInstance, key: str, make: Callable[[], T]) -> T:
        got = inst.memo.get(key)
        if got is not None and got[0] == inst.version:
            return got[1]  # type: ignore[no-any-return]
        value = make()
        inst.memo[key] = (inst.version, value)
        return value

    def _fresh(self) -> None:
        if self._cache_version != self.version:
            self._cache_version = self.version
            self._view = None
            self._loads = None
            self._cands = None

    # -- views ---------------------------------------------------------------------------------
    def reserved_blocks(self, inst: SimInstance) -> int:
        if self.system.static_memory:
            return inst.kv_blocks
        la, bt = self.memory.lookahead_tokens, self.block_tokens
        return self._memo(inst, "reserved",
                          lambda: sum(reservation_blocks(r.context, la, bt, self.bound(r)) for r in inst.requests))

    def used_blocks(self, inst: SimInstance, extra_tokens: int = 0) -> int:
        bt = self.block_tokens
        return self._memo(inst, f"used{extra_tokens}",
                          lambda: sum(-(-(r.context + extra_tokens) // bt) for r in inst.decoding))

    def load_of(self, inst: SimInstance) -> InstanceLoad:
        return self._memo(inst, "load", lambda: self._make_load(inst))

    def _make_load(self, inst: SimInstance) -> InstanceLoad:
        # As runtime.device.Instance.load: each request's output is bounded (its max_tokens, which
        # the artifact's client sets to the trace's output length), so admission sees when work ends.
        dec = inst.decoding
        avg = _mean_context(dec)
        prefills = tuple(PendingPrefill(r.context - r.prefilled, r.deadline_s(),
                                        max(0, r.output_tokens - r.generated - 1), key=str(r.rid),
                                        displaceable=r.first_token_s is None) for r in inst.prefilling)
        decodes = tuple(PendingDecode(r.output_tokens - r.generated, r.deadline_s()) for r in dec)
        due = min((d.deadline_s for d in decodes), default=None)
        if not self.system.bounded_outputs:
            return InstanceLoad(inst.iid, self.estimator, self.model_tpot(inst), len(dec), avg,
                                tuple(PendingPrefill(p.tokens_left, p.deadline_s) for p in prefills),
                                self.model.max_context_tokens, due)
        return InstanceLoad(inst.iid, self.estimator, self.model_tpot(inst), len(dec), avg, prefills,
                            self.model.max_context_tokens, due, decodes)

    def _demand(self, inst: SimInstance) -> float:
        """``InstanceLoad.demand`` of the instance, without building its per-request jobs (a view
        is rebuilt after every step; admission, which needs them, is asked far less often)."""
        dec = inst.decoding
        return InstanceLoad(inst.iid, self.estimator, self.model_tpot(inst), len(dec), _mean_context(dec)).demand()

    def model_tpot(self, inst: SimInstance) -> float:
        reqs = inst.requests
        return (reqs[0].tpot_slo_s if reqs else 0.25) * (1 - SLO_MARGIN)

    def loads(self) -> list[InstanceLoad]:
        self._fresh()
        if self._loads is None:
            self._loads = [self.load_of(i) for i in self.instances.values() if i.state is not InstanceState.LOADING]
        return self._loads

    def view(self) -> NodeView:
        self._fresh()
        if self._view is None:
            self._view = self._make_view()
        return self._view

    def _instance_view(self, i: SimInstance) -> InstanceView:
        static = self.system.static_memory
        kv = STATIC_SLOT_VIEW_KV_BYTES if static else i.kv_blocks * self.bytes_per_block
        reserved = kv if static else self.reserved_blocks(i) * self.bytes_per_block
        demand = 0.0 if i.state is InstanceState.LOADING else self._demand(i)
        return InstanceView(i.iid, i.function, self.node_id, len(i.decoding) + len(i.prefilling), demand,
                            i.weight_bytes, kv, reserved, i.idle_since_s, i.state is InstanceState.LOADING)

    def _make_view(self) -> NodeView:
        static = self.system.static_memory
        insts = []
        for i in self.instances.values():
            insts.append(self._memo(i, "view", lambda i=i: self._instance_view(i)))  # type: ignore[misc]
        memory = self.model.weight_bytes + STATIC_SLOT_VIEW_KV_BYTES if static else self.memory_bytes
        return NodeView(self.node_id, self.kind, memory, memory, tuple(insts))

    # -- admission -----------------------------------------------------------------------------
    def _need_blocks(self, req: SimRequest) -> int:
        return reservation_blocks(req.context, self.memory.lookahead_tokens, self.block_tokens, self.bound(req))

    def bound(self, r: SimRequest) -> int:
        return request_bound(r, self.system, self.model)

    def _free_blocks(self, inst: SimInstance) -> int:
        """As runtime.device.DeviceLoop.admit: memory actually free, minus reservations already
        admitted but not yet backed by a grow, plus the target's own slack."""
        def holding(i: SimInstance) -> KVHolding:
            return KVHolding(i.kv_blocks, self.reserved_blocks(i), self.bytes_per_block)

        return admissible_blocks(self.actions.free, map(holding, self.instances.values()), holding(inst))

    def consider(self, inst: SimInstance, req: SimRequest, now: float, load_delay_s: float) -> Decision:
        """May ``req`` join ``inst`` now (with ``load_delay_s`` added to its deadlines)?"""
        if req.context >= self.model.max_context_tokens:
            return Decision(False, RefusalReason.CONTEXT, 0.0, "prompt exceeds the context")
        if self.system.admission is Admission.BATCH_CAP:
            if self.cap is not None and len(inst.decoding) + len(inst.prefilling) >= self.cap:
                return Decision(False, None, self.system.retry_s, f"batch cap {self.cap} reached")
            return ADMIT
        outputs = max(0, req.output_tokens - req.generated - 1) if self.system.bounded_outputs else math.inf
        slack = req.ttft_slo_s * SLO_MARGIN if self.system.newcomer_slack and req.first_token_s is None else 0.0
        new = NewRequest(req.context, req.deadline_s(load_delay_s), self._need_blocks(req), outputs, slack)
        return admit(self.loads(), inst.iid, new, self._free_blocks(inst), now, displace=self.system.displace)

    def hand_back(self, iid: str, key: str, now: float) -> SimRequest | None:
        """Take a waiting prompt out of its instance, as runtime.device does for an admission that
        displaces it (a chunk of it in flight is lost: finish_run skips requests no longer there)."""
        inst = self.instances.get(InstanceId(iid))
        r = next((q for q in inst.prefilling if str(q.rid) == key), None) if inst is not None else None
        if inst is None or r is None:
            return None
        inst.prefilling.remove(r)
        r.prefilled = 0
        self._went_idle(inst, now)
        self._touch(inst)
        return r

    @staticmethod
    def _went_idle(inst: SimInstance, now: float) -> None:
        """Start the keep-alive of an instance that just lost its last request, however it lost it
        (finished, handed back, spilled): without a start an idle instance would never expire."""
        if not inst.has_work and inst.idle_since_s is None:
            inst.idle_since_s = now

    def shortfall(self, inst: SimInstance, req: SimRequest, decision: Decision) -> Shortfall | None:
        """What the device lacks for ``req`` on ``inst`` after a MEMORY or COMPUTE refusal."""
        if decision.reason is RefusalReason.MEMORY:
            gap = (self._need_blocks(req) - self._free_blocks(inst)) * self.bytes_per_block
            return Shortfall(Resource.MEMORY, gap) if gap > 0 else None
        if decision.reason is RefusalReason.COMPUTE:
            gap_c = device_demand(self.loads(), inst.iid, req.context) - 1.0
            return Shortfall(Resource.COMPUTE, gap_c) if gap_c > 0 else None
        return None

    def add(self, inst: SimInstance, req: SimRequest) -> None:
        req.state = RequestState.PREFILL
        req.prefilled = 0  # a continuation recomputes prompt + tokens so far
        q = inst.prefilling
        if self.system.prefill_by_deadline:  # before the first one due later (after equals: FCFS among them)
            d = req.deadline_s()
            q.insert(next((k for k, r in enumerate(q) if r.deadline_s() > d), len(q)), req)
        else:
            q.append(req)
        inst.idle_since_s = None
        self._touch(inst)

    # -- instance lifetime -----------------------------------------------------------------------
    def start_load(self, inst: SimInstance) -> None:
        claim = inst.weight_bytes
        if self.system.static_memory:
            inst.kv_blocks = self.static_kv_blocks
            claim += inst.kv_blocks * self.bytes_per_block
        a = self.actions.submit(ActionKind.LOAD, inst.iid, claim)
        if a not in self.actions.ready():
            raise RuntimeError(f"load of {inst.iid} ({claim} bytes) does not fit on {self.node_id} "
                               f"({self.actions.free} free): the snapshot and the device disagree")
        self.instances[inst.iid] = inst
        self._touch(inst)

    def finish_load(self, inst: SimInstance, now: float) -> None:
        inst.state = transition(inst.state, InstanceEvent.LOADED)
        inst.idle_since_s = now
        self._touch(inst)

    def remove(self, inst: SimInstance, evict: bool) -> list[SimRequest]:
        """Unload (idle) or evict ``inst`` now; returns its requests (evicted ones continue elsewhere)."""
        reqs = inst.requests
        if evict:
            inst.state = transition(inst.state, InstanceEvent.EVICT)
        else:
            inst.state = transition(transition(inst.state, InstanceEvent.DRAIN), InstanceEvent.DRAINED)
        inst.prefilling, inst.decoding = [], []
        del self.instances[inst.iid]
        self._release(inst, ActionKind.UNLOAD, inst.weight_bytes + inst.kv_blocks * self.bytes_per_block)
        inst.kv_blocks = 0
        self._touch(inst)
        if self.current is inst:
            self.current, self.quota_left = None, 0
        return reqs

    def _release(self, inst: SimInstance, kind: ActionKind, nbytes: int) -> None:
        if nbytes <= 0:
            return
        a = self.actions.submit(kind, inst.iid, nbytes)
        self.actions.complete(a.action_id)  # synchronous here: the memory is free at once
        self._memory_epoch += 1

    # -- memory ----------------------------------------------------------------------------------
    def _targets(self) -> list[tuple[SimInstance, int]]:
        out = []
        for inst in self.instances.values():
            if inst.state is InstanceState.LOADING or inst.planned == (inst.version, self._memory_epoch):
                continue
            target = resize_target(self.memory, inst.kv_blocks, self.reserved_blocks(inst))
            if target is not None and target != inst.kv_blocks:
                out.append((inst, target))
            else:
                inst.planned = (inst.version, self._memory_epoch)
        return out

    def plan_memory(self) -> None:
        """DeviceLoop.plan_memory: shrinks (never below what is in use) first, then grows, most
        urgent first, each only against memory already freed; partial growth beats none."""
        if self._planned_version == self.version:
            return  # nothing changed since a plan that changed nothing
        grows = []
        for inst, target in self._targets():
            if target < inst.kv_blocks:
                keep = max(target, self.used_blocks(inst))
                self._release(inst, ActionKind.SHRINK, (inst.kv_blocks - keep) * self.bytes_per_block)
                inst.kv_blocks = keep
                self._touch(inst)
            else:
                urgency = min((r.deadline_s() for r in inst.requests), default=math.inf)
                grows.append((urgency, inst.iid, inst, target - inst.kv_blocks))
        for _, _, inst, want in sorted(grows, key=lambda g: (g[0], g[1])):
            blocks = min(want, self.actions.free // self.bytes_per_block)
            if blocks <= 0:
                continue
            self.actions.submit(ActionKind.GROW, inst.iid, blocks * self.bytes_per_block)
            for ready in self.actions.ready():
                grown = self.instances[InstanceId(ready.instance_id)]
                grown.kv_blocks += ready.amount // self.bytes_per_block
                self.actions.complete(ready.action_id)
                self._touch(grown)
        self._planned_version = self.version

    # -- iterations ------------------------------------------------------------------------------
    def _candidates(self) -> list[Candidate]:
        self._fresh()
        if self._cands is None:
            self._cands = self._make_candidates()
        return self._cands

    def _make_candidates(self) -> list[Candidate]:
        return [self._memo(i, "candidate", lambda i=i: self._candidate(i))  # type: ignore[misc]
                for i in self.instances.values() if i.has_work and i.state is not InstanceState.LOADING]

    def _candidate(self, inst: SimInstance) -> Candidate:
        deadline = min(r.deadline_s() for r in inst.requests)
        phase = Phase.PREFILL if inst.prefilling else Phase.DECODE
        return Candidate(inst.iid, deadline, phase, self.quota)

    def _choose(self) -> SimInstance | None:
        cur = self.current
        if cur is not None and self.quota_left > 0 and cur.alive and cur.decoding and not cur.prefilling:
            return cur  # the rest of the current grant
        if not self.system.static_memory:
            self.plan_memory()
        grant = pick(self._candidates(), self.kind)
        if grant is None:
            self.current, self.quota_left = None, 0
            return None
        self.current = self.instances[InstanceId(grant.instance_id)]
        self.quota_left = grant.iterations
        return self.current

    def _spill_until_fits(self, inst: SimInstance, needed: int, now: float) -> int:
        """The instance's KV cannot hold the next iteration: preempt its newest requests (they
        continue elsewhere by recompute), as the engine does when it outgrows its blocks."""
        while needed > inst.kv_blocks and (inst.prefilling or inst.decoding):
            victim = inst.prefilling.pop() if inst.prefilling else inst.decoding.pop()
            victim.state = RequestState.WAITING
            victim.preemptions += 1
            self.spilled.append(victim)
            self._touch(inst)
            needed = self._needed_next(inst)
        self._went_idle(inst, now)
        return needed

    def _prefill_next(self, inst: SimInstance) -> bool:
        """Is the instance's next iteration a prefill? The sllm baselines (vLLM 0.5) run every
        waiting prompt before the next decode; slinfer runs whichever is due first, the earliest
        prompt or the batch's next token (our engine would carry both in one step; admission's
        replay orders them as two jobs, as here)."""
        if not inst.prefilling:
            return False
        if not self.system.prefill_by_deadline or not inst.decoding:
            return True
        return inst.prefilling[0].deadline_s() <= min(r.deadline_s() for r in inst.decoding)

    def _needed_next(self, inst: SimInstance) -> int:
        if self._prefill_next(inst):
            r = inst.prefilling[0]
            return self.used_blocks(inst) + -(-(r.context + 1) // self.block_tokens)
        return self.used_blocks(inst, 1)

    def next_run(self, now: float, horizon_s: float) -> Run | None:
        """Start the next iterations at ``now``; None when the device has nothing to do."""
        while True:
            inst = self._choose()
            if inst is None:
                return None
            self._spill_until_fits(inst, self._needed_next(inst), now)
            if inst.has_work:
                break
            self.current, self.quota_left = None, 0
        self.quota_left -= 1
        if self._prefill_next(inst):
            r = inst.prefilling[0]
            chunk = r.context - r.prefilled
            if self.system.prefill_chunk_tokens is not None:
                chunk = min(chunk, self.system.prefill_chunk_tokens)
            end = now + self.true.prefill_s(chunk) / self.share
            self.run = Run(inst, Phase.PREFILL, [r], now, [end], chunk)
            self.quota_left = 0
            return self.run
        batch = list(inst.decoding)
        order = sorted((r.output_tokens - r.generated, r.context) for r in batch)  # (tokens left, context)
        n = len(batch)
        ctx_sum = float(sum(c for _, c in order))
        ends: list[float] = []
        t = now
        k = 0  # iterations done
        gone = 0  # requests finished within the run (left[:gone])
        while True:
            live = n - gone
            t += self.step_decode_s(ctx_sum / live + k, live)
            ends.append(t)
            k += 1
            while gone < n and order[gone][0] <= k:
                ctx_sum -= order[gone][1]
                gone += 1
            if gone == n or t >= horizon_s:
                break
            if not self._may_continue(inst, k):
                break
            if self.quota_left > 0:
                self.quota_left -= 1
            else:
                self.quota_left = self.quota - 1  # a new grant: _may_continue showed pick gives this one
        self.run = Run(inst, Phase.DECODE, batch, now, ends)
        return self.run

    def _may_continue(self, inst: SimInstance, k: int) -> bool:
        """Could the (k+1)-th iteration follow at once? Inside a grant: if the KV holds it. At a
        grant boundary also: no other instance has work and no memory plan would change."""
        bt = self.block_tokens
        needed = sum(-(-(r.context + k + 1) // bt) for r in inst.decoding if r.output_tokens - r.generated > k)
        if needed > inst.kv_blocks:
            return False
        if inst.prefilling:
            return False  # a waiting prompt may be due before the next token: choose again
        if self.quota_left > 0:
            return True
        if any(i.has_work for i in self.instances.values() if i is not inst):
            return False
        if self.system.static_memory:
            return True
        la = self.memory.lookahead_tokens
        reserved = sum(reservation_blocks(r.context + k, la, bt, self.bound(r)) for r in inst.decoding
                       if r.output_tokens - r.generated > k)
        if resize_target(self.memory, inst.kv_blocks, reserved) is not None:
            return False
        return all(resize_target(self.memory, i.kv_blocks, self.reserved_blocks(i)) is None
                   for i in self.instances.values() if i is not inst and i.state is not InstanceState.LOADING)

    def finish_run(self, run: Run) -> list[SimRequest]:
        """Apply a run that has ended; returns the requests that finished."""
        self.run = None
        self._touch(run.inst)
        end = run.ends[-1]
        self.busy_s += end - run.start_s
        inst = run.inst
        done: list[SimRequest] = []
        if not inst.alive:
            return done  # evicted meanwhile: its requests already continue elsewhere
        if run.phase is Phase.PREFILL:
            r = run.batch[0]
            if r in inst.prefilling:
                r.prefilled += run.chunk_tokens
            if r in inst.prefilling and r.prefilled >= r.context:
                inst.prefilling.remove(r)
                r.generated += 1
                if r.first_token_s is None:
                    r.first_token_s = end
                    r.first_device = self.kind
                if r.generated >= r.output_tokens:
                    done.append(r)
                else:
                    r.state = RequestState.DECODE
                    inst.decoding.append(r)
        else:
            k = len(run.ends)
            on = set(map(id, inst.decoding))
            for r in run.batch:
                if id(r) not in on:
                    continue
                steps = min(k, r.output_tokens - r.generated)
                r.generated += steps
                self.decode_tokens += steps
                if r.generated >= r.output_tokens:
                    r.finish_s = run.ends[steps - 1]
                    done.append(r)
            if done:
                gone = set(map(id, done))
                inst.decoding = [r for r in inst.decoding if id(r) not in gone]
        for r in done:
            r.state = RequestState.DONE
            if r.finish_s is None:
                r.finish_s = end
        self._went_idle(inst, end)
        return done

