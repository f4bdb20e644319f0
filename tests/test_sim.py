"""autoscaler.sim: clock and event order, loads in TTFT, preemption by recompute, baseline
constraints, scoring, capacity, and proof that the simulator runs runtime/core's own functions."""

from __future__ import annotations

import itertools
import math
from dataclasses import replace
from typing import Any

import pytest

import autoscaler.sim.node as sim_node
import runtime.core.admission as core_admission
import runtime.core.arbiter as core_arbiter
import runtime.core.memory as core_memory
from autoscaler.core.snapshot import FunctionId, InstanceId, NodeId
from autoscaler.sim.clock import EventKind, EventQueue, PastEventError
from autoscaler.sim.config import ClusterSpec, ModelSpec, model_from_published, system_config
from autoscaler.sim.loading import HostCache, LoadModel, LoadSource
from autoscaler.sim.node import SimInstance, SimNode, SimRequest
from autoscaler.sim.scoring import MissCause, meets_slo, miss_cause, rank_bands, score, ttft_s
from autoscaler.sim.simulator import RequestRecord, RunResult, Simulator, simulate
from autoscaler.sim.sweep import capacity, capacity_any
from autoscaler.sim.trace import Arrival, Trace, synthetic_trace
from runtime.core.arbiter import DeviceKind, Phase

GIB = 1 << 30


def toy_published(weights_gb: float = 10.0) -> dict[str, Any]:
    """A profile in the published format: GPU prefill 10 ms + 0.1 ms/token, decode 10-20 ms;
    CPU 5x slower. Caps 8 (exclusive) and 4 (2-way shared)."""
    def dev(kind: str, f: float) -> dict[str, Any]:
        return {"device": kind, "prefill": [[1, 10 * f], [1000, 110 * f]],
                "decode": [[100, [[1, 10 * f], [64, 20 * f]]], [4000, [[1, 10 * f], [64, 20 * f]]]],
                "sllm_concurrency": 8, "sllm_share_concurrency": {"2": 4}}
    return {"about": "toy", "models": {"toy": {
        "weights_gb": weights_gb, "kv_kb_per_token": 100, "kv_block_tokens": {"cpu": 32, "gpu": 16},
        "profiles": {"gpu": dev("gpu", 1.0), "cpu": dev("cpu", 5.0)}}}}


def make_model(weights_gb: float = 10.0) -> ModelSpec:
    return model_from_published(toy_published(weights_gb), "toy")


def make_trace(*arrivals: tuple[float, str, int, int], duration: float = 60.0) -> Trace:
    arr = sorted((Arrival(t, f, p, o) for t, f, p, o in arrivals), key=lambda a: (a.time_s, a.function))
    return Trace(tuple(sorted({a.function for a in arr})), tuple(arr), duration, "test")


def gpu_cluster(gpus: int = 1, cpus: int = 0, gpu_memory: int = 60 * GIB) -> ClusterSpec:
    return ClusterSpec(cpus=cpus, gpus=gpus, gpu_memory_bytes=gpu_memory)


# -- clock ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("pushes, expected", [
    ([(2.0, "a"), (1.0, "b"), (3.0, "c")], ["b", "a", "c"]),
    ([(1.0, "a"), (1.0, "b"), (1.0, "c")], ["a", "b", "c"]),  # ties: in push order
    ([(1.0, "step"), (1.0, "a")], ["step", "a"]),  # across the two heaps too
    ([(1.0, "a"), (1.0, "step")], ["a", "step"]),
])
def test_events_pop_by_time_then_push_order(pushes, expected):
    q = EventQueue()
    for t, name in pushes:
        q.push(t, EventKind.STEP_DONE if name == "step" else EventKind.TICK, name)
    got = []
    while q:
        ev = q.pop()
        assert q.now_s == ev.time_s
        got.append(ev.payload)
    assert got == expected


