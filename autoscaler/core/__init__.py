"""Pure autoscaler policy: cluster snapshot in, actions out.

    snapshot    ClusterSnapshot / NodeView / InstanceView / FunctionView (frozen, typed ids)
    placement   place(): CPU pool first, busiest node first, empty nodes last (best fit)
    routing     route_order(): a function's ready instances, largest batch first;
                round_robin_order(): in turn (the exclusive baseline's rule)
    preemption  choose_victim() / plan_preemption(): smallest co-located instance covering a gap
    keepalive   expired(): idle instances past their function's keep-alive
    rates       ArrivalRates: requests per second per function over a sliding window
    actions     Load / Unload / Evict / Plan, the values an adapter executes
    plan        decide(): one round (unload expired, place or preempt-and-place waiting demand)

No asyncio, httpx, torch or kubernetes imports, no clock or environment reads: ``now`` lives in
the snapshot, so the simulator and the live control plane run this same code.
"""

from autoscaler.core.actions import Action, Evict, Load, Plan, Unload
from autoscaler.core.keepalive import expired
from autoscaler.core.placement import DEFAULT_POOLS, PlaceDecision, busyness, place, rank_nodes, shortfalls
from autoscaler.core.plan import PendingDemand, decide, merge_pending
from autoscaler.core.preemption import Shortfall, choose_victim, pick_victim, plan_preemption
from autoscaler.core.rates import DEFAULT_RATE_WINDOW_S, ArrivalRates
from autoscaler.core.routing import round_robin_order, route_order
from autoscaler.core.snapshot import (
    ClusterSnapshot,
    DeviceKind,
    FunctionId,
    FunctionView,
    InstanceId,
    InstanceView,
    NodeId,
    NodeView,
    Resource,
    UnknownId,
)

__all__ = [
    "DEFAULT_POOLS",
    "DEFAULT_RATE_WINDOW_S",
    "Action",
    "ArrivalRates",
    "ClusterSnapshot",
    "DeviceKind",
    "Evict",
    "FunctionId",
    "FunctionView",
    "InstanceId",
    "InstanceView",
    "Load",
    "NodeId",
    "NodeView",
    "PendingDemand",
    "PlaceDecision",
    "Plan",
    "Resource",
    "Shortfall",
    "Unload",
    "UnknownId",
    "busyness",
    "choose_victim",
    "decide",
    "expired",
    "merge_pending",
    "pick_victim",
    "place",
    "plan_preemption",
    "rank_nodes",
    "round_robin_order",
    "route_order",
    "shortfalls",
]
