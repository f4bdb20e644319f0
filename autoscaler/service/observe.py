"""From what the pods report to what the policy and the activator read. Pure: no I/O, no clock.

A pod's ``/admin/status`` is parsed once into ``PodStatus``; ``snapshot`` builds the
``ClusterSnapshot`` that ``autoscaler.core.decide`` takes, and ``routes`` the table the activator
routes by (deployed functions and their READY instances). An instance is named
``<function>@<node>``: a pod holds at most one instance of a function.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from activator.routes import Endpoint, RouteTable
from autoscaler.core import (
    ClusterSnapshot,
    FunctionId,
    FunctionView,
    InstanceId,
    InstanceView,
    NodeId,
    NodeView,
)
from autoscaler.service.nodes import NodeSpec
from functions import FunctionSpec

LIVE_STATES = ("loading", "ready", "draining")


@dataclass(frozen=True)
class PodInstance:
    function: str
    state: str  # loading | ready | draining (runtime InstanceState values)
    model: str
    batch: int = 0
    waiting: int = 0
    demand: float = 0.0
    kv_bytes: int = 0
    kv_reserved_bytes: int = 0
    digest: str | None = None  # FunctionSpec.instance_digest of the spec it was loaded with

    @property
    def busy(self) -> bool:
        return self.batch + self.waiting > 0

    def stale(self, functions: Mapping[str, FunctionSpec]) -> bool:
        """Loaded from a spec that has since been redeployed with a change that needs a new
        instance (a pod that reports no digest is taken to be current)."""
        spec = functions.get(self.function)
        return spec is not None and self.digest is not None and self.digest != spec.instance_digest


@dataclass(frozen=True)
class PodStatus:
    node: NodeSpec
    kv_budget_bytes: int
    instances: tuple[PodInstance, ...]
    weight_bytes: Mapping[str, int]  # by model ref, from the pod's host weight cache
    # what a load could take there now, and at most (every instance gone); None: not reported
    load_room_bytes: int | None = None
    most_room_bytes: int | None = None

    @property
    def capacity_bytes(self) -> int:
        """What the pod can hold: its declared memory, or less where it reports less."""
        declared = self.node.memory_bytes
        return declared if self.most_room_bytes is None else min(declared, self.most_room_bytes)


def instance_id(function: str, node_id: str) -> InstanceId:
    return InstanceId(f"{function}@{node_id}")


def parse_status(node: NodeSpec, data: Mapping[str, Any]) -> PodStatus:
    device = {i["name"]: i for i in data.get("instances", [])}
    out: list[PodInstance] = []
    for name, f in sorted(dict(data.get("functions", {})).items()):
        if f.get("state") not in LIVE_STATES:
            continue
        d = device.get(name, {})
        per_block = int(d.get("kv_bytes", 0)) // max(1, int(d.get("kv_blocks_total", 0)))
        out.append(PodInstance(
            function=name, state=str(f["state"]), model=str(f.get("model", "")),
            batch=int(d.get("batch", 0)), waiting=int(d.get("waiting", 0)), demand=float(d.get("demand", 0.0)),
            # KV lent to cached prefixes is the pod's to take back: not held, to a placement
            kv_bytes=int(d.get("kv_bytes", 0)) - int(d.get("kv_lent_bytes", 0)),
            kv_reserved_bytes=int(d.get("kv_blocks_reserved", 0)) * per_block,
            digest=str(f["digest"]) if f.get("digest") is not None else None,
        ))
    cache = data.get("weights_cache", {}).get("models", [])
    weights = {str(m["ref"]): int(m["bytes"]) for m in cache}
    budget = int(data.get("device", {}).get("kv_budget_bytes", 0))
    mem = data.get("memory") or {}
    room, most = mem.get("load_room_bytes"), mem.get("most_room_bytes")
    return PodStatus(node, budget, tuple(out), weights, int(room) if room is not None else None,
                     int(most) if most is not None else None)


def known_weight_bytes(pods: Iterable[PodStatus]) -> dict[str, int]:
    out: dict[str, int] = {}
    for p in pods:
        out.update(p.weight_bytes)
    return out


def snapshot(now_s: float, pods: Iterable[PodStatus], functions: Mapping[str, FunctionSpec],
             idle_since: Mapping[InstanceId, float | None],
             loading: Iterable[tuple[str, NodeId]] = (),
             rates: Mapping[FunctionId, float] | None = None,
             removing: Iterable[InstanceId] = (),
             weight_hints: Mapping[str, int] | None = None) -> ClusterSnapshot:
    """The cluster for ``decide``. ``loading`` names loads sent but not yet visible in a status;
    instances draining count as loading (they are on their way out and must not be acted on), and
    so do those in ``removing`` (an unload or evict sent, which a status may not show yet).
    ``rates``: requests per second per function lately (``autoscaler.core.ArrivalRates``).
    ``weight_hints``: weight sizes by checkpoint for models no pod holds yet (a pod that refused
    a load for memory says what it estimated); what a pod's weight cache holds comes first."""
    pods = list(pods)
    weights = {**(weight_hints or {}), **known_weight_bytes(pods)}
    pending = set(loading)
    leaving = set(removing)
    nodes: list[NodeView] = []
    for p in pods:
        insts: list[InstanceView] = []
        seen: set[str] = set()
        for i in p.instances:
            iid = instance_id(i.function, p.node.node_id)
            seen.add(i.function)
            insts.append(InstanceView(
                iid, FunctionId(i.function), p.node.node_id, batch=i.batch, demand=i.demand,
                weight_bytes=weights.get(i.model, 0), kv_bytes=i.kv_bytes, kv_reserved_bytes=i.kv_reserved_bytes,
                idle_since_s=idle_since.get(iid), loading=i.state != "ready" or iid in leaving))
        for fn, node_id in sorted(pending):
            if node_id == p.node.node_id and fn not in seen:
                model = functions[fn].checkpoint if fn in functions else ""
                insts.append(InstanceView(instance_id(fn, node_id), FunctionId(fn), node_id, batch=0, demand=0.0,
                                          weight_bytes=weights.get(model, 0), kv_bytes=0, kv_reserved_bytes=0,
                                          idle_since_s=None, loading=True))
        memory = p.node.memory_bytes
        if p.load_room_bytes is not None:
            # Placement counts weights + KV against the declared memory; the pod knows what it
            # really has: free memory is never more than a load could take there now (the pod
            # keeps its KV budget apart, so that is room for weights, as a load needs it).
            memory = min(memory, sum(i.planned_bytes for i in insts) + p.load_room_bytes)
        nodes.append(NodeView(p.node.node_id, p.node.kind, memory, p.kv_budget_bytes, tuple(insts)))
    rates = rates or {}
    fns = tuple(FunctionView(FunctionId(s.name), s.device, weights.get(s.checkpoint, 0), s.keep_alive_s, s.max_instances,
                             rates.get(FunctionId(s.name), 0.0))
                for _, s in sorted(functions.items()))
    return ClusterSnapshot(now_s, tuple(nodes), fns)


def routes(version: int, pods: Iterable[PodStatus], functions: Mapping[str, FunctionSpec],
           load_errors: Mapping[str, str] | None = None) -> RouteTable:
    """Deployed functions and their READY instances (by instance id); a function with none whose
    model failed to load is ``unavailable``, with why. Once a redeployed function has a ready
    instance of its new spec, only those are listed (the stale ones drain); until then the stale
    ones serve."""
    eps: dict[str, list[tuple[Endpoint, bool]]] = {}  # function -> (endpoint, stale)
    for p in pods:
        for i in p.instances:
            if i.state == "ready" and i.function in functions:
                eps.setdefault(i.function, []).append(
                    (Endpoint(instance_id(i.function, p.node.node_id), p.node.node_id, p.node.url), i.stale(functions)))
    served = {fn: [e for e, stale in lst if not stale] or [e for e, _ in lst] for fn, lst in eps.items()}
    endpoints = {fn: tuple(sorted(lst, key=lambda e: e.instance_id)) for fn, lst in sorted(served.items())}
    unavailable = {fn: why for fn, why in sorted((load_errors or {}).items()) if fn in functions and fn not in endpoints}
    return RouteTable(version, dict(functions), endpoints, unavailable)