def test_clock_refuses_the_past_and_horizon_ignores_steps():
    q = EventQueue()
    q.push(5.0, EventKind.STEP_DONE)
    assert q.horizon_s() == math.inf
    q.push(7.0, EventKind.ARRIVAL)
    assert q.horizon_s() == 7.0
    q.pop()
    with pytest.raises(PastEventError):
        q.push(4.0, EventKind.TICK)


def test_runs_are_deterministic():
    trace = synthetic_trace(num_functions=8, duration_s=30.0, seed=3, total_rate_per_s=2.0)
    a = simulate(trace, make_model(), gpu_cluster(2, cpus=1), system_config("slinfer"))
    b = simulate(trace, make_model(), gpu_cluster(2, cpus=1), system_config("slinfer"))
    assert a == b


# -- loads, TTFT, recompute -----------------------------------------------------------------------

def test_a_cold_load_counts_in_ttft():
    model = make_model(weights_gb=10.0)
    res = simulate(make_trace((0.1, "f", 500, 3)), model, gpu_cluster(), system_config("slinfer"))
    (r,) = res.requests
    load_s = LoadModel().load_s(DeviceKind.GPU, model.weight_bytes, cached=False)  # first load: from disk
    prefill_s = model.devices[DeviceKind.GPU].true.prefill_s(500)
    assert load_s == pytest.approx(10 * GIB / 5e9)
    assert r.load_delay_s == pytest.approx(load_s)
    assert ttft_s(r) == pytest.approx(load_s + prefill_s)
    assert ttft_s(r, count_cold_start=False) == pytest.approx(prefill_s)
    assert res.stats.loads == 1 and res.stats.loads_from_disk == 1


# (source, bandwidth of the first load in GB/s or None for no time, loads from disk)
LOAD_SOURCES = [
    (LoadSource.TIERED, 5.0, 1),  # the cache starts empty: disk
    (LoadSource.HOST_POOL, 24.0, 0),  # the artifact's pinned pool: host memory -> GPU
    (LoadSource.INSTANT, None, 0),
]


@pytest.mark.parametrize("source, gbps, from_disk", LOAD_SOURCES)
def test_the_load_source_sets_the_first_loads_time(source, gbps, from_disk):
    model = make_model(weights_gb=10.0)
    res = simulate(make_trace((0.1, "f", 500, 3)), model, gpu_cluster(), system_config("slinfer"),
                   LoadModel(source=source))
    (r,) = res.requests
    assert r.load_delay_s == pytest.approx(0.0 if gbps is None else 10 * GIB / (gbps * 1e9))
    assert res.stats.loads == 1 and res.stats.loads_from_disk == from_disk


@pytest.mark.parametrize("kind, cached, seconds", [
    (DeviceKind.GPU, False, 10 * GIB / 5e9),  # disk
    (DeviceKind.GPU, True, 10 * GIB / 24e9),  # host cache -> GPU over PCIe
    (DeviceKind.CPU, False, 10 * GIB / 5e9),
    (DeviceKind.CPU, True, 0.0),  # the cached weights are the instance's: nothing to copy
])
def test_load_times_by_device_and_source(kind, cached, seconds):
    assert LoadModel().load_s(kind, 10 * GIB, cached) == pytest.approx(seconds)
    assert LoadModel(overhead_s=0.3).load_s(kind, 10 * GIB, cached) == pytest.approx(seconds + 0.3)


def test_a_second_load_on_the_node_comes_from_the_host_cache():
    cache = HostCache(25 * GIB)
    assert not cache.touch("a", 10 * GIB) and cache.touch("a", 10 * GIB)
    cache.touch("b", 10 * GIB)
    cache.touch("c", 10 * GIB)  # evicts the least recently used, "a"
    assert "a" not in cache and "b" in cache and "c" in cache


