"""autoscaler.core: snapshot measures, placement order, routing, victim choice, keep-alive, plans."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

from autoscaler.core import (
    ArrivalRates,
    ClusterSnapshot,
    DeviceKind,
    Evict,
    FunctionId,
    FunctionView,
    InstanceId,
    InstanceView,
    Load,
    NodeId,
    NodeView,
    PendingDemand,
    Plan,
    Resource,
    Shortfall,
    UnknownId,
    Unload,
    choose_victim,
    decide,
    expired,
    place,
    plan_preemption,
    round_robin_order,
    route_order,
)
from functions import DevicePreference

CPU, GPU = DeviceKind.CPU, DeviceKind.GPU
GB = 1 << 30
NOW = 100.0


def make_instance(iid: str, function: str = "g", *, batch: int = 0, demand: float = 0.0, weight: int = GB,
                  kv: int = 0, kv_reserved: int = 0, idle_since: float | None = None,
                  loading: bool = False) -> InstanceView:
    """An instance; its node is set by make_node."""
    return InstanceView(InstanceId(iid), FunctionId(function), NodeId("?"), batch, demand, weight, kv, kv_reserved,
                        idle_since, loading)


def make_node(node_id: str, *instances: InstanceView, kind: DeviceKind = CPU, memory: int = 16 * GB,
              kv_budget: int = 8 * GB, cached: tuple[str, ...] = ()) -> NodeView:
    nid = NodeId(node_id)
    return NodeView(nid, kind, memory, kv_budget, tuple(replace(i, node_id=nid) for i in instances),
                    frozenset(FunctionId(c) for c in cached))


def make_function(name: str = "f", *, device: DevicePreference = DevicePreference.ANY, weight: int = GB,
                  keep_alive: float = 60.0, max_instances: int = 4, rate: float = 0.0) -> FunctionView:
    return FunctionView(FunctionId(name), device, weight, keep_alive, max_instances, rate)


def make_snapshot(*nodes: NodeView, functions: tuple[FunctionView, ...] = (), now: float = NOW) -> ClusterSnapshot:
    """Functions given explicitly, plus a default view for "f" and for any function an instance runs."""
    fns = {fn.function: fn for fn in functions}
    for name in ["f", *(i.function for n in nodes for i in n.instances)]:
        fns.setdefault(FunctionId(name), make_function(name))
    return ClusterSnapshot(now, tuple(nodes), tuple(fns.values()))


F = FunctionId("f")


# -- snapshot ------------------------------------------------------------------------------------

def test_node_measures_count_weights_kv_and_reservations():
    node = make_node("n", make_instance("a", weight=2 * GB, kv=GB, kv_reserved=3 * GB, demand=0.25),
                     make_instance("b", weight=GB, kv=2 * GB, kv_reserved=GB, demand=0.5))
    assert node.used_memory_bytes == 2 * GB + GB + GB + 2 * GB
    assert node.planned_memory_bytes == (2 * GB + 3 * GB) + (GB + 2 * GB)
    assert node.free_memory_bytes == 16 * GB - 8 * GB
    assert node.free_kv_bytes == 8 * GB - 5 * GB
    assert node.demand == pytest.approx(0.75)
    assert not node.is_empty and make_node("m").is_empty


def test_snapshot_lookups_and_copies():
    snap = make_snapshot(make_node("n1", make_instance("a", "f")), make_node("n2"))
    assert snap.instance(InstanceId("a")).node_id == "n1"
    assert [i.instance_id for i in snap.instances_of(F)] == ["a"]
    added = snap.with_instance(replace(make_instance("b"), node_id=NodeId("n2")))
    assert [i.instance_id for i in added.node(NodeId("n2")).instances] == ["b"]
    assert snap.node(NodeId("n2")).is_empty  # the original is untouched
    assert added.without_instance(InstanceId("a")).node(NodeId("n1")).is_empty
    with pytest.raises(UnknownId, match=r"node 'zz' not in the snapshot; known: n1, n2"):
        snap.node(NodeId("zz"))


@pytest.mark.parametrize("build, message", [
    (lambda: make_snapshot(make_node("n"), make_node("n")), "node 'n' is listed twice"),
    (lambda: make_snapshot(make_node("n1", make_instance("a")), make_node("n2", make_instance("a"))),
     "instance 'a' is on nodes 'n1' and 'n2'"),
    (lambda: NodeView(NodeId("n"), CPU, GB, GB, (make_instance("a"),)), "says node '\\?'"),
    (lambda: make_instance("a", batch=-1), "batch must be >= 0"),
    (lambda: make_function(max_instances=0), "max_instances must be >= 1"),
])
def test_snapshot_rejects_inconsistent_input(build, message):
    with pytest.raises(ValueError, match=message):
        build()


# -- placement -----------------------------------------------------------------------------------

PLACEMENT = [
    # (case, nodes, function view, place() keywords, expected node or None)
    ("cpu pool before gpu", [make_node("g1", kind=GPU), make_node("c1")], make_function(), {}, "c1"),
    ("busiest cpu node by demand",
     [make_node("c1", make_instance("a", demand=0.2)), make_node("c2", make_instance("b", demand=0.6)),
      make_node("c3")], make_function(), {}, "c2"),
    ("empty node last even with the smaller id",
     [make_node("c1"), make_node("c2", make_instance("a", demand=0.0))], make_function(), {}, "c2"),
    ("busiest gpu node by planned memory",
     [make_node("g1", make_instance("a", weight=2 * GB), kind=GPU),
      make_node("g2", make_instance("b", weight=5 * GB), kind=GPU)],
     make_function(device=DevicePreference.GPU), {}, "g2"),
    ("planned memory counts reservations, not only KV held",
     [make_node("g1", make_instance("a", kv=3 * GB), kind=GPU),
      make_node("g2", make_instance("b", kv=0, kv_reserved=4 * GB), kind=GPU)],
     make_function(device=DevicePreference.GPU), {}, "g2"),
    ("cpu preference never goes to gpu",
     [make_node("c1", memory=GB // 2), make_node("g1", kind=GPU)],
     make_function(device=DevicePreference.CPU), {}, None),
    ("gpu preference skips an empty cpu node",
     [make_node("c1"), make_node("g1", kind=GPU)], make_function(device=DevicePreference.GPU), {}, "g1"),
    ("cpu full: spill to gpu",
     [make_node("c1", make_instance("a", demand=0.9)), make_node("g1", kind=GPU)], make_function(),
     {"need_demand": 0.2}, "g1"),
    ("skips a node without memory for weights + kv",
     [make_node("c1", make_instance("a", demand=0.1)),
      make_node("c2", make_instance("b", demand=0.9, weight=14 * GB))],
     make_function(weight=GB), {"need_bytes": GB + 1}, "c1"),
    ("weights + kv exactly fill the node",
     [make_node("c1", make_instance("a", demand=0.9, weight=14 * GB))],
     make_function(weight=GB), {"need_bytes": GB}, "c1"),
    ("skips a node whose kv budget is short",
     [make_node("c1", make_instance("a", demand=0.1)),
      make_node("c2", make_instance("b", demand=0.9, kv=7 * GB), memory=64 * GB)],
     make_function(), {"need_bytes": 2 * GB}, "c1"),
    ("skips a node whose compute is short",
     [make_node("c1", make_instance("a", demand=0.1)), make_node("c2", make_instance("b", demand=0.9))],
     make_function(), {"need_demand": 0.2}, "c1"),
    ("skips a node where the function is already loading",
     [make_node("c1", make_instance("a", demand=0.1)),
      make_node("c2", make_instance("b", demand=0.6), make_instance("f1", "f", loading=True))],
     make_function(), {}, "c1"),
    ("ties break by node id",
     [make_node("c2", make_instance("b", demand=0.5)), make_node("c1", make_instance("a", demand=0.5))],
     make_function(), {}, "c1"),
    ("pools in the order given", [make_node("c1"), make_node("g1", kind=GPU)], make_function(),
     {"pools": (GPU, CPU)}, "g1"),
    ("balance: least busy first",
     [make_node("c1", make_instance("a", demand=0.2)), make_node("c2", make_instance("b", demand=0.6))],
     make_function(), {"balance": True}, "c1"),
    ("balance: empty node first",
     [make_node("c1", make_instance("a", demand=0.0)), make_node("c2")], make_function(),
     {"balance": True}, "c2"),
    ("nothing fits", [make_node("c1", memory=GB - 1), make_node("g1", kind=GPU, memory=GB - 1)],
     make_function(), {}, None),
    # host caches: a node that holds the checkpoint loads it several times faster than disk
    ("a cached node before a busier uncached one",
     [make_node("c1", make_instance("a", demand=0.6)), make_node("c2", make_instance("b", demand=0.2), cached=("f",))],
     make_function(), {}, "c2"),
    ("a cached gpu before an uncached cpu", [make_node("c1"), make_node("g1", kind=GPU, cached=("f",))],
     make_function(), {}, "g1"),
    ("an empty cached node before a busy uncached one",
     [make_node("c1", make_instance("a", demand=0.5)), make_node("c2", cached=("f",))], make_function(), {}, "c2"),
    ("inside the cached tier: pools, then busiest first",
     [make_node("g1", kind=GPU, cached=("f",)), make_node("c1", make_instance("a", demand=0.2), cached=("f",)),
      make_node("c2", make_instance("b", demand=0.6), cached=("f",)), make_node("c3", make_instance("c", demand=0.9))],
     make_function(), {}, "c2"),
    ("another function's checkpoint does not count",
     [make_node("c1", make_instance("a", demand=0.6)), make_node("c2", make_instance("b", demand=0.2), cached=("g",))],
     make_function(), {}, "c1"),
    ("a cached node that does not fit is skipped",
     [make_node("c1", make_instance("a", demand=0.2)), make_node("c2", memory=GB - 1, cached=("f",))],
     make_function(), {}, "c1"),
]


@pytest.mark.parametrize("nodes, fn, kwargs, expected", [row[1:] for row in PLACEMENT],
                         ids=[row[0] for row in PLACEMENT])
def test_place(nodes, fn, kwargs, expected):
    decision = place(make_snapshot(*nodes, functions=(fn,)), F, **kwargs)
    assert (decision.node_id if decision else None) == expected
    if decision:
        assert decision.function == F
        assert decision.kind is make_snapshot(*nodes).node(decision.node_id).kind


def test_place_is_independent_of_node_order():
    nodes = [make_node(f"c{k}", make_instance(f"i{k}", demand=0.3)) for k in range(6)]
    for seed in range(5):
        random.Random(seed).shuffle(nodes)
        assert place(make_snapshot(*nodes), F).node_id == "c0"


def test_place_names_an_unknown_function():
    with pytest.raises(UnknownId, match="function 'nope' not in the snapshot; known: f"):
        place(make_snapshot(make_node("c1")), FunctionId("nope"))


# -- routing -------------------------------------------------------------------------------------

@pytest.mark.parametrize("instances, expected", [
    ([("a", 1), ("b", 5), ("c", 3)], ["b", "c", "a"]),
    ([("b", 2), ("a", 2), ("c", 0)], ["a", "b", "c"]),
])
def test_route_order_largest_batch_first(instances, expected):
    node = make_node("n", *(make_instance(i, "f", batch=b) for i, b in instances),
                     make_instance("other", "g", batch=9), make_instance("new", "f", batch=0, loading=True))
    assert [i.instance_id for i in route_order(make_snapshot(node), F)] == expected


ROUTES = [
    # (case, instances as (id, node kind, batch), device_order, expected)
    ("by batch only without a device order", [("c", CPU, 5), ("g", GPU, 1)], (), ["c", "g"]),
    ("gpu first, even with the smaller batch", [("c", CPU, 5), ("g", GPU, 1)], (GPU, CPU), ["g", "c"]),
    ("largest batch first within a kind", [("c1", CPU, 1), ("c2", CPU, 4), ("g1", GPU, 2), ("g2", GPU, 7)],
     (GPU, CPU), ["g2", "g1", "c2", "c1"]),
    ("kinds not listed come last", [("c", CPU, 5), ("g", GPU, 1)], (GPU,), ["g", "c"]),
    ("the order given is the order used", [("c", CPU, 1), ("g", GPU, 5)], (CPU, GPU), ["c", "g"]),
]


@pytest.mark.parametrize("instances, device_order, expected", [r[1:] for r in ROUTES], ids=[r[0] for r in ROUTES])
def test_route_order_by_device_kind(instances, device_order, expected):
    nodes = [make_node(f"n-{iid}", make_instance(iid, "f", batch=b), kind=kind) for iid, kind, b in instances]
    got = route_order(make_snapshot(*nodes), F, device_order=device_order)
    assert [i.instance_id for i in got] == expected


ROUND_ROBIN = [
    # (case, last instance that took a request, expected order)
    ("none yet: by id", None, ["a", "b", "c"]),
    ("after a", "a", ["b", "c", "a"]),
    ("after b", "b", ["c", "a", "b"]),
    ("after the last: wraps", "c", ["a", "b", "c"]),
    ("the last one is gone: after where it was", "bb", ["c", "a", "b"]),
]


@pytest.mark.parametrize("last, expected", [r[1:] for r in ROUND_ROBIN], ids=[r[0] for r in ROUND_ROBIN])
def test_round_robin_order_starts_after_the_last(last, expected):
    # batches and nodes play no part; loading instances and other functions' are skipped
    snap = make_snapshot(make_node("n1", make_instance("c", "f", batch=9), make_instance("x", "g", batch=1)),
                         make_node("n2", make_instance("b", "f", batch=0), make_instance("a", "f", batch=3),
                                   make_instance("d", "f", loading=True), kind=GPU))
    assert [i.instance_id for i in round_robin_order(snap, F, last)] == expected


def test_route_order_spans_nodes():
    snap = make_snapshot(make_node("n1", make_instance("a", "f", batch=1)), make_node("n2", make_instance("b", "f", batch=4)))
    assert [i.instance_id for i in route_order(snap, F)] == ["b", "a"]


# -- preemption ----------------------------------------------------------------------------------

VICTIM_NODE = make_node(
    "n",
    make_instance("t", "f", batch=4, weight=20 * GB),  # the target
    make_instance("a", batch=1, weight=GB, kv=GB, demand=0.1),  # planned 2 GB
    make_instance("b", batch=1, weight=GB, demand=0.3),  # planned 1 GB
    make_instance("c", batch=2, weight=4 * GB, kv=4 * GB, demand=0.5),  # planned 8 GB
    make_instance("e", batch=4, weight=10 * GB, demand=0.05),  # same batch as the target
    make_instance("d", batch=5, weight=30 * GB, demand=0.9),  # larger batch: never a victim
    make_instance("l", batch=0, weight=50 * GB, loading=True),  # loading: never a victim
    memory=200 * GB,
)

VICTIMS = [
    ("memory: smallest batch, then least memory that covers", Resource.MEMORY, 1.5 * GB, "a"),
    ("memory: the smallest batch-1 instance covers", Resource.MEMORY, GB, "b"),
    ("memory: needs a batch-2 instance", Resource.MEMORY, 5 * GB, "c"),
    ("memory: an equal batch may go", Resource.MEMORY, 9 * GB, "e"),
    ("memory: only larger, loading or the target would cover", Resource.MEMORY, 15 * GB, None),
    ("compute: the batch-1 one with more demand", Resource.COMPUTE, 0.2, "b"),
    ("compute: needs the batch-2 one", Resource.COMPUTE, 0.4, "c"),
    ("compute: nothing allowed covers", Resource.COMPUTE, 0.6, None),
    ("kv: only kv counts, not weights", Resource.KV, 2 * GB, "c"),
]


@pytest.mark.parametrize("kind, amount, expected", [r[1:] for r in VICTIMS], ids=[r[0] for r in VICTIMS])
def test_choose_victim(kind, amount, expected):
    snap = make_snapshot(VICTIM_NODE)
    victim = choose_victim(snap, NodeId("n"), snap.instance(InstanceId("t")), Shortfall(kind, amount))
    assert (victim.instance_id if victim else None) == expected


def test_choose_victim_never_picks_the_target():
    snap = make_snapshot(make_node("n", make_instance("t", "f", batch=1, weight=9 * GB), make_instance("a", batch=1)))
    target = snap.instance(InstanceId("t"))
    assert choose_victim(snap, NodeId("n"), target, Shortfall(Resource.MEMORY, 2 * GB)) is None
    assert choose_victim(snap, NodeId("n"), target, Shortfall(Resource.MEMORY, GB)).instance_id == "a"


def test_choose_victim_ties_break_by_id():
    snap = make_snapshot(make_node("n", make_instance("t", "f", batch=3), make_instance("y", batch=1),
                                   make_instance("x", batch=1)))
    victim = choose_victim(snap, NodeId("n"), snap.instance(InstanceId("t")), Shortfall(Resource.MEMORY, GB))
    assert victim.instance_id == "x"


def test_choose_victim_prefers_the_smaller_batch_over_the_smaller_footprint():
    snap = make_snapshot(make_node("n", make_instance("t", "f", batch=3), make_instance("idle", batch=0, weight=3 * GB),
                                   make_instance("busy", batch=2, weight=GB)))
    victim = choose_victim(snap, NodeId("n"), snap.instance(InstanceId("t")), Shortfall(Resource.MEMORY, GB))
    assert victim.instance_id == "idle"


def test_choose_victim_spares_the_instances_of_busier_functions():
    # "small" would be the victim (batch 1 < the target's 3), but its function gets 2 requests/s
    # against the target's 0.1: it is spared, and the idle-but-larger "quiet" goes instead.
    node = make_node("n", make_instance("t", "f", batch=3), make_instance("small", "busy", batch=1),
                     make_instance("quiet", "rare", batch=2, weight=2 * GB))
    rates = {"f": 0.1, "busy": 2.0, "rare": 0.1}
    snap = make_snapshot(node, functions=tuple(make_function(f, rate=r) for f, r in rates.items()))
    target = snap.instance(InstanceId("t"))
    assert snap.busier_than(F) == {"busy"}
    assert choose_victim(snap, NodeId("n"), target, Shortfall(Resource.MEMORY, GB)).instance_id == "quiet"
    assert choose_victim(snap, NodeId("n"), target, Shortfall(Resource.MEMORY, 3 * GB)) is None
    # Equal rates (or none known, all 0) leave the paper's rule as it was.
    flat = make_snapshot(node)
    assert choose_victim(flat, NodeId("n"), flat.instance(InstanceId("t")), Shortfall(Resource.MEMORY, GB)).instance_id == "small"


def test_busier_than_an_unknown_function_counts_it_as_zero():
    snap = make_snapshot(make_node("n"), functions=(make_function("a", rate=0.5), make_function("b")))
    assert snap.busier_than(FunctionId("nope")) == {"a"}
    assert snap.busier_than(FunctionId("a")) == frozenset()


def test_arrival_rates_count_a_sliding_window():
    rates = ArrivalRates(window_s=10.0)
    rates.record(F, 0.0, 4)
    rates.record(F, 5.0)
    rates.record(FunctionId("g"), 9.0, 0)  # nothing served: no entry
    assert rates.rates(9.0) == {F: 0.5}
    assert rates.rates(10.0) == {F: 0.1}  # the 4 at t = 0 left the window (now - 10, now]
    assert rates.rates(15.0) == {}
    with pytest.raises(ValueError, match="window"):
        ArrivalRates(0.0)
    with pytest.raises(ValueError, match=">= 0"):
        rates.record(F, 1.0, -1)
    with pytest.raises(ValueError, match="arrival_rate_per_s"):
        make_function(rate=-1.0)


def test_plan_preemption_is_an_evict_or_nothing():
    snap = make_snapshot(VICTIM_NODE)
    target = snap.instance(InstanceId("t"))
    assert plan_preemption(snap, NodeId("n"), target, Shortfall(Resource.COMPUTE, 0.2)) == [
        Evict(InstanceId("b"), NodeId("n"), Resource.COMPUTE)]
    assert plan_preemption(snap, NodeId("n"), target, Shortfall(Resource.COMPUTE, 0.6)) == []


# -- keep-alive ----------------------------------------------------------------------------------

KEEPALIVE = [
    # (case, keep_alive_s, idle_since_s, loading, expires)
    ("idle exactly keep-alive", 10.0, NOW - 10.0, False, True),
    ("idle longer than keep-alive", 10.0, NOW - 30.0, False, True),
    ("idle less than keep-alive", 10.0, NOW - 9.5, False, False),
    ("keep-alive 0: unloaded as soon as idle", 0.0, NOW, False, True),
    ("busy instance never expires", 0.0, None, False, False),
    ("loading instance never expires", 0.0, NOW - 100.0, True, False),
]


@pytest.mark.parametrize("keep_alive, idle_since, loading, expires", [r[1:] for r in KEEPALIVE],
                         ids=[r[0] for r in KEEPALIVE])
def test_keep_alive(keep_alive, idle_since, loading, expires):
    node = make_node("n", make_instance("a", "f", idle_since=idle_since, loading=loading))
    snap = make_snapshot(node, functions=(make_function(keep_alive=keep_alive),))
    assert [i.instance_id for i in expired(snap)] == (["a"] if expires else [])


HOLD = [
    # (case, node kind, hold, expires): the instance has been idle 30 s, keep-alive 10 s
    ("gpu instance expires when only cpu is held", GPU, (CPU,), True),
    ("cpu instance is held", CPU, (CPU,), False),
    ("nothing held: cpu expires", CPU, (), True),
]


@pytest.mark.parametrize("kind, hold, expires", [r[1:] for r in HOLD], ids=[r[0] for r in HOLD])
def test_keep_alive_hold(kind, hold, expires):
    node = make_node("n", make_instance("a", "f", idle_since=NOW - 30.0), kind=kind)
    snap = make_snapshot(node, functions=(make_function(keep_alive=10.0),))
    assert [i.instance_id for i in expired(snap, hold=hold)] == (["a"] if expires else [])


def test_keep_alive_order_and_undeployed_functions():
    node = make_node("n", make_instance("b", "f", idle_since=NOW - 50), make_instance("a", "f", idle_since=NOW - 50),
                     make_instance("c", "f", idle_since=NOW - 80), make_instance("fresh", "f", idle_since=NOW - 1),
                     make_instance("gone", "deleted", idle_since=NOW))
    snap = ClusterSnapshot(NOW, (node,), (make_function(keep_alive=40.0),))  # "deleted" is not deployed
    assert [i.instance_id for i in expired(snap)] == ["c", "a", "b", "gone"]


# -- plans ---------------------------------------------------------------------------------------

def L(function: str, node: str) -> Load:
    return Load(FunctionId(function), NodeId(node))


def U(iid: str, node: str) -> Unload:
    return Unload(InstanceId(iid), NodeId(node), drain=True)


def E(iid: str, node: str, reason: Resource = Resource.MEMORY) -> Evict:
    return Evict(InstanceId(iid), NodeId(node), reason)


def pend(function: str = "f", requests: int = 1, kv: int = 0, demand: float = 0.0) -> PendingDemand:
    return PendingDemand(FunctionId(function), requests, kv, demand)


FULL = 2 * GB  # node memory that a 2 GB instance fills; "f" needs 1 GB

PLANS = [
    # (case, nodes, functions, pending, decide() keywords, expected actions, expected waiting)
    ("place on a miss", [make_node("c1")], (), [pend()], {}, [L("f", "c1")], []),
    ("no demand, nothing to do", [make_node("c1", make_instance("a", "f", batch=2))], (), [], {}, [], []),
    ("an instance already loading takes the demand",
     [make_node("c1", make_instance("a", "f", loading=True)), make_node("c2")], (), [pend()], {}, [], []),
    ("evict a smaller idle instance when only preemption makes room",
     [make_node("c1", make_instance("small", batch=0, weight=2 * GB), memory=FULL)], (), [pend()], {},
     [E("small", "c1"), L("f", "c1")], []),
    ("evict for compute",
     [make_node("c1", make_instance("a", batch=1, demand=0.5), make_instance("b", batch=3, demand=0.45))],
     (), [pend(requests=2, demand=0.2)], {}, [E("a", "c1", Resource.COMPUTE), L("f", "c1")], []),
    ("never evict a larger batch",
     [make_node("c1", make_instance("big", batch=3, weight=2 * GB), memory=FULL)], (), [pend(requests=2)], {},
     [], ["f"]),
    ("the victim's batch must be below the waiting requests (equal ones would evict each other in turn)",
     [make_node("c1", make_instance("big", batch=3, weight=2 * GB), memory=FULL)], (), [pend(requests=3)], {},
     [], ["f"]),
    ("a victim one request smaller goes",
     [make_node("c1", make_instance("big", batch=3, weight=2 * GB), memory=FULL)], (), [pend(requests=4)], {},
     [E("big", "c1"), L("f", "c1")], []),
    ("preemption off: wait", [make_node("c1", make_instance("small", weight=2 * GB), memory=FULL)], (), [pend()],
     {"preempt": False}, [], ["f"]),
    ("place without evicting when some node fits",
     [make_node("c1", make_instance("small", weight=2 * GB, demand=0.5), memory=FULL), make_node("c2")],
     (), [pend()], {}, [L("f", "c2")], []),
    ("unload expired; its memory serves a placement in the same round",
     [make_node("c1", make_instance("old", "g", idle_since=0.0, weight=2 * GB), memory=FULL)],
     (make_function("g", keep_alive=30.0),), [pend()], {}, [U("old", "c1"), L("f", "c1")], []),
    ("an expired instance of a waiting function stays",
     [make_node("c1", make_instance("old", "f", idle_since=0.0)), make_node("c2")],
     (make_function(keep_alive=30.0),), [pend()], {}, [L("f", "c2")], []),
    ("max_instances respected",
     [make_node("c1", make_instance("a", "f", batch=5)), make_node("c2", make_instance("b", "f", batch=5)),
      make_node("c3")], (make_function(max_instances=2),), [pend()], {}, [], ["f"]),
    ("two functions never count on the same memory",
     [make_node("c1", memory=GB + GB // 2)], (make_function("h"),), [pend("f", 2), pend("h", 1)], {},
     [L("f", "c1")], ["h"]),
    ("most waiting requests go first, then function id",
     [make_node("c1", memory=GB)], (make_function("a"), make_function("b")), [pend("a"), pend("b", 3)], {},
     [L("b", "c1")], ["a"]),
    ("never evict an instance of a busier function for a quieter one",
     [make_node("c1", make_instance("b1", "busy", weight=2 * GB), memory=FULL)],
     (make_function("busy", rate=1.0), make_function(rate=0.2)), [pend("f", 5)], {}, [], ["f"]),
    ("a quieter function's instance is a victim for a busier one",
     [make_node("c1", make_instance("q1", "quiet", weight=2 * GB), memory=FULL)],
     (make_function("quiet", rate=0.2), make_function(rate=1.0)), [pend("f", 5)], {},
     [E("q1", "c1"), L("f", "c1")], []),
    ("never evict an instance of a waiting function",
     [make_node("c1", make_instance("h1", "h", weight=2 * GB, loading=False), memory=FULL)],
     (make_function("h"),), [pend("f", 5), pend("h", 1)], {}, [], ["f", "h"]),
    ("pending for the same function is merged",
     [make_node("c1", make_instance("a", batch=2, weight=2 * GB), memory=FULL)], (),
     [pend(requests=2), pend(requests=1)], {}, [E("a", "c1"), L("f", "c1")], []),
    ("an unknown function waits", [make_node("c1")], (), [pend("nope")], {}, [], ["nope"]),
    ("a held idle cpu instance is not unloaded",
     [make_node("c1", make_instance("old", "g", idle_since=0.0))], (make_function("g", keep_alive=30.0),), [],
     {"hold_idle": (CPU,)}, [], []),
    ("a held idle cpu instance is the victim when a placement needs its memory",
     [make_node("c1", make_instance("old", "g", idle_since=0.0, weight=2 * GB), memory=FULL)],
     (make_function("g", keep_alive=30.0),), [pend()], {"hold_idle": (CPU,)}, [E("old", "c1"), L("f", "c1")], []),
    ("holding cpu does not hold gpu",
     [make_node("g1", make_instance("old", "g", idle_since=0.0), kind=GPU)], (make_function("g", keep_alive=30.0),),
     [], {"hold_idle": (CPU,)}, [U("old", "g1")], []),
    ("a function already on a cpu escalates: its next instance goes to a gpu first",
     [make_node("c1", make_instance("a", "f", batch=3, demand=0.6)), make_node("c2"), make_node("g1", kind=GPU)],
     (), [pend()], {}, [L("f", "g1")], []),
    ("escalation only reorders: with no gpu room the cpu still takes it",
     [make_node("c1", make_instance("a", "f", batch=3, demand=0.6)), make_node("c2"),
      make_node("g1", kind=GPU, memory=GB // 2)], (), [pend()], {}, [L("f", "c2")], []),
    ("a function on a gpu keeps the cpu-first order",
     [make_node("g1", make_instance("a", "f", batch=3), kind=GPU), make_node("c1"), make_node("g2", kind=GPU)],
     (), [pend()], {}, [L("f", "c1")], []),
    ("balance switch spreads",
     [make_node("c1", make_instance("a", demand=0.5)), make_node("c2")], (), [pend()], {"balance": True},
     [L("f", "c2")], []),
]


@pytest.mark.parametrize("nodes, functions, pending, kwargs, actions, waiting", [r[1:] for r in PLANS],
                         ids=[r[0] for r in PLANS])
def test_decide(nodes, functions, pending, kwargs, actions, waiting):
    plan = decide(make_snapshot(*nodes, functions=functions), pending, **kwargs)
    assert plan == Plan(tuple(actions), tuple(FunctionId(w) for w in waiting))


def test_decide_evicts_on_the_first_node_in_placement_order():
    # c2 is busier (by demand), so it is tried first for both placement and preemption.
    nodes = [make_node("c1", make_instance("x", weight=2 * GB, demand=0.1), memory=FULL),
             make_node("c2", make_instance("y", weight=2 * GB, demand=0.2), memory=FULL)]
    assert decide(make_snapshot(*nodes), [pend()]).actions == (E("y", "c2"), L("f", "c2"))


def _shuffled(snap: ClusterSnapshot, pending: list[PendingDemand], seed: int) -> tuple[ClusterSnapshot, list]:
    rng = random.Random(seed)
    nodes = []
    for n in snap.nodes:
        insts = list(n.instances)
        rng.shuffle(insts)
        nodes.append(replace(n, instances=tuple(insts)))
    fns, pend_copy = list(snap.functions), list(pending)
    for seq in (nodes, fns, pend_copy):
        rng.shuffle(seq)
    return ClusterSnapshot(snap.now_s, tuple(nodes), tuple(fns)), pend_copy


def test_decide_is_deterministic_under_shuffled_input():
    fns = (make_function("f"), make_function("g", keep_alive=5.0), make_function("h"), make_function("k"),
           make_function("m", device=DevicePreference.GPU, weight=8 * GB))
    snap = make_snapshot(
        make_node("c1", make_instance("g1", "g", idle_since=NOW - 10), make_instance("g2", "g", idle_since=NOW - 10),
                  make_instance("k1", "k", batch=1, weight=10 * GB), memory=14 * GB),
        make_node("c2", make_instance("h1", "h", batch=4, demand=0.8)),
        make_node("c3", make_instance("k2", "k", batch=0, weight=13 * GB), memory=14 * GB),
        make_node("g1", make_instance("k3", "k", weight=14 * GB), kind=GPU, memory=20 * GB),
        make_node("g2", make_instance("x", "h", batch=2, weight=4 * GB), kind=GPU, memory=10 * GB),
        functions=fns,
    )
    pending = [pend("f", 2, kv=GB), pend("m", 1, kv=GB), pend("h", 1, demand=0.1), pend("f", 1)]
    baseline = decide(snap, pending)
    kinds = {type(a) for a in baseline.actions}
    assert kinds == {Load, Unload, Evict}, baseline  # the scenario exercises every kind of action
    for seed in range(8):
        assert decide(*_shuffled(snap, pending, seed)) == baseline
