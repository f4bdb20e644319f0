"""The reconcile loop: observe the pods, decide with autoscaler/core, execute, publish routes.

Every ``interval_s`` (sooner when demand arrives) one round:
  1. ask every pod for ``/admin/status`` (a pod that refuses the connection, or says it is
     shutting down, is out of the snapshot, and the instances it had are lost; one that is only
     slow keeps its last answer);
  2. track idleness (a pod's batch/waiting, and the activity the activator reports) and lost
     instances (seen READY before, gone now without our asking: a pod died or restarted);
  3. publish the route table (READY instances) when it changed; demand seen before a
     function's newest instance was published is dropped (those requests are about to use it);
  4. ``decide(snapshot(now), pending)`` where pending is the activator's waiting demand (kept for
     ``demand_ttl_s``; the activator repeats it while requests wait) plus one request per function
     that lost an instance, so lost instances are re-placed;
  5. execute the plan through the admin API, one task per node (actions of a node in order).

The controller keeps nothing durable: on start it knows only the pods' answers, so a restart
rebuilds the same view. Its state is touched only from the event loop (the loop and the API's
handlers run there; no threads), and the loop is its only writer of pod views and plans.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

from activator.routes import RouteTable
from autoscaler.core import (
    DEFAULT_RATE_WINDOW_S,
    Action,
    ArrivalRates,
    Evict,
    FunctionId,
    InstanceId,
    Load,
    NodeId,
    PendingDemand,
    Plan,
    Unload,
    decide,
)
from autoscaler.service.admin import AdminClient, AdminError
from autoscaler.service.nodes import NodeSource, NodeSpec
from autoscaler.service.observe import PodStatus, instance_id, parse_status, routes, snapshot
from autoscaler.service.rollout import rollout
from functions import FunctionSpec, load_function_dir

log = logging.getLogger("slinfer.autoscaler")

# Loads of one function in a row during which the pod went away before the failure is published
# (the function answered 503 with why, and retried with backoff): one may be a pod killed by chance.
MAX_LOAD_CRASHES = 2
# Loads of one function in a row that pods refused for memory (507 insufficient_memory) before the
# failure is published: the placements after the first know the model's size, so refusals that go
# on mean pods declare more memory than they have.
MAX_MEMORY_REFUSALS = 3


@dataclass(frozen=True)
class ControllerSettings:
    token: str
    interval_s: float = 0.5  # demand and finished loads wake the loop sooner
    demand_ttl_s: float = 2.0
    # A function whose model a pod refused to load is retried after this, doubling with each
    # failure in a row up to the max (its requests are answered 503 meanwhile, not held).
    load_failure_backoff_s: float = 5.0
    max_load_failure_backoff_s: float = 300.0
    fresh_grace_s: float = 2.0  # a new instance is not unloaded for idleness this soon
    profile: bool = True  # profile a model on first load (its latency estimates); false is faster
    rate_window_s: float = DEFAULT_RATE_WINDOW_S  # functions' arrival rates (preemption spares busier ones)
    # A pod whose status has timed out this long without a break is taken as gone (a stuck device
    # thread; its /healthz fails too): its instances are re-placed. Shorter silences are a load
    # profiling, which holds the device thread.
    silent_pod_s: float = 60.0


@dataclass(frozen=True)
class LoadFailure:
    """A function's model failed to load (a pod refused it) ``count`` times in a row."""

    why: str
    count: int
    retry_at_s: float  # its next load is not tried before this (the controller's clock)