def test_an_evicted_request_continues_elsewhere_by_recompute(monkeypatch):
    """One GPU with room for one instance: g's 2 requests evict f's instance (batch 1 < 2); f's
    request later re-prefills prompt + the tokens it had, and still finishes all its tokens."""
    prefills: list[tuple[str, int]] = []
    real = SimNode.next_run

    def spy(self, now, horizon):
        run = real(self, now, horizon)
        if run is not None and run.phase is Phase.PREFILL:
            prefills.append((run.batch[0].function, run.batch[0].context))
        return run

    monkeypatch.setattr(SimNode, "next_run", spy)
    trace = make_trace((0.0, "f", 100, 400), (3.0, "g", 100, 3), (3.0, "g", 120, 3))
    res = simulate(trace, make_model(10.0), gpu_cluster(gpu_memory=12 * GIB), system_config("slinfer"))
    f = next(r for r in res.requests if r.function == "f")
    assert res.stats.evictions >= 1 and f.preemptions == 1  # (the idle g may be evicted for f later)
    assert f.finish_s is not None  # every output token produced
    f_prefills = [c for fn, c in prefills if fn == "f"]
    assert f_prefills[0] == 100 and len(f_prefills) == 2 and 100 < f_prefills[1] < 500
    assert all(r.finish_s is not None for r in res.requests if r.function == "g")


@pytest.mark.parametrize("by_deadline, short_first", [(True, True), (False, False)])
def test_a_short_prompt_overtakes_a_started_long_one_inside_an_instance(by_deadline, short_first):
    """One CPU (toy: ~0.3 s per 512-token chunk). f's 3000-token prompt (TTFT due ~5.9 s after
    its load) is in its chunks when a 10-token prompt for f arrives, due 0.5 s later. Admission
    replays prompts by deadline and admits it; slinfer's instance serves them that way too, so the
    short one's first token comes first and in time. FCFS (the sllm baselines' vLLM order) finishes
    the long prompt first and the admitted short one misses."""
    trace = make_trace((0.1, "f", 3000, 3), (2.5, "f", 10, 3))
    system = replace(system_config("slinfer"), prefill_by_deadline=by_deadline)
    res = simulate(trace, make_model(10.0), ClusterSpec(cpus=1, gpus=0), system)
    long, short = sorted(res.requests, key=lambda r: r.arrival_s)
    assert long.first_token_s is not None and short.first_token_s is not None  # both admitted, none dropped
    assert (short.first_token_s < long.first_token_s) is short_first
    assert meets_slo(short) is short_first
    assert meets_slo(long)


def loaded_node(now: float = 1.0) -> tuple[SimNode, SimInstance, SimRequest]:
    """A GPU node with one loaded instance of f holding one waiting prompt."""
    node = SimNode(NodeId("gpu0"), "gpu0", DeviceKind.GPU, make_model(10.0), system_config("slinfer"), 60 * GIB)
    inst = SimInstance(InstanceId("f#0"), FunctionId("f"), node, 10 * GIB, 0.0, 0.5)
    node.start_load(inst)
    node.finish_load(inst, 0.5)
    req = SimRequest(0, FunctionId("f"), now, 100, 5, 0.5, 0.25)
    node.add(inst, req)
    assert inst.idle_since_s is None
    return node, inst, req


def test_an_instance_emptied_by_a_kv_spill_starts_its_keep_alive(monkeypatch):
    """An instance whose last request is spilled (its KV cannot grow) is idle from then on; with no
    idle start it would never expire, hold its memory for good and keep the simulation ticking."""
    node, inst, req = loaded_node()
    monkeypatch.setattr(node, "_needed_next", lambda i: i.kv_blocks + 1)  # never fits
    assert node.next_run(2.0, math.inf) is None
    assert node.spilled == [req] and not inst.has_work and inst.idle_since_s == 2.0


def test_an_instance_emptied_by_a_hand_back_starts_its_keep_alive():
    node, inst, req = loaded_node()
    assert node.hand_back("f#0", str(req.rid), 3.0) is req
    assert not inst.has_work and inst.idle_since_s == 3.0


