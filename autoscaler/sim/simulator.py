"""The cluster simulator: a trace replayed on virtual nodes under one system's configuration.

The simulator is the adapter between a virtual clock and the real policy code:
  - every request for a function tries the function's instances in ``autoscaler.core.route_order``
    (slinfer: GPU instances before CPU ones, ``SystemConfig.route_device_order``; then largest
    batch first; the sllm baselines: ``round_robin_order``, in turn); each instance's device
    answers with ``runtime.core.admission.admit`` (or, for the sllm baselines, its batch cap);
  - when an instance refuses only for memory or compute, ``autoscaler.core.plan_preemption`` may
    evict a smaller co-located instance (SLINFER's proactive preemption), after which admission is
    asked again; each tick refreshes the functions' arrival rates (``rate_window_s``), and an
    instance of a busier function is never the victim;
  - a request nobody takes waits in the cluster queue; ``autoscaler.core.decide`` then runs on a
    snapshot of the cluster (keep-alive unloads, placement of new instances, preempt-and-place) and
    its plan is applied: loads take time (``loading.LoadModel``), evictions send the victims'
    requests back to the queue, where they continue elsewhere by recompute (prompt + tokens so far,
    their deadlines still running);
  - waiting requests are retried every ``retry_s`` (a tick, which also runs ``decide``) and dropped
    once their first-token (or next-token) deadline has passed, counting time spent waiting for a
    model load as part of the deadline (the runtime's ``load_delay_s``);
  - each device runs its own iteration loop (``node.SimNode``: arbiter, memory planner).
Keep-alive: ``SystemConfig.keep_alive_s`` (the artifact's 1 s) on every node, except that
slinfer keeps idle CPU instances loaded until a placement needs their memory
(``SystemConfig.hold_idle``; see ``autoscaler.core.keepalive``). Placement sees each node's host
cache (``NodeView.cached``) unless ``SystemConfig.cache_aware`` is off.

Events run in (time, order scheduled) order (``clock.EventQueue``); nothing depends on wall time,
so a run is a pure function of (trace, model, cluster, system, load model).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, replace
from typing import cast

from autoscaler.core import (
    ClusterSnapshot,
    Evict,
    FunctionId,
    FunctionView,
    InstanceId,
    Load,
    NodeId,
    NodeView,
    PendingDemand,
    Unload,
    decide,
    plan_preemption,
    round_robin_order,
    route_order,
)
from autoscaler.core.actions import Action
from autoscaler.core.rates import ArrivalRates
from autoscaler.sim.clock import EventKind, EventQueue
from autoscaler.sim.config import ClusterSpec, ModelSpec, SystemConfig
from autoscaler.sim.loading import HostCache, LoadModel
from autoscaler.sim.node import (
    STATIC_SLOT_VIEW_KV_BYTES,
    RequestState,
    Run,
    SimInstance,
    SimNode,
    SimRequest,
    request_bound,
)
from autoscaler.sim.trace import Trace
from functions import SLO, DevicePreference
from runtime.core.admission import Decision
from runtime.core.arbiter import DeviceKind
from runtime.core.lifecycle import InstanceState


@dataclass(frozen=True)
class RequestRecord:
    """One request's outcome. ``first_token_s``/``finish_s`` are None for a dropped request."""

    function: str
    arrival_s: float
    prompt_tokens: int
    output_tokens: int
    first_token_s: float | None
    finish_s: float | None
    load_delay_s: float
    preemptions: int
    device: str | None  # where its first token was computed


@dataclass(frozen=True)
class RunStats:
    """What a run did besides serving requests."""

    duration_s: float  # virtual time from 0 to the last event
    node_seconds: dict[str, float]  # per device kind: time nodes held at least one instance
    decode_tokens: dict[str, int]  # per device kind
    busy_seconds: dict[str, float]  # per device kind: time devices were computing
    loads: int
    loads_from_disk: int
    evictions: int  # instances preempted
    preempted_requests: int  # requests moved by an eviction, a KV spill or a displacement
    max_instances_per_node: int
    gpu_compute_share: float  # what one GPU slot may use


@dataclass(frozen=True)
class RunResult:
    system: str
    model: str
    functions: int
    requests: tuple[RequestRecord, ...]
    stats: RunStats


