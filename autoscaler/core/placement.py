"""Where a new instance of a function goes.

Nodes whose host memory already holds the function's checkpoint come first (ServerlessLLM's
locality-aware placement): the load counts in the waiting requests' TTFT, and one from disk takes
several times longer (a 7B checkpoint: ~0.6 s from host memory to a GPU, ~2.7 s from an NVMe
disk, beyond most TTFT SLOs). Inside each of the two tiers, pools are tried in order (CPU then
GPU by default), limited to those the function's device preference allows. Inside a pool the
busiest node comes first, so load piles onto few nodes and the rest stay empty (best-fit
packing): on CPU busyness is Σ decode demand, on GPU the planned memory (weights +
forward-looking KV). Empty nodes come last. ``balance=True`` reverses this (least busy, empty
nodes first) for ablations that spread load instead. A snapshot without cache information
(every ``NodeView.cached`` empty) gives the plain pool order.

A node qualifies when
  - it hosts no instance of the function (one loading is on its way; one ready has just refused
    the demand, and a second copy on the same device would share the same compute and KV budget),
  - its free memory covers the weights + the initial KV reservation, and its KV budget covers the
    reservation,
  - its decode demand plus the demand the newcomer brings stays <= 1.
Ties break by node id, so the choice is deterministic.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from autoscaler.core.preemption import Shortfall
from autoscaler.core.snapshot import (
    ClusterSnapshot,
    DeviceKind,
    FunctionId,
    FunctionView,
    NodeId,
    NodeView,
    Resource,
)

__all__ = ["DEFAULT_POOLS", "PlaceDecision", "allowed_pools", "busyness", "place", "rank_nodes", "shortfalls"]

DEFAULT_POOLS: tuple[DeviceKind, ...] = (DeviceKind.CPU, DeviceKind.GPU)


@dataclass(frozen=True)
class PlaceDecision:
    function: FunctionId
    node_id: NodeId
    kind: DeviceKind


def busyness(node: NodeView) -> float:
    """CPU: Σ decode demand; GPU: planned memory in bytes."""
    return node.demand if node.kind is DeviceKind.CPU else float(node.planned_memory_bytes)


def _packing_key(node: NodeView) -> tuple[bool, float, str]:
    return (node.is_empty, -busyness(node), node.node_id)


def _balance_key(node: NodeView) -> tuple[bool, float, str]:
    return (not node.is_empty, busyness(node), node.node_id)


def allowed_pools(fn: FunctionView, pools: Sequence[DeviceKind]) -> list[DeviceKind]:
    """``pools`` in order, without repeats, keeping those the function's preference allows."""
    out: list[DeviceKind] = []
    for kind in pools:
        if fn.allows(kind) and kind not in out:
            out.append(kind)
    return out


def rank_nodes(snapshot: ClusterSnapshot, function: FunctionId, *,
               pools: Sequence[DeviceKind] = DEFAULT_POOLS, balance: bool = False) -> list[NodeView]:
    """Every node the function may run on, in the order placement tries them (not yet filtered by
    what fits)."""
    fn = snapshot.function(function)
    key = _balance_key if balance else _packing_key
    out: list[NodeView] = []
    for kind in allowed_pools(fn, pools):
        out.extend(sorted((n for n in snapshot.nodes if n.kind is kind), key=key))
    return sorted(out, key=lambda n: function not in n.cached)  # stable: pool order within a tier


def shortfalls(node: NodeView, *, weight_bytes: int, need_bytes: int, need_demand: float) -> list[Shortfall]:
    """What ``node`` lacks for a new instance with these weights, this initial KV reservation and
    this decode demand; empty when it fits. Order: MEMORY, KV, COMPUTE."""
    out: list[Shortfall] = []
    memory_gap = weight_bytes + need_bytes - node.free_memory_bytes
    if memory_gap > 0:
        out.append(Shortfall(Resource.MEMORY, memory_gap))
    kv_gap = need_bytes - node.free_kv_bytes
    if kv_gap > 0:
        out.append(Shortfall(Resource.KV, kv_gap))
    compute_gap = node.demand + need_demand - 1.0
    if compute_gap > 0:
        out.append(Shortfall(Resource.COMPUTE, compute_gap))
    return out


def place(snapshot: ClusterSnapshot, function: FunctionId, *, pools: Sequence[DeviceKind] = DEFAULT_POOLS,
          need_bytes: int = 0, need_demand: float = 0.0, balance: bool = False) -> PlaceDecision | None:
    """The node for a new instance of ``function`` (see the module doc), or None when none fits.

    ``need_bytes`` is the initial KV reservation besides the weights; ``need_demand`` the decode
    demand the waiting requests bring. Raises ``UnknownId`` for a function not in the snapshot.
    """
    fn = snapshot.function(function)
    for node in rank_nodes(snapshot, function, pools=pools, balance=balance):
        if node.hosts(function):
            continue
        if not shortfalls(node, weight_bytes=fn.weight_bytes, need_bytes=need_bytes, need_demand=need_demand):
            return PlaceDecision(function, node.node_id, node.kind)
    return None