@pytest.mark.parametrize("system", ["slinfer", "slinfer-nohold"])
def test_every_idle_instance_expires_and_the_run_ends(system):
    """The regression that found the above: under free loads 13B ran past its trace forever. On
    this run the old code emptied instances without an idle start (the tick now refuses that) and
    lost requests that an eviction or a hand-back sent back while a retry pass routed others (the
    pass overwrote the queue; the run's end now refuses a request neither done nor dropped)."""
    trace = synthetic_trace(num_functions=16, duration_s=120.0, seed=0, total_rate_per_s=3.0)
    sim = Simulator(trace, make_model(10.0), gpu_cluster(2, cpus=1, gpu_memory=24 * GIB),
                    system_config(system), LoadModel(source=LoadSource.INSTANT))
    res = sim.run()
    assert res.stats.duration_s < trace.duration_s + 600
    held = [i for i in sim.instances.values() if i.node.kind in sim.system.hold_idle]
    assert list(sim.instances.values()) == held and all(not i.has_work for i in held)
    assert all(r.state.name in ("DONE", "DROPPED") for r in sim.requests)


@pytest.mark.parametrize("system", ["sllm", "sllm+c", "sllm+c+s", "slinfer", "slinfer-nohold-balance",
                                    "slinfer-norate-nodisplace"])
def test_no_request_is_lost_or_duplicated_and_no_device_overcommits(system):
    """The invariants checked at every tick under each system, on a run tight enough for
    evictions, displacements and KV spills (two small GPUs and a CPU, 24 functions)."""
    trace = synthetic_trace(num_functions=24, duration_s=90.0, seed=2, total_rate_per_s=4.0)
    sim = Simulator(trace, make_model(10.0), gpu_cluster(2, cpus=1, gpu_memory=22 * GIB), system_config(system),
                    check=True)
    res = sim.run()
    assert len(res.requests) == len(trace.arrivals) and any(r.finish_s is not None for r in res.requests)
    if system.startswith("slinfer"):
        assert sim.evictions > 0 and sim.preempted_requests > 0


def test_the_invariant_check_finds_a_lost_request():
    trace = make_trace((0.1, "f", 100, 50), (0.2, "f", 100, 50))
    sim = Simulator(trace, make_model(10.0), gpu_cluster(), system_config("slinfer"), check=True)
    real = sim._retry

    def losing(now, function):  # the old bug: the queue is replaced, a request sent back is gone
        real(now, function)
        sim.waiting = sim.waiting[1:]

    sim._retry = losing
    with pytest.raises(RuntimeError, match="nowhere: lost"):
        sim.run()


def test_a_displaced_prompt_is_routed_again_and_never_lost(monkeypatch):
    """Admission's hand-back, as the simulator applies it: the newcomer joins, the displaced
    waiting prompt leaves its instance and waits for a route again (as the activator sends a
    handed-back request on), keeping its deadline; nothing is lost or served twice. Admission is
    made to displace here; when it does so by itself is runtime.core.admission's (tests there)."""
    real = sim_node.admit
    forced: list[str] = []

    def displacing(loads, target, new, free, now, displace=False):
        long = [(i.instance_id, p.key) for i in loads for p in i.prefills if p.displaceable and p.tokens_left > 1000]
        if new.prompt_tokens < 100 and long and not forced:
            forced.append(long[0][1])
            return core_admission.Decision(True, displace=long[0])
        return real(loads, target, new, free, now, displace=displace)

    monkeypatch.setattr(sim_node, "admit", displacing)
    trace = make_trace((0.1, "f", 3000, 3), (2.5, "f", 10, 3))
    sim = Simulator(trace, make_model(10.0), ClusterSpec(cpus=1, gpus=0), system_config("slinfer"))
    res = sim.run()
    assert forced and sim.displaced_requests == 1
    long, short = sorted(res.requests, key=lambda r: r.arrival_s)
    assert short.first_token_s is not None and short.finish_s is not None
    # The long prompt started over after the short one and still has its 5.9 s TTFT: served, once.
    assert long.first_token_s is not None and long.first_token_s > short.first_token_s
    assert long.finish_s is not None and long.preemptions == 0
    assert res.stats.preempted_requests == 1


def test_displacement_is_on_for_slinfer_only():
    assert system_config("slinfer").displace and not system_config("slinfer-nodisplace").displace
    assert not any(system_config(s).displace for s in ("sllm", "sllm+c", "sllm+c+s"))