class Simulator:
    def __init__(self, trace: Trace, model: ModelSpec, cluster: ClusterSpec, system: SystemConfig,
                 load_model: LoadModel | None = None, slo: SLO | None = None, check: bool = False):
        self.check = check  # verify the request and memory invariants every tick (tests; slow)
        self.trace = trace
        self.model = model
        self.cluster = cluster
        self.system = system
        self._last_routed: dict[FunctionId, InstanceId] = {}  # for round-robin routing
        self.load_model = load_model or LoadModel()
        self.slo = slo or SLO()
        self.queue = EventQueue()
        self.nodes: dict[NodeId, SimNode] = {}
        self.caches: dict[str, HostCache] = {}
        for kind, count, memory in ((DeviceKind.CPU, cluster.cpus, cluster.cpu_memory_bytes),
                                    (DeviceKind.GPU, cluster.gpus, cluster.gpu_memory_bytes)):
            if kind not in model.devices:
                continue
            for i in range(count):
                host = f"{kind.value}{i}"
                self.caches[host] = HostCache(cluster.host_cache_bytes)
                for s in range(system.slots_per_node):
                    nid = NodeId(host if system.slots_per_node == 1 else f"{host}.{s}")
                    self.nodes[nid] = SimNode(nid, host, kind, model, system, memory // system.slots_per_node)
        kinds = {n.kind for n in self.nodes.values()}
        self.pools = tuple(k for k in system.pools if k in kinds)
        self.functions = tuple(FunctionView(FunctionId(f), DevicePreference.ANY, model.weight_bytes,
                                            system.keep_alive_s, max(1, len(self.nodes)))
                               for f in trace.functions)
        self.instances: dict[InstanceId, SimInstance] = {}
        self.requests: list[SimRequest] = []
        self.waiting: list[SimRequest] = []
        self._version = 0
        self._snap: tuple[int, float, ClusterSnapshot] | None = None
        self._views: dict[NodeId, tuple[NodeView, frozenset[str], NodeView]] = {}  # device view, cache -> both
        self._next_iid = 0
        self._host_count: dict[str, int] = defaultdict(int)
        self._host_since: dict[str, float] = {}
        self._host_seconds: dict[str, float] = defaultdict(float)
        self._host_max = 0
        self.loads = 0
        self.loads_from_disk = 0
        self.evictions = 0
        self.preempted_requests = 0
        self.displaced_requests = 0  # of those, handed back by admission for a shorter prompt
        self._arrivals_left = len(trace.arrivals)
        self._rates = ArrivalRates(system.rate_window_s) if system.rate_window_s > 0 else None

    # -- driving -----------------------------------------------------------------------------------
    def run(self) -> RunResult:
        for i, a in enumerate(self.trace.arrivals):
            r = SimRequest(i, FunctionId(a.function), a.time_s, a.prompt_tokens, max(1, a.output_tokens),
                           self.slo.ttft_s(a.prompt_tokens), self.slo.tpot_s, waiting_since_s=a.time_s)
            self.requests.append(r)
            self.queue.push(a.time_s, EventKind.ARRIVAL, r)
        self.queue.push(0.0, EventKind.TICK)
        while self.queue:
            ev = self.queue.pop()
            now = ev.time_s
            if ev.kind is EventKind.STEP_DONE:
                node, run = ev.payload
                self._step_done(node, run, now)
                continue
            if ev.kind is EventKind.ARRIVAL:
                self._arrivals_left -= 1
                self._arrive(ev.payload, now)
            elif ev.kind is EventKind.TICK:
                self._tick(now)
            else:
                self._load_done(ev.payload, now)
            self._kick_all(now)
        return self._result()

    def _changed(self) -> None:
        self._version += 1

    def snapshot(self, now: float) -> ClusterSnapshot:
        if self._snap is None or self._snap[0] != self._version or self._snap[1] != now:
            nodes = tuple(self._node_view(n) for n in self.nodes.values())
            self._snap = (self._version, now, ClusterSnapshot(now, nodes, self.functions))
        return self._snap[2]

    def _node_view(self, node: SimNode) -> NodeView:
        view = node.view()
        if not self.system.cache_aware:
            return view
        keys = self.caches[node.host].keys()
        got = self._views.get(node.node_id)
        if got is not None and got[0] is view and got[1] is keys:
            return got[2]  # neither the device nor its host cache changed since
        # The cache is keyed by function name; FunctionId is that str, typed.
        out = replace(view, cached=cast("frozenset[FunctionId]", keys))
        self._views[node.node_id] = (view, keys, out)
        return out

    def _held(self, inst: SimInstance) -> bool:
        """Idle and on a kind whose idle instances never expire (they only leave as victims)."""
        return not inst.has_work and inst.node.kind in self.system.hold_idle

    def _kick(self, node: SimNode, now: float) -> None:
        if node.run is not None:
            return
        run = node.next_run(now, self.queue.horizon_s())
        self._requeue(node.spilled, now)
        node.spilled = []
        if run is not None:
            self.queue.push(run.ends[-1], EventKind.STEP_DONE, (node, run))
            self._changed()

    def _kick_all(self, now: float) -> None:
        for node in self.nodes.values():
            self._kick(node, now)

    def _step_done(self, node: SimNode, run: Run, now: float) -> None:
        node.finish_run(run)
        self._changed()
        self._kick(node, now)

    # -- control -------------------------------------------------------------------------------------
    def _arrive(self, r: SimRequest, now: float) -> None:
        if self._rates is not None:
            self._rates.record(r.function, now)
        if self._route(r, now):
            return
        self.waiting.append(r)
        self._autoscale(now)

    def _tick(self, now: float) -> None:
        self._refresh_rates(now)
        self._retry(now, None)
        self._autoscale(now)
        busy = any(n.run is not None for n in self.nodes.values())
        expiring = False
        for i in self.instances.values():
            if not i.has_work and i.state is InstanceState.READY and i.idle_since_s is None:
                # it would never expire: memory held for good and a clock that never stops
                raise RuntimeError(f"instance {i.iid} is idle with no keep-alive start at t={now:.3f}")
            expiring = expiring or not self._held(i)
        if self.check:
            self.check_invariants(now)
        if self._arrivals_left or self.waiting or expiring or busy:
            self.queue.push(now + self.system.retry_s, EventKind.TICK)

    def check_invariants(self, now: float) -> None:
        """Every arrived request is in exactly one place its state names (the cluster queue, one
        instance's prompts or batch) or has ended; no device holds more memory than it has."""
        seen: dict[int, str] = {}
        places = [("queue", RequestState.WAITING, self.waiting)]
        for inst in self.instances.values():
            places += [(inst.iid, RequestState.PREFILL, inst.prefilling), (inst.iid, RequestState.DECODE, inst.decoding)]
        for where, state, reqs in places:
            for r in reqs:
                if r.rid in seen:
                    raise RuntimeError(f"t={now:.3f}: request {r.rid} is in {seen[r.rid]} and in {where}")
                if r.state is not state:
                    raise RuntimeError(f"t={now:.3f}: request {r.rid} in {where} is {r.state.value}")
                seen[r.rid] = where
        for r in self.requests:
            if r.arrival_s < now and r.rid not in seen and r.state not in (RequestState.DONE, RequestState.DROPPED):
                raise RuntimeError(f"t={now:.3f}: request {r.rid} ({r.state.value}) is nowhere: lost")
        for node in self.nodes.values():
            if node.actions.free < 0:
                raise RuntimeError(f"t={now:.3f}: {node.node_id} holds {-node.actions.free} bytes more than it has")

    def _refresh_rates(self, now: float) -> None:
        """Each function's arrivals per second over the last ``rate_window_s``, into the snapshot's
        function views, as the activator's reports reach the live autoscaler (every tick here)."""
        if self._rates is None:
            return
        rates = self._rates.rates(now)
        changed = [fn for fn in self.functions if fn.arrival_rate_per_s != rates.get(fn.function, 0.0)]
        if changed:
            self.functions = tuple(replace(fn, arrival_rate_per_s=rates.get(fn.function, 0.0))
                                   if fn in changed else fn for fn in self.functions)
            self._changed()

    def _load_done(self, inst: SimInstance, now: float) -> None:
        if not inst.alive:
            return
        inst.node.finish_load(inst, now)
        self._changed()
        self._retry(now, inst.function)
        if self.waiting:
            self._autoscale(now)

    def _retry(self, now: float, function: FunctionId | None) -> None:
        """Route waiting requests (of one function, or all), oldest first; drop the hopeless."""
        still: list[SimRequest] = []
        pending, self.waiting = self.waiting, []
        for r in sorted(pending, key=lambda x: (x.arrival_s, x.rid)):
            if function is not None and r.function != function:
                still.append(r)
            elif self._route(r, now):
                continue
            elif function is None and now > r.deadline_s(r.load_delay_s + self._load_allowance(r)):
                r.state = RequestState.DROPPED
            else:
                still.append(r)
        self.waiting = still + self.waiting  # + any an eviction or a hand-back sent back meanwhile

    def _load_allowance(self, r: SimRequest) -> float:
        """Extra time a waiting request may take because a load of its function is (or was) under
        way since it started waiting."""
        ready = [i.ready_s for i in self.instances.values() if i.function == r.function and i.alive]
        return max([0.0, *(t - r.waiting_since_s for t in ready)])

    def _prospective_delay(self, r: SimRequest, inst: SimInstance) -> float:
        return r.load_delay_s + max(0.0, inst.ready_s - r.waiting_since_s)

    def _route(self, r: SimRequest, now: float) -> bool:
        snap = self.snapshot(now)
        refused = []
        if self.system.round_robin:
            views = round_robin_order(snap, r.function, self._last_routed.get(r.function))
        else:
            views = route_order(snap, r.function, device_order=self.system.route_device_order)
        for view in views:
            inst = self.instances[view.instance_id]
            if inst.state is not InstanceState.READY:
                continue
            delay = self._prospective_delay(r, inst)
            d = inst.node.consider(inst, r, now, delay)
            if d.admitted:
                self._last_routed[r.function] = view.instance_id
                self._place(r, inst, delay, d, now)
                return True
            refused.append((view, inst, d, delay))
        if not self.system.preempt:
            return False
        for view, inst, d, delay in refused:
            gap = inst.node.shortfall(inst, r, d)
            if gap is None or not inst.alive:
                continue
            actions = plan_preemption(self.snapshot(now), inst.node.node_id, view, gap)
            if not actions:
                continue
            self._apply(actions, now)
            d = inst.node.consider(inst, r, now, delay)
            if d.admitted:
                self._place(r, inst, delay, d, now)
                return True
        return False

    def _place(self, r: SimRequest, inst: SimInstance, delay: float, d: Decision, now: float) -> None:
        r.load_delay_s = delay
        if d.displace is not None:  # a longer waiting prompt gave way: it is routed again, as the activator does
            gone = inst.node.hand_back(*d.displace, now)
            if gone is not None:
                self.displaced_requests += 1
                self._requeue([gone], now)
        inst.node.add(inst, r)
        self._changed()

    def _requeue(self, reqs: list[SimRequest], now: float) -> None:
        for r in reqs:
            r.state = RequestState.WAITING
            r.waiting_since_s = now
            self.waiting.append(r)
        self.preempted_requests += len(reqs)
        if reqs:
            self._changed()

    def _pending(self) -> list[PendingDemand]:
        by_fn: dict[FunctionId, list[SimRequest]] = defaultdict(list)
        for r in self.waiting:
            by_fn[r.function].append(r)
        out = []
        kind = self.pools[0] if self.pools else DeviceKind.GPU
        for fn, reqs in sorted(by_fn.items()):
            first = min(reqs, key=lambda x: (x.arrival_s, x.rid))
            if self.system.static_memory:
                kv, demand = STATIC_SLOT_VIEW_KV_BYTES, 0.0
            else:
                tokens = max(self.system.min_instance_tokens, min(first.context + self.system.lookahead_tokens,
                                                                  request_bound(first, self.system, self.model)))
                kv = tokens * self.model.kv_bytes_per_token
                est = self.model.devices[kind].estimate
                demand = est.decode_s(first.context, 1) / first.tpot_slo_s
            out.append(PendingDemand(fn, len(reqs), kv, demand))
        return out

    def _autoscale(self, now: float) -> None:
        ka = self.system.keep_alive_s
        if not self.waiting and not any(i.idle_since_s is not None and now - i.idle_since_s >= ka
                                        and not self._held(i) for i in self.instances.values()):
            return  # decide() would return an empty plan: nothing waits, no keep-alive has expired
        plan = decide(self.snapshot(now), self._pending(), pools=self.pools, balance=self.system.balance,
                      preempt=self.system.preempt, hold_idle=self.system.hold_idle)
        self._apply(plan.actions, now)

    def _apply(self, actions: tuple[Action, ...] | list[Action], now: float) -> None:
        for a in actions:
            if isinstance(a, Load):
                self._load(a.function, self.nodes[a.node_id], now)
            elif isinstance(a, Unload):
                inst = self.instances.pop(a.instance_id)
                if inst.has_work:
                    raise RuntimeError(f"unload of {inst.iid} with requests: keep-alive expired a busy instance")
                inst.node.remove(inst, evict=False)
                self._host_delta(inst.node.host, -1, now)
            elif isinstance(a, Evict):
                inst = self.instances.pop(a.instance_id)
                reqs = inst.node.remove(inst, evict=True)
                for r in reqs:
                    r.preemptions += 1
                self._requeue(reqs, now)
                self.evictions += 1
                self._host_delta(inst.node.host, -1, now)
            self._changed()

    def _load(self, function: FunctionId, node: SimNode, now: float) -> None:
        cached = self.load_model.from_host_memory(self.caches[node.host].touch(function, self.model.weight_bytes))
        load_s = self.load_model.load_s(node.kind, self.model.weight_bytes, cached)
        iid = InstanceId(f"{function}@{node.node_id}#{self._next_iid}")
        self._next_iid += 1
        inst = SimInstance(iid, function, node, self.model.weight_bytes, now, now + load_s)
        node.start_load(inst)
        self.instances[iid] = inst
        self.loads += 1
        self.loads_from_disk += not cached
        self._host_delta(node.host, +1, now)
        self.queue.push(now + load_s, EventKind.LOAD_DONE, inst)

    def _host_delta(self, host: str, delta: int, now: float) -> None:
        before = self._host_count[host]
        self._host_count[host] = before + delta
        self._host_max = max(self._host_max, before + delta)
        if before == 0 and delta > 0:
            self._host_since[host] = now
        elif before + delta == 0:
            self._host_seconds[host] += now - self._host_since.pop(host)

    # -- result --------------------------------------------------------------------------------------
    def _result(self) -> RunResult:
        end = self.queue.now_s
        for host, since in list(self._host_since.items()):
            self._host_seconds[host] += end - since
        records = []
        for r in self.requests:
            if r.state not in (RequestState.DONE, RequestState.DROPPED):
                raise RuntimeError(f"request {r.rid} of {r.function} ended the run {r.state.value}: lost")
            served = r.state is RequestState.DONE
            records.append(RequestRecord(
                r.function, r.arrival_s, r.prompt_tokens, r.output_tokens,
                r.first_token_s if served else None, r.finish_s if served else None, r.load_delay_s,
                r.preemptions, r.first_device.value if r.first_device is not None else None))
        kinds = [k.value for k in DeviceKind]
        node_seconds = dict.fromkeys(kinds, 0.0)
        for host, secs in self._host_seconds.items():
            node_seconds[host.rstrip("0123456789")] += secs
        decode = dict.fromkeys(kinds, 0)
        busy = dict.fromkeys(kinds, 0.0)
        for n in self.nodes.values():
            decode[n.kind.value] += n.decode_tokens
            busy[n.kind.value] += n.busy_s
        stats = RunStats(end, node_seconds, decode, busy, self.loads, self.loads_from_disk, self.evictions,
                         self.preempted_requests, self._host_max,
                         self.system.compute_share)
        return RunResult(self.system.name, self.model.name, len(self.trace.functions), tuple(records), stats)


def simulate(trace: Trace, model: ModelSpec, cluster: ClusterSpec, system: SystemConfig,
             load_model: LoadModel | None = None) -> RunResult:
    return Simulator(trace, model, cluster, system, load_model).run()


__all__ = ["RequestRecord", "RunResult", "RunStats", "Simulator", "simulate"]
