"""The cluster as the autoscaler sees it at one instant: frozen, typed, built from pod status.

A snapshot holds nodes (one runtime pod on one device each), the instances they host, and the
deployed functions. Every policy in ``autoscaler.core`` reads a snapshot and returns values; none
mutates it. ``with_instance`` / ``without_instance`` return new snapshots, which is how a planner
accounts for the actions it has already decided within one round.

Memory is counted forward-looking, as the runtime's planner does: an instance occupies its
weights plus the larger of the KV it holds and the KV its requests reserve (a grow that is due
already counts). Two busyness measures order nodes for placement: ``demand`` (Σ decode demand,
the fraction of the device the instances need to meet their TPOT; used on CPU) and
``planned_memory_bytes`` (used on GPU).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace
from typing import NewType

from functions import DevicePreference
from runtime.core.arbiter import DeviceKind

__all__ = [
    "ClusterSnapshot",
    "DeviceKind",
    "FunctionId",
    "FunctionView",
    "InstanceId",
    "InstanceView",
    "NodeId",
    "NodeView",
    "Resource",
    "UnknownId",
]

NodeId = NewType("NodeId", str)
InstanceId = NewType("InstanceId", str)
FunctionId = NewType("FunctionId", str)


class Resource(enum.Enum):
    """What a node can run short of, and what evicting an instance gives back."""

    MEMORY = "memory"  # node memory for weights + KV (bytes)
    KV = "kv"  # the pod's KV budget (bytes)
    COMPUTE = "compute"  # decode demand (fraction of the device)


class UnknownId(KeyError):
    """A lookup named an id that the snapshot does not hold; the message lists the known ones."""

    def __init__(self, what: str, wanted: str, known: list[str]) -> None:
        self.message = f"{what} {wanted!r} not in the snapshot; known: {', '.join(sorted(known)) or 'none'}"
        super().__init__(self.message)

    def __str__(self) -> str:
        return self.message


def _check_non_negative(owner: str, **values: float) -> None:
    for name, value in values.items():
        if value < 0:
            raise ValueError(f"{owner}: {name} must be >= 0, got {value}")


@dataclass(frozen=True)
class InstanceView:
    """One loaded (or loading) instance of a function on a node.

    ``batch`` counts requests decoding; ``demand`` is its decode demand (est_decode / TPOT);
    ``kv_bytes`` is the KV it holds, ``kv_reserved_bytes`` what its requests reserve (prompt +
    generated + look-ahead). ``idle_since_s`` is when its last request finished (None while it has
    requests).
    """

    instance_id: InstanceId
    function: FunctionId
    node_id: NodeId
    batch: int
    demand: float
    weight_bytes: int
    kv_bytes: int
    kv_reserved_bytes: int
    idle_since_s: float | None
    loading: bool

    def __post_init__(self) -> None:
        _check_non_negative(f"instance {self.instance_id!r}", batch=self.batch, demand=self.demand,
                            weight_bytes=self.weight_bytes, kv_bytes=self.kv_bytes,
                            kv_reserved_bytes=self.kv_reserved_bytes)

    @property
    def memory_bytes(self) -> int:
        """Weights + KV held now."""
        return self.weight_bytes + self.kv_bytes

    @property
    def planned_kv_bytes(self) -> int:
        """KV it holds or is about to hold, whichever is more."""
        return max(self.kv_bytes, self.kv_reserved_bytes)

    @property
    def planned_bytes(self) -> int:
        """Weights + planned KV: what it occupies in the forward-looking count, and frees if evicted."""
        return self.weight_bytes + self.planned_kv_bytes

    def frees(self, resource: Resource) -> float:
        """How much of ``resource`` removing this instance gives back."""
        if resource is Resource.MEMORY:
            return self.planned_bytes
        if resource is Resource.KV:
            return self.planned_kv_bytes
        return self.demand


@dataclass(frozen=True)
class NodeView:
    """One runtime pod on one device: ``memory_bytes`` holds weights + KV, of which KV may use at
    most ``kv_budget_bytes`` (the pod's shared KV budget). ``cached`` names the functions whose
    checkpoints the node's host memory holds (a load from there is several times faster than
    from disk); empty when unknown."""

    node_id: NodeId
    kind: DeviceKind
    memory_bytes: int
    kv_budget_bytes: int
    instances: tuple[InstanceView, ...] = ()
    cached: frozenset[FunctionId] = frozenset()

    def __post_init__(self) -> None:
        _check_non_negative(f"node {self.node_id!r}", memory_bytes=self.memory_bytes,
                            kv_budget_bytes=self.kv_budget_bytes)
        seen: set[InstanceId] = set()
        for inst in self.instances:
            if inst.node_id != self.node_id:
                raise ValueError(f"instance {inst.instance_id!r} says node {inst.node_id!r}, "
                                 f"but is listed on node {self.node_id!r}")
            if inst.instance_id in seen:
                raise ValueError(f"instance {inst.instance_id!r} is listed twice on node {self.node_id!r}")
            seen.add(inst.instance_id)

    @property
    def is_empty(self) -> bool:
        return not self.instances

    @property
    def used_memory_bytes(self) -> int:
        """Weights + KV held now."""
        return sum(i.memory_bytes for i in self.instances)

    @property
    def planned_memory_bytes(self) -> int:
        """Weights + planned KV: the GPU busyness measure."""
        return sum(i.planned_bytes for i in self.instances)

    @property
    def free_memory_bytes(self) -> int:
        return self.memory_bytes - self.planned_memory_bytes

    @property
    def free_kv_bytes(self) -> int:
        return self.kv_budget_bytes - sum(i.planned_kv_bytes for i in self.instances)

    @property
    def demand(self) -> float:
        """Σ decode demand of its instances: the CPU busyness measure (1.0 = device saturated)."""
        return sum(i.demand for i in self.instances)

    def hosts(self, function: FunctionId) -> bool:
        return any(i.function == function for i in self.instances)


@dataclass(frozen=True)
class FunctionView:
    """A deployed function as the autoscaler needs it. ``arrival_rate_per_s`` is how many requests
    per second it received lately (the activator counts them; 0 when unknown): preemption never
    takes an instance from a busier function for a quieter one."""

    function: FunctionId
    device_preference: DevicePreference
    weight_bytes: int
    keep_alive_s: float
    max_instances: int
    arrival_rate_per_s: float = 0.0

    def __post_init__(self) -> None:
        _check_non_negative(f"function {self.function!r}", weight_bytes=self.weight_bytes,
                            keep_alive_s=self.keep_alive_s, arrival_rate_per_s=self.arrival_rate_per_s)
        if self.max_instances < 1:
            raise ValueError(f"function {self.function!r}: max_instances must be >= 1, got {self.max_instances}")

    def allows(self, kind: DeviceKind) -> bool:
        pref = self.device_preference
        return pref is DevicePreference.ANY or pref.value == kind.value


@dataclass(frozen=True)
class ClusterSnapshot:
    """Nodes, their instances and the deployed functions at ``now_s``. Ids are unique."""

    now_s: float
    nodes: tuple[NodeView, ...]
    functions: tuple[FunctionView, ...]
    _nodes: dict[NodeId, NodeView] = field(init=False, repr=False, compare=False)
    _functions: dict[FunctionId, FunctionView] = field(init=False, repr=False, compare=False)
    _instances: dict[InstanceId, InstanceView] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        nodes: dict[NodeId, NodeView] = {}
        instances: dict[InstanceId, InstanceView] = {}
        for node in self.nodes:
            if node.node_id in nodes:
                raise ValueError(f"node {node.node_id!r} is listed twice")
            nodes[node.node_id] = node
            for inst in node.instances:
                if inst.instance_id in instances:
                    raise ValueError(f"instance {inst.instance_id!r} is on nodes "
                                     f"{instances[inst.instance_id].node_id!r} and {node.node_id!r}")
                instances[inst.instance_id] = inst
        functions: dict[FunctionId, FunctionView] = {}
        for fn in self.functions:
            if fn.function in functions:
                raise ValueError(f"function {fn.function!r} is listed twice")
            functions[fn.function] = fn
        object.__setattr__(self, "_nodes", nodes)
        object.__setattr__(self, "_functions", functions)
        object.__setattr__(self, "_instances", instances)

    def node(self, node_id: NodeId) -> NodeView:
        try:
            return self._nodes[node_id]
        except KeyError:
            raise UnknownId("node", node_id, list(self._nodes)) from None

    def function(self, function: FunctionId) -> FunctionView:
        try:
            return self._functions[function]
        except KeyError:
            raise UnknownId("function", function, list(self._functions)) from None

    def find_function(self, function: FunctionId) -> FunctionView | None:
        return self._functions.get(function)

    def busier_than(self, function: FunctionId) -> frozenset[FunctionId]:
        """Functions that received more requests per second lately than ``function`` (an unknown
        function counts as 0)."""
        fn = self._functions.get(function)
        rate = fn.arrival_rate_per_s if fn is not None else 0.0
        return frozenset(f for f, v in self._functions.items() if v.arrival_rate_per_s > rate)

    def instance(self, instance_id: InstanceId) -> InstanceView:
        try:
            return self._instances[instance_id]
        except KeyError:
            raise UnknownId("instance", instance_id, list(self._instances)) from None

    @property
    def instances(self) -> list[InstanceView]:
        """Every instance, ordered by instance id."""
        return [self._instances[i] for i in sorted(self._instances)]

    def instances_of(self, function: FunctionId) -> list[InstanceView]:
        """The function's instances (loading or ready), ordered by instance id."""
        return [i for i in self.instances if i.function == function]

    def with_instance(self, inst: InstanceView) -> ClusterSnapshot:
        """A new snapshot with ``inst`` added to its node."""
        node = self.node(inst.node_id)
        return self._replace_node(replace(node, instances=(*node.instances, inst)))

    def without_instance(self, instance_id: InstanceId) -> ClusterSnapshot:
        """A new snapshot with the instance removed from its node."""
        node = self.node(self.instance(instance_id).node_id)
        kept = tuple(i for i in node.instances if i.instance_id != instance_id)
        return self._replace_node(replace(node, instances=kept))

    def _replace_node(self, new: NodeView) -> ClusterSnapshot:
        nodes = tuple(new if n.node_id == new.node_id else n for n in self.nodes)
        return ClusterSnapshot(self.now_s, nodes, self.functions)