# -- baselines ------------------------------------------------------------------------------------

@pytest.mark.parametrize("system, max_per_node, devices, cap, share", [
    ("sllm", 1, {"gpu"}, 8, 1.0),
    ("sllm+c", 1, {"gpu", "cpu"}, 8, 1.0),
    ("sllm+c+s", 2, {"gpu", "cpu"}, 4, 0.5),
    ("slinfer", 99, {"gpu", "cpu"}, None, 1.0),
])
def test_baseline_constraints_hold(monkeypatch, system, max_per_node, devices, cap, share):
    batches: list[int] = []
    real_add = SimNode.add

    def spy(self, inst, req):
        real_add(self, inst, req)
        batches.append(len(inst.decoding) + len(inst.prefilling))

    monkeypatch.setattr(SimNode, "add", spy)
    trace = synthetic_trace(num_functions=12, duration_s=40.0, seed=1, total_rate_per_s=6.0)
    res = simulate(trace, make_model(20.0), gpu_cluster(2, cpus=2), system_config(system))
    assert res.stats.max_instances_per_node <= max_per_node
    assert {r.device for r in res.requests if r.device} <= devices
    if cap is not None:
        assert batches and max(batches) <= cap
    assert res.stats.gpu_compute_share == share
    assert sum(r.finish_s is not None for r in res.requests) > 0


def test_static_sharing_halves_gpu_compute():
    """The same lone request: its prefill takes twice as long on a 50% slot."""
    trace = make_trace((0.0, "f", 800, 2))
    t = {s: ttft_s(simulate(trace, make_model(), gpu_cluster(), system_config(s)).requests[0], False)
         for s in ("sllm", "sllm+c+s")}
    assert t["sllm+c+s"] == pytest.approx(2 * t["sllm"])


def test_system_names_and_ablations():
    assert system_config("slinfer-nopreempt-balance").preempt is False
    assert system_config("slinfer-nopreempt-balance").balance is True
    assert system_config("slinfer-nocpu").pools == (DeviceKind.GPU,)
    assert system_config("slinfer-nowatermark").watermark == 1.0
    assert system_config("slinfer").newcomer_slack and not system_config("slinfer-noslack").newcomer_slack
    with pytest.raises(ValueError, match="unknown system"):
        system_config("sllm+x")


# -- the simulator runs runtime/core, unchanged ---------------------------------------------------

def test_the_simulator_calls_runtime_core_itself(monkeypatch):
    assert sim_node.admit is core_admission.admit
    assert sim_node.pick is core_arbiter.pick
    assert sim_node.resize_target is core_memory.resize_target
    calls: list[tuple[tuple[Any, ...], dict[str, Any], Any]] = []
    picks: list[Any] = []

    def admit_spy(*args, **kwargs):
        d = core_admission.admit(*args, **kwargs)
        calls.append((args, kwargs, d))
        return d

    def pick_spy(cands, kind):
        g = core_arbiter.pick(cands, kind)
        picks.append(g)
        return g

    monkeypatch.setattr(sim_node, "admit", admit_spy)
    monkeypatch.setattr(sim_node, "pick", pick_spy)
    trace = synthetic_trace(num_functions=6, duration_s=30.0, seed=2, total_rate_per_s=4.0)
    simulate(trace, make_model(), gpu_cluster(1, cpus=1), system_config("slinfer"))
    assert calls and picks
    assert any(not d.admitted for _, _, d in calls)  # refusals came from the real admission too
    for args, kwargs, decision in calls:  # the same decision from a direct call
        assert core_admission.admit(*args, **kwargs) == decision
    # A newcomer is planned against its SLO, as runtime.device plans it: the margin is its slack.
    assert any(a[2].own_slack_s > 0 for a, _, _ in calls)