class Controller:
    def __init__(self, nodes: NodeSource, functions: Mapping[str, FunctionSpec], settings: ControllerSettings,
                 client: httpx.AsyncClient, store_dir: Path | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.node_source = nodes
        self.settings = settings
        self.admin = AdminClient(client, settings.token, profile=settings.profile)
        self.clock = clock
        self.store_dir = store_dir
        self.functions: dict[str, FunctionSpec] = dict(functions)
        if store_dir is not None and store_dir.is_dir():
            self.functions.update({s.name: s for s in load_function_dir(store_dir)})
        self.pods: dict[NodeId, PodStatus] = {}
        self.down: set[NodeId] = set()
        self.silent_since: dict[NodeId, float] = {}  # pods whose status times out: since when
        self.overdeclared: set[NodeId] = set()  # pods warned about: they declare more memory than they have
        self.terminating: set[NodeId] = set()  # pods shutting down (SIGTERM): out of the snapshot too
        self.idle_since: dict[InstanceId, float | None] = {}
        self.last_busy: dict[InstanceId, float] = {}  # when each instance was last seen with requests
        self.demand: dict[str, tuple[int, float]] = {}  # function -> (waiting requests, until)
        self.activity: dict[str, float] = {}  # function -> last time the activator served it
        self.rates = ArrivalRates(settings.rate_window_s)  # requests per second per function, lately
        self.loading: set[tuple[str, NodeId]] = set()
        # when each load of the last moments returned, and when the status in use of each pod was
        # asked for: a status asked for before a load returned may not show it yet
        self.loaded_at: dict[tuple[str, NodeId], float] = {}
        self.status_asked: dict[NodeId, float] = {}
        self.removing: set[InstanceId] = set()  # asked to go (not lost when gone); until gone
        # unloads and evicts whose call has not returned: not acted on again meanwhile (a status
        # may still show them ready, or be a slow pod's last answer), however many rounds pass
        self.removals_in_flight: set[InstanceId] = set()
        self.ever_ready: dict[InstanceId, str] = {}
        self.lost: set[str] = set()
        self.grew: dict[str, int] = {}  # function -> route version that first listed its newest endpoint
        # function -> its model's failed loads (a pod refused them: 4xx), until a load succeeds or
        # it is redeployed; why is published with the routes so the activator answers at once
        self.load_failures: dict[str, LoadFailure] = {}
        # function -> loads in a row whose pod went away mid-load (the connection dropped): a
        # model too big for a pod gets it OOM-killed, and re-placing it would take down the next
        self.load_crashes: dict[str, int] = {}
        # function -> its loads in a row that pods refused for memory; checkpoint -> the weight size
        # a refusing pod estimated (so placement counts a model no pod holds yet)
        self.memory_refusals: dict[str, int] = {}
        self.weight_hints: dict[str, int] = {}
        self.last_plan = Plan()
        # Versions grow across restarts (wall-clock ms): an activator that followed the old
        # autoscaler sees the new one's first table as newer.
        self.table = RouteTable(int(time.time() * 1000), dict(self.functions), {})
        self._changed = asyncio.Event()
        self._poke = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self.rounds = 0

    # -- inputs (from the API) ----------------------------------------------------------------
    def report_demand(self, waiting: Mapping[str, int], active: Iterable[str] = (), seen_version: int = 0,
                      arrived: Mapping[str, int] | None = None) -> None:
        """Waiting requests per function, as seen with route table ``seen_version``; the functions
        with requests since the last report (``active``) and how many arrived for each
        (``arrived``: their arrival rates). Demand seen before the function's newest ready instance was published is
        stale (those requests are about to try it) and is ignored: it would otherwise scale out a
        function that has room."""
        now = self.clock()
        for fn, n in waiting.items():
            if n > 0 and seen_version >= self.grew.get(fn, 0):
                self.demand[fn] = (n, now + self.settings.demand_ttl_s)
        arrived = arrived or {}
        for fn in {*active, *arrived}:
            self.activity[fn] = now
        for fn, n in arrived.items():
            self.rates.record(FunctionId(fn), now, n)
        if waiting:
            self._poke.set()

    def deploy(self, spec: FunctionSpec) -> None:
        self.functions[spec.name] = spec
        self.load_failures.pop(spec.name, None)  # a new spec may fix what failed: try it at once
        self.load_crashes.pop(spec.name, None)
        self.memory_refusals.pop(spec.name, None)
        self._publish(list(self.pods.values()))  # the activator sees the new spec without a round's wait
        if self.store_dir is not None:
            self.store_dir.mkdir(parents=True, exist_ok=True)
            (self.store_dir / f"{spec.name}.yaml").write_text(yaml.safe_dump(spec.to_dict(), sort_keys=False))
        self._poke.set()

    def delete(self, name: str) -> bool:
        found = self.functions.pop(name, None) is not None
        self.load_failures.pop(name, None)
        self._publish(list(self.pods.values()))
        if self.store_dir is not None:
            with contextlib.suppress(FileNotFoundError):
                (self.store_dir / f"{name}.yaml").unlink()
        self._poke.set()
        return found

    async def next_table(self, after: int, wait_s: float) -> RouteTable:
        if self.table.version <= after:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), wait_s)
        return self.table

    async def settle(self) -> None:
        """Until the admin calls of earlier rounds have landed (tests; an orderly stop)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    def close(self) -> None:
        """Answer every pending long-poll now (the server is about to stop)."""
        self._changed.set()

    # -- the loop ---------------------------------------------------------------------------
    async def run(self) -> None:
        try:
            while True:
                try:
                    await self.reconcile()
                except Exception:  # one bad round must not stop the control plane
                    log.exception("reconcile round failed")
                self._poke.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._poke.wait(), self.settings.interval_s)
        finally:
            for t in list(self._tasks):
                t.cancel()

    async def observe(self) -> list[PodStatus]:
        nodes = self.node_source.nodes()
        asked = self.clock()
        answers = await asyncio.gather(*(self.admin.status(n) for n in nodes), return_exceptions=True)
        # a status that timed out: a pod busy (a load holds its device thread), or stuck or frozen?
        slow = [n for n, a in zip(nodes, answers, strict=True) if isinstance(a, httpx.TimeoutException)]
        alive = dict(zip([n.node_id for n in slow], await asyncio.gather(*(self.admin.healthy(n) for n in slow)),
                         strict=True))
        pods: list[PodStatus] = []
        down: set[NodeId] = set()
        terminating: set[NodeId] = set()
        for node, a in zip(nodes, answers, strict=True):
            if isinstance(a, BaseException):
                prev = self.pods.get(node.node_id)
                if isinstance(a, httpx.TimeoutException) and prev is not None and alive[node.node_id]:
                    since = self.silent_since.setdefault(node.node_id, asked)
                    if asked - since < self.settings.silent_pod_s:
                        # Slow, not gone: a load holds the pod's device thread while it profiles,
                        # and status waits for it. Its last answer stands (nothing is lost).
                        pods.append(prev)
                        continue
                    if node.node_id not in self.down:
                        log.warning("pod %s has not answered its status for %.0f s; taking it as gone",
                                    node.node_id, asked - since)
                    down.add(node.node_id)
                    continue
                if isinstance(a, httpx.TimeoutException) and node.node_id not in self.down:
                    log.warning("pod %s does not answer its status and /healthz does not say it is healthy; "
                                "taking it as gone", node.node_id)
                self.silent_since.pop(node.node_id, None)
                down.add(node.node_id)
                continue
            self.silent_since.pop(node.node_id, None)
            if a.get("terminating"):
                # Going away (its running requests drain, then move): treated as gone now, so its
                # instances are re-placed on other pods while it drains, warm when the moved work
                # arrives, and nothing new is routed or placed there.
                if node.node_id not in self.terminating:
                    log.info("pod %s is shutting down; re-placing its instances", node.node_id)
                down.add(node.node_id)
                terminating.add(node.node_id)
                continue
            p = parse_status(node, a)
            pods.append(p)
            self.status_asked[node.node_id] = asked
            if (p.most_room_bytes is not None and p.most_room_bytes + p.kv_budget_bytes < node.memory_bytes
                    and node.node_id not in self.overdeclared):
                self.overdeclared.add(node.node_id)
                mib = 1 << 20
                log.warning("pod %s declares %d MiB for weights and KV, but could hold %d MiB (%d MiB of weights "
                            "beside its KV budget): placement counts the smaller", node.node_id,
                            node.memory_bytes // mib, (p.most_room_bytes + p.kv_budget_bytes) // mib,
                            p.most_room_bytes // mib)
        self.down = down
        self.terminating = terminating
        self.pods = {p.node.node_id: p for p in pods}
        return pods

    async def reconcile(self) -> Plan:
        pods = await self.observe()
        now = self.clock()
        # loads that returned after their pod's status was asked for count as under way still
        self.loaded_at = {k: t for k, t in self.loaded_at.items() if t > self.status_asked.get(k[1], -math.inf)}
        loading = self.loading | set(self.loaded_at)
        self._track(now, pods)
        self._publish(pods)  # first: a new endpoint makes the demand that asked for it stale
        snap = snapshot(now, pods, self.functions, self.idle_since, loading, rates=self.rates.rates(now),
                        removing=self.removals_in_flight, weight_hints=self.weight_hints)
        pending = [PendingDemand(FunctionId(fn), n) for fn, (n, until) in sorted(self.demand.items())
                   if until >= now and fn in self.functions and self._may_load(fn, now)]
        waiting = {p.function for p in pending}
        pending += [PendingDemand(FunctionId(fn), 1) for fn in sorted(self.lost - waiting) if fn in self.functions]
        # A function that failed to load has no demand (its requests are answered at once): retry
        # it by itself once its backoff has passed, so a fixed model comes up without a redeploy.
        asked = {str(fn) for fn in waiting} | self.lost
        pending += [PendingDemand(FunctionId(fn), 1) for fn in sorted(self.load_failures)
                    if fn not in asked and fn in self.functions and self._may_load(fn, now)]
        self.demand = {fn: d for fn, d in self.demand.items() if d[1] >= now}
        # Redeployed functions: their stale instances are replaced (rollout's doc). A new spec
        # that failed to load asks for nothing more: the old instances go on serving meanwhile.
        idle_s = {iid: now - since for iid, since in self.idle_since.items() if since is not None}
        roll = rollout(pods, self.functions, loading, self.removals_in_flight, idle_s)
        pending_fns = {str(p.function) for p in pending}
        wanted = [fn for fn in roll.want if self._may_load(fn, now)]
        pending += [PendingDemand(FunctionId(fn), 1) for fn in wanted if fn not in pending_fns]
        plan = decide(snap, pending)
        fallbacks = [u for u in roll.fallbacks(plan) if u.instance_id.split("@", 1)[0] in wanted]
        acted = {a.instance_id for a in plan.actions if not isinstance(a, Load)}
        extra = tuple(u for u in (*roll.unload, *fallbacks) if u.instance_id not in acted)
        if extra:
            plan = Plan(plan.actions + extra, plan.waiting)
        self.last_plan = plan
        self._execute(plan)
        self.rounds += 1
        return plan

    def _track(self, now: float, pods: list[PodStatus]) -> None:
        present: set[InstanceId] = set()
        hosted: set[str] = set()
        for p in pods:
            for i in p.instances:
                iid = instance_id(i.function, p.node.node_id)
                present.add(iid)
                hosted.add(i.function)
                if i.busy or i.state != "ready":
                    self.last_busy[iid] = now
                    self.idle_since[iid] = None
                else:  # idle since it was last seen busy, or last served by the activator
                    since = self.last_busy.setdefault(iid, now)
                    self.idle_since[iid] = max(since, self.activity.get(i.function, since))
                if i.state == "ready" and iid not in self.ever_ready:
                    # A fresh instance counts as busy for a moment: the requests that asked for it
                    # are on their way (the activator has yet to see the new route), so even a
                    # keep-alive of 0 must not unload it before they arrive.
                    self.last_busy[iid] = now + self.settings.fresh_grace_s
                    self.idle_since[iid] = None
                    self.ever_ready[iid] = i.function
        for iid, fn in list(self.ever_ready.items()):
            if iid not in present:
                del self.ever_ready[iid]
                if iid not in self.removing and fn in self.functions:
                    log.warning("instance %s is gone without being unloaded; re-placing it", iid)
                    self.lost.add(fn)
        self.lost &= set(self.functions)
        self.lost -= hosted
        for iid in list(self.idle_since):
            if iid not in present:
                del self.idle_since[iid]
                self.last_busy.pop(iid, None)
        self.removing &= present

    def _execute(self, plan: Plan) -> None:
        by_node: dict[NodeId, list[Action]] = {}
        for a in plan.actions:
            by_node.setdefault(a.node_id, []).append(a)
            if isinstance(a, Load):
                self.loading.add((a.function, a.node_id))
            else:
                self.removing.add(a.instance_id)
                self.removals_in_flight.add(a.instance_id)
        for node_id, actions in by_node.items():
            node = self._node(node_id)
            if node is None:
                continue
            t = asyncio.create_task(self._apply(node, actions), name=f"apply-{node_id}")
            self._tasks.add(t)
            t.add_done_callback(self._tasks.discard)

    def _node(self, node_id: NodeId) -> NodeSpec | None:
        p = self.pods.get(node_id)
        return p.node if p is not None else None

    async def _apply(self, node: NodeSpec, actions: list[Action]) -> None:
        for a in actions:
            try:
                if isinstance(a, Load):
                    spec = self.functions.get(a.function)
                    if spec is None:
                        continue
                    log.info("load %s on %s", a.function, node.node_id)
                    try:
                        await self.admin.load(node, spec)
                    except AdminError as e:
                        if e.code != "already_loaded":
                            raise
                        # (a load this pod had started for an earlier plan: the instance is there)
                        log.info("%s is already on %s", a.function, node.node_id)
                    self.load_failures.pop(a.function, None)
                    self.load_crashes.pop(a.function, None)
                    self.memory_refusals.pop(a.function, None)
                    self.loaded_at[(a.function, a.node_id)] = self.clock()
                else:
                    name = a.instance_id.split("@", 1)[0]
                    try:
                        if isinstance(a, Unload):
                            log.info("unload %s (drain=%s)", a.instance_id, a.drain)
                            await self.admin.unload(node, name, a.drain)
                        elif isinstance(a, Evict):
                            log.info("evict %s for %s", a.instance_id, a.reason.value)
                            await self.admin.evict(node, name)
                    except AdminError as e:
                        if e.code != "instance_not_found":
                            raise
                        log.info("%s is already gone from %s", a.instance_id, node.node_id)
            except (AdminError, httpx.HTTPError) as e:
                log.warning("%s on %s failed: %s", type(a).__name__, node.node_id, str(e) or type(e).__name__)
                why = None
                if isinstance(a, Load) and isinstance(e, AdminError) and e.code == "insufficient_memory":
                    why = self._refused_for_memory(a.function, spec, node, e)
                elif isinstance(a, Load) and isinstance(e, AdminError) and e.status < 500:
                    why = f"{node.node_id} could not load it: {e.detail}"
                elif isinstance(a, Load) and isinstance(e, (httpx.RemoteProtocolError, httpx.ReadError)):
                    crashes = self.load_crashes[a.function] = self.load_crashes.get(a.function, 0) + 1
                    if crashes >= MAX_LOAD_CRASHES:
                        why = (f"its pods went away while loading it {crashes} times in a row (the last: "
                               f"{node.node_id}); is the model larger than a pod's memory?")
                if why is not None and isinstance(a, Load) and self.functions.get(a.function) is spec:
                    # (not redeployed meanwhile)
                    prev = self.load_failures.get(a.function)
                    n = 1 if prev is None else prev.count + 1
                    s = self.settings
                    backoff = min(s.max_load_failure_backoff_s, s.load_failure_backoff_s * 2 ** min(n - 1, 30))
                    self.load_failures[a.function] = LoadFailure(why, n, self.clock() + backoff)
            finally:
                if isinstance(a, Load):
                    self.loading.discard((a.function, a.node_id))
                else:
                    self.removals_in_flight.discard(a.instance_id)
        self._poke.set()  # look again now: a load finished, routes change

    def _refused_for_memory(self, function: str, spec: FunctionSpec | None, node: NodeSpec,
                            e: AdminError) -> str | None:
        """Learn the model's size from a pod that refused it for memory (the next plan places it
        where it fits, or makes room); why it cannot start, once no pod could hold it or refusals
        go on."""
        # Its first load on a pod reads it from disk and needs the load's peak, not only the weights
        needed = e.fields.get("needed_bytes", e.fields.get("weight_bytes"))
        if spec is not None and isinstance(needed, int) and needed > 0:
            self.weight_hints[spec.checkpoint] = needed
        n = self.memory_refusals[function] = self.memory_refusals.get(function, 0) + 1
        largest = max((p.capacity_bytes for p in self.pods.values()), default=node.memory_bytes)
        gib = 1 << 30
        if isinstance(needed, int) and needed > largest:
            return (f"no pod could make room for it: loading it takes up to {needed / gib:.2f} GiB; the most "
                    f"any pod could hold is {largest / gib:.2f} GiB")
        if n >= MAX_MEMORY_REFUSALS:
            return (f"pods refused it for lack of memory {n} times in a row (the last: {node.node_id}: "
                    f"{e.detail}); do pods declare more memory than they have?")
        return None

    def _may_load(self, function: str, now: float) -> bool:
        failure = self.load_failures.get(function)
        return failure is None or failure.retry_at_s <= now

    def load_errors(self) -> dict[str, str]:
        """Why each function whose model failed to load cannot start, by function."""
        return {fn: f.why for fn, f in sorted(self.load_failures.items())}

    def _publish(self, pods: list[PodStatus]) -> None:
        table = routes(self.table.version, pods, self.functions, self.load_errors())
        gone = tuple(sorted(n.url for n in self.node_source.nodes()
                            if n.node_id in self.down and n.node_id not in self.terminating))
        if (table.functions != self.table.functions or table.endpoints != self.table.endpoints
                or table.unavailable != self.table.unavailable or gone != self.table.gone):
            version = max(self.table.version + 1, int(time.time() * 1000))
            for fn, eps in table.endpoints.items():
                if set(eps) - set(self.table.endpoints_of(fn)):
                    self.grew[fn] = version
                    self.demand.pop(fn, None)
            self.table = RouteTable(version, table.functions, table.endpoints, table.unavailable, gone)
            self._changed.set()
            self._changed = asyncio.Event()

    # -- views ------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        now = self.clock()
        nodes = []
        for node in self.node_source.nodes():
            p = self.pods.get(node.node_id)
            nodes.append({
                "node": node.node_id, "url": node.url, "kind": node.kind.value, "up": node.node_id not in self.down,
                "terminating": node.node_id in self.terminating,
                "instances": [{"function": i.function, "state": i.state, "batch": i.batch, "waiting": i.waiting,
                               "idle_s": _idle(now, self.idle_since.get(instance_id(i.function, node.node_id)))}
                              for i in (p.instances if p else ())],
            })
        return {
            "functions": [s.to_dict() for _, s in sorted(self.functions.items())],
            "nodes": nodes,
            "demand": {fn: n for fn, (n, until) in sorted(self.demand.items()) if until >= now},
            "arrival_rate_per_s": {fn: round(r, 4) for fn, r in sorted(self.rates.rates(now).items())},
            "lost": sorted(self.lost),
            "load_errors": self.load_errors(),
            "loads_in_flight": [{"function": fn, "node": node} for fn, node in sorted(self.loading)],
            "routes_version": self.table.version,
            "rounds": self.rounds,
        }


def _idle(now: float, since: float | None) -> float | None:
    return None if since is None else round(max(0.0, now - since), 2)