@pytest.mark.parametrize("bounded, blocks", [(True, 4), (False, 20)])  # ceil(120 / 32); ceil((100 + 512) / 32)
def test_a_request_reserves_kv_only_up_to_its_output_bound(bounded, blocks):
    assert sim_node.context_bound is core_memory.context_bound  # the runtime's rule, not a copy
    cfg = replace(system_config("slinfer"), bounded_outputs=bounded)
    sim = Simulator(make_trace((0.0, "f", 100, 20)), make_model(), gpu_cluster(0, cpus=1), cfg)
    node = next(iter(sim.nodes.values()))
    req = SimRequest(0, sim.functions[0].function, 0.0, 100, 20, 0.5, 0.25)
    assert node._need_blocks(req) == blocks


# -- scoring and capacity ---------------------------------------------------------------------------

def rec(prompt=100, out=11, first=0.4, finish=2.9, load=0.0) -> RequestRecord:
    return RequestRecord("f", 0.0, prompt, out, first, finish, load, 0, "gpu")


@pytest.mark.parametrize("r, counted, excluded", [
    (rec(), True, True),  # TTFT 0.4 <= 0.5; TPOT 2.5/10 = 0.25
    (rec(first=0.51, finish=3.0), False, False),
    (rec(prompt=1024, first=1.9, finish=4.3), True, True),  # TTFT budget 1024/512 = 2 s
    (rec(finish=2.91), False, False),  # mean TPOT just over 0.25
    (rec(first=1.2, finish=3.7, load=0.8), False, True),  # the load made it late
    (rec(out=1, first=0.3, finish=0.3), True, True),  # one token: no TPOT
    (rec(first=None, finish=None), False, False),  # dropped
])
def test_slo_formula(r, counted, excluded):
    assert meets_slo(r) is counted
    assert meets_slo(r, count_cold_start=False) is excluded


@pytest.mark.parametrize("r, cause", [
    (rec(), None),
    (rec(first=None, finish=None), MissCause.DROPPED),
    (rec(first=1.2, finish=3.7, load=0.8), MissCause.TTFT_LOAD),
    (rec(first=0.51, finish=3.0), MissCause.TTFT),
    (rec(first=0.51, finish=9.0), MissCause.TTFT),  # late and slow: the first token comes first
    (rec(finish=2.91), MissCause.TPOT),
    (rec(first=0.4, finish=2.9, load=0.3), None),  # a load, still on time
])
def test_miss_cause(r, cause):
    assert miss_cause(r) is cause
    assert (cause is None) is meets_slo(r)


def test_rank_bands_group_functions_by_request_count():
    # 20 functions: f00 sends 20 requests, f01 19, ..., f19 1; each function's first request is
    # dropped, the rest met
    recs = [replace(rec(), function=f"f{i:02d}") if k else
            replace(rec(first=None, finish=None), function=f"f{i:02d}", device=None)
            for i in range(20) for k in range(20 - i)]
    bands = rank_bands(RunResult("s", "toy", 20, tuple(recs), None))  # type: ignore[arg-type]
    assert [(b.first, b.last, b.functions) for b in bands] == [(1, 8, 8), (9, 16, 8), (17, 20, 4)]
    assert [b.requests for b in bands] == [sum(range(13, 21)), sum(range(5, 13)), sum(range(1, 5))]
    assert [b.misses["dropped"] for b in bands] == [8, 8, 4]
    assert all(b.slo_met == b.requests - b.functions for b in bands)
    assert bands[0].served_on == {"gpu": bands[0].slo_met}


@pytest.mark.parametrize("attainment, target, expected", [
    ({16: 1.0, 32: 0.97, 48: 0.95, 64: 0.9}, 0.95, 48),
    ({16: 1.0, 32: 0.97, 48: 0.95, 64: 0.9}, 0.90, 64),
    ({16: 1.0, 32: 0.97, 48: 0.95, 64: 0.9}, 0.99, 16),
    ({16: 0.8, 32: 0.97}, 0.95, 0),  # the smallest level misses: no capacity
    ({16: 1.0, 32: 0.9, 48: 0.96}, 0.95, 16),  # a later recovery does not count
])
def test_capacity(attainment, target, expected):
    assert capacity(attainment, target) == expected


@pytest.mark.parametrize("attainment, held, anywhere", [
    ({1: 1.0, 2: 1.0, 4: 0.97, 8: 0.89, 10: 0.98, 12: 0.87}, 4, 10),  # a pass after a miss
    ({1: 1.0, 2: 0.7, 4: 0.37, 8: None}, 1, 1),  # None: not run after a collapse, a miss
    ({1: 1.0, 2: None, 4: 0.99}, 1, 4),
    ({1: 0.5}, 0, 0),
])
def test_capacity_held_and_anywhere(attainment, held, anywhere):
    # The bench and the simulator share these (bench/bench_capacity.py imports them).
    assert capacity(attainment, 0.95) == held
    assert capacity_any(attainment, 0.95) == anywhere


def test_score_counts_dropped_as_misses_and_reports_nodes():
    trace = synthetic_trace(num_functions=6, duration_s=30.0, seed=2, total_rate_per_s=4.0)
    res = simulate(trace, make_model(), gpu_cluster(1, cpus=1), system_config("sllm"))
    s = score(res)
    assert s.requests == len(trace.arrivals) == len(res.requests)
    assert s.slo_met == sum(meets_slo(r) for r in res.requests) <= s.requests - s.dropped
    assert s.slo_met <= s.slo_met_excl_cold
    assert sum(s.misses.values()) == s.requests - s.slo_met and s.misses["dropped"] == s.dropped
    assert sum(b.requests for b in s.by_rank) == s.requests and sum(b.slo_met for b in s.by_rank) == s.slo_met
    assert 0 < s.avg_nodes_in_use["gpu"] <= 1.0 and s.avg_nodes_in_use["cpu"] == 0.0
    assert s.decode_tok_per_node_s["gpu"] > 0


def test_simulator_builds_slots_per_node():
    sim = Simulator(make_trace((0.0, "f", 10, 2)), make_model(), gpu_cluster(2, cpus=1),
                    replace(system_config("sllm+c+s")))
    assert sorted(sim.nodes) == ["cpu0.0", "cpu0.1", "gpu0.0", "gpu0.1", "gpu1.0", "gpu1.1"]
    assert {n.memory_bytes for n in sim.nodes.values() if n.kind is DeviceKind.GPU} == {30 * GIB}


# -- slinfer's CPU keep-alive, routing and cache-aware placement ------------------------------------

@pytest.mark.parametrize("system, loads", [
    ("slinfer", 1),  # the idle CPU instance stays loaded: the second request finds it warm
    ("slinfer-nohold", 2),  # unloaded after keep_alive_s: the second request waits for a reload
])
def test_idle_cpu_instances_are_held(system, loads):
    trace = make_trace((0.0, "f", 100, 3), (20.0, "f", 100, 3))
    # a reload from the host cache costs a CPU only the overhead (no copy): make it show
    res = simulate(trace, make_model(), ClusterSpec(cpus=1, gpus=0), system_config(system), LoadModel(overhead_s=0.5))
    assert res.stats.loads == loads
    assert all(r.finish_s is not None and r.device == "cpu" for r in res.requests)
    assert (res.requests[1].load_delay_s == 0.0) is (loads == 1)


@pytest.mark.parametrize("system, first_asked", [
    ("slinfer", "gpu"),  # a GPU instance exists: requests try it first
    ("slinfer-batchroute", "cpu"),  # by batch only: the CPU instance holds more requests
])
def test_routing_tries_gpu_instances_first(monkeypatch, system, first_asked):
    """f runs on the CPU (placed first) and on the GPU (placed when the CPU refused a long
    prompt); while both still work, which device does a later request ask first?"""
    asked: list[tuple[float, str]] = []
    real = SimNode.consider

    def spy(self, inst, req, now, delay):
        asked.append((req.arrival_s, self.kind.value))
        return real(self, inst, req, now, delay)

    monkeypatch.setattr(SimNode, "consider", spy)
    arrivals = [(0.0, "f", 100, 400)] + [(0.01 * k, "f", 3000, 400) for k in range(1, 4)]
    arrivals += [(6.0 + 0.1 * k, "f", 100, 5) for k in range(6)]  # while both instances still work
    res = simulate(make_trace(*arrivals), make_model(), gpu_cluster(1, cpus=1), system_config(system))
    assert {r.device for r in res.requests} == {"cpu", "gpu"}  # both instances existed
    firsts = {}
    for arrival, kind in asked:
        firsts.setdefault(arrival, kind)
    assert {firsts[t] for t in firsts if t >= 6.0} == {first_asked}


@pytest.mark.parametrize("round_robin", [True, False])
def test_sllm_routes_round_robin(monkeypatch, round_robin):
    """A burst past the batch cap (8) gives f two exclusive GPU instances; later requests, while
    both still work (4 and 2 requests), go to them in turn (the artifact's ServerlessLLM), or with
    round_robin off, to the one with the larger batch."""
    placed: list[tuple[float, str]] = []
    real = SimNode.add

    def spy(self, inst, req):
        placed.append((req.arrival_s, inst.iid))
        return real(self, inst, req)

    monkeypatch.setattr(SimNode, "add", spy)
    arrivals = [(0.01 * k, "f", 100, 200 if k < 4 else 4000) for k in range(10)]  # 8 + 2; 4 end by 6 s
    arrivals += [(6.0 + 0.1 * k, "f", 100, 5) for k in range(4)]
    system = replace(system_config("sllm"), round_robin=round_robin)
    res = simulate(make_trace(*arrivals), make_model(), gpu_cluster(2), system)
    assert len({iid for _, iid in placed}) == 2  # both instances existed
    later = [iid for t, iid in placed if t >= 6.0]
    assert len(later) == 4 and all(r.finish_s is not None for r in res.requests)
    if round_robin:
        assert all(a != b for a, b in itertools.pairwise(later))
    else:
        assert len(set(later)) == 1


@pytest.mark.parametrize("system, cached", [("slinfer", {"f"}), ("slinfer-nocache", set())])
def test_placement_sees_the_host_caches(system, cached):
    sim = Simulator(make_trace((0.0, "f", 100, 3)), make_model(), gpu_cluster(1), system_config(system))
    sim.run()
    assert set(sim.snapshot(sim.queue.now_s).node(sim.nodes["gpu0"].node_id).cached) == cached


def test_new_ablations_parse():
    assert system_config("slinfer-nohold").hold_idle == ()
    assert system_config("slinfer-batchroute").route_device_order == ()
    assert system_config("slinfer-nocache").cache_aware is False
    assert system_config("slinfer-norate").rate_window_s == 0 and system_config("slinfer").rate_window_s == 300
    assert system_config("sllm").hold_idle == () and system_config("sllm+c").route_device_order == ()


@pytest.mark.parametrize("system, evicted", [("slinfer", False), ("slinfer-norate", True)])
def test_preemption_spares_a_busier_function_with_rates(system, evicted):
    """One GPU that holds one instance. "busy" is called every 0.5 s; at t = 20 s three requests
    for "rare" arrive at once. The paper's rule evicts busy's instance (batch 1 < 3 waiting);
    with the functions' arrival rates in the snapshot it is spared and rare waits."""
    busy = [(0.5 * k, "busy", 100, 20) for k in range(60)]
    trace = make_trace(*busy, *[(20.0, "rare", 100, 20)] * 3)
    sim = Simulator(trace, make_model(), gpu_cluster(1, gpu_memory=12 * GIB), system_config(system))
    res = sim.run()
    assert (res.stats.evictions > 0) is evicted
    served = sum(r.finish_s is not None for r in res.requests if r.function == "busy")
    assert served == 60 if not evicted else served <= 60
    rates = {f.function: f.arrival_rate_per_s for f in sim.snapshot(sim.queue.now_s).functions}
    assert (rates["busy"] > rates["rare"] > 0) is (not evicted)  # norate keeps every rate at 0
