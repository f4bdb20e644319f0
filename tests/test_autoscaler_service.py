"""The autoscaler service's logic against fake pods at the HTTP seam (httpx.MockTransport): what it
reads from /admin/status, which admin calls a round makes, and the route table it publishes.
The clock is a variable; nothing sleeps."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest

from activator.routes import RouteTable
from autoscaler.core import DeviceKind, FunctionId, InstanceId, Load, NodeId
from autoscaler.service.controller import Controller, ControllerSettings, LoadFailure
from autoscaler.service.nodes import NodeSpec, StaticNodes
from autoscaler.service.observe import PodInstance, PodStatus, parse_status, routes, snapshot
from autoscaler.service.rollout import Rollout, rollout
from functions import DevicePreference, FunctionSpec, parse_function_spec

TOKEN = "t"
NODES = StaticNodes((NodeSpec(NodeId("pod-0"), "http://pod-0", DeviceKind.CPU, 1 << 30),
                     NodeSpec(NodeId("pod-1"), "http://pod-1", DeviceKind.CPU, 1 << 30)))


def fn(name: str, **kw: Any) -> FunctionSpec:
    return FunctionSpec(**{"name": name, "model": "random:llama-tiny?seed=0", "max_context_tokens": 256,
                           "max_output_tokens": 64, **kw})


class FakePods:
    """Pods answering the admin API from a dict: node -> {function: state}; records calls."""

    def __init__(self) -> None:
        self.loaded: dict[str, dict[str, str]] = {"pod-0": {}, "pod-1": {}}
        self.batch: dict[tuple[str, str], int] = {}
        self.down: set[str] = set()
        self.slow: set[str] = set()  # status times out (a long load holds the device thread)
        self.frozen: set[str] = set()  # nothing answers (a frozen process): status and /healthz time out
        self.stuck: set[str] = set()  # status times out, /healthz says the device thread stalled
        self.terminating: set[str] = set()  # shutting down (SIGTERM): draining, then gone
        self.calls: list[tuple[str, str, str]] = []
        # function, or (node, function) -> the pod's answer to loading it
        self.refuse: dict[str | tuple[str, str], httpx.Response] = {}
        self.digest: dict[tuple[str, str], str] = {}  # (node, function) -> the loaded spec's digest
        self.crash: set[str] = set()  # functions whose load takes the pod down
        self.memory: dict[str, dict[str, int]] = {}  # node -> the memory its status reports

    def status(self, node: str) -> dict[str, Any]:
        fns = self.loaded[node]
        return {
            "device": {"kind": "cpu", "kv_budget_bytes": 64 << 20},
            "instances": [{"name": f, "batch": self.batch.get((node, f), 0), "waiting": 0, "demand": 0.01,
                           "kv_blocks_total": 4, "kv_blocks_used": 0, "kv_blocks_reserved": 0, "kv_bytes": 4096}
                          for f, st in fns.items() if st == "ready"],
            "functions": {f: {"state": st, "model": "random:llama-tiny?seed=0",
                              **({"digest": self.digest[node, f]} if (node, f) in self.digest else {})}
                          for f, st in fns.items()},
            "weights_cache": {"models": [{"ref": "random:llama-tiny?seed=0", "bytes": 1 << 20, "pins": 1}]},
            "terminating": node in self.terminating,
            **({"memory": self.memory[node]} if node in self.memory else {}),
        }

    def handler(self, request: httpx.Request) -> httpx.Response:
        node = request.url.host
        if node in self.down:
            raise httpx.ConnectError("down", request=request)
        if node in self.frozen:
            raise httpx.ReadTimeout("frozen", request=request)
        if node in self.slow and request.url.path == "/admin/status":
            raise httpx.ReadTimeout("busy", request=request)
        if node in self.stuck:
            if request.url.path == "/healthz":
                return httpx.Response(503, json={"status": "unhealthy", "reason": "device thread has made no "
                                                                                   "progress for 61 s"})
            raise httpx.ReadTimeout("stuck", request=request)
        if request.url.path == "/healthz":  # answered by the event loop, busy device thread or not
            return httpx.Response(200, json={"status": "ok"})
        assert request.headers["authorization"] == f"Bearer {TOKEN}"
        path = request.url.path
        if request.method == "GET" and path == "/admin/status":
            return httpx.Response(200, json=self.status(node))
        self.calls.append((request.method, node, path))
        if request.method == "POST" and path == "/admin/instances":
            body = json.loads(request.content)
            name = body["name"]
            refusal = self.refuse.get((node, name)) or self.refuse.get(name)
            if refusal is not None:
                return refusal
            if name in self.crash:  # the pod dies mid-load (OOM-killed) and comes back empty
                raise httpx.RemoteProtocolError("Server disconnected without sending a response.", request=request)
            self.loaded[node][name] = "ready"
            self.digest[node, name] = parse_function_spec(body).instance_digest
            return httpx.Response(201, json={"name": name, "state": "ready"})
        name = path.split("/")[3]
        self.loaded[node].pop(name, None)
        self.digest.pop((node, name), None)
        return httpx.Response(200, json={"name": name})


class Harness:
    def __init__(self, functions: list[FunctionSpec]) -> None:
        self.pods = FakePods()
        self.now = 0.0
        self.client = httpx.AsyncClient(transport=httpx.MockTransport(self.pods.handler))
        self.ctl = Controller(NODES, {f.name: f for f in functions}, ControllerSettings(TOKEN), self.client,
                              clock=lambda: self.now)

    async def round(self) -> list[str]:
        """One reconcile round, its admin calls executed; returns the actions' kinds and targets."""
        plan = await self.ctl.reconcile()
        await self.ctl.settle()
        return [f"Load {a.function}@{a.node_id}" if isinstance(a, Load) else f"{type(a).__name__} {a.instance_id}"
                for a in plan.actions]


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_parse_status_snapshot_and_routes() -> None:
    pods = FakePods()
    pods.loaded["pod-0"] = {"a": "ready", "b": "loading", "c": "unloaded"}
    pods.batch[("pod-0", "a")] = 2
    st = parse_status(NODES.specs[0], pods.status("pod-0"))
    assert [(i.function, i.state, i.batch) for i in st.instances] == [("a", "ready", 2), ("b", "loading", 0)]
    funcs = {"a": fn("a"), "b": fn("b")}
    snap = snapshot(5.0, [st], funcs, {}, loading=[("a", NodeId("pod-0"))])
    assert [(i.instance_id, i.loading, i.weight_bytes) for i in snap.instances] == [
        ("a@pod-0", False, 1 << 20), ("b@pod-0", True, 1 << 20)]
    table = routes(7, [st], funcs)
    assert table.version == 7 and [e.instance_id for e in table.endpoints_of("a")] == ["a@pod-0"]
    assert table.endpoints_of("b") == ()


def test_kv_a_pod_lends_to_cached_prefixes_is_free_to_placement() -> None:
    status = {"functions": {"a": {"state": "ready", "model": "m"}},
              "instances": [{"name": "a", "kv_bytes": 1000, "kv_blocks_total": 10, "kv_blocks_reserved": 2,
                             "kv_lent_bytes": 600}],
              "device": {"kv_budget_bytes": 5000}}
    (inst,) = parse_status(NODES.specs[0], status).instances
    assert (inst.kv_bytes, inst.kv_reserved_bytes) == (400, 200)


def test_demand_loads_one_instance_and_stale_demand_does_not_scale_out() -> None:
    async def go() -> None:
        h = Harness([fn("a")])
        h.ctl.report_demand({"a": 3}, [], seen_version=h.ctl.table.version)
        assert await h.round() == ["Load a@pod-0"]
        stale = h.ctl.table.version
        h.now = 0.1
        assert await h.round() == []  # the instance is published; the demand that asked for it is dropped
        assert [e.instance_id for e in h.ctl.table.endpoints_of("a")] == ["a@pod-0"]
        assert h.ctl.table.version > stale
        h.ctl.report_demand({"a": 1}, [], seen_version=stale)  # sent before the activator saw it
        assert await h.round() == []
        h.ctl.report_demand({"a": 1}, [], seen_version=h.ctl.table.version)  # a ready instance refused
        assert await h.round() == ["Load a@pod-1"]
        await h.client.aclose()
    run(go())


def test_keep_alive_unloads_idle_instances_and_activity_keeps_them() -> None:
    async def go() -> None:
        h = Harness([fn("a", keep_alive_s=10.0)])
        h.pods.loaded["pod-0"]["a"] = "ready"
        assert await h.round() == []  # idle from now (t=0)
        h.now = 8.0
        h.ctl.report_demand({}, ["a"])  # the activator served it just now
        assert await h.round() == []
        h.now = 17.0
        assert await h.round() == []  # idle since 8 s: 9 s < 10 s
        h.now = 18.5
        assert await h.round() == ["Unload a@pod-0"]
        assert h.pods.calls == [("DELETE", "pod-0", "/admin/instances/a")]
        await h.client.aclose()
    run(go())


def test_an_unload_in_flight_is_not_sent_again_and_a_failed_one_is() -> None:
    async def go() -> None:
        h = Harness([fn("a", keep_alive_s=1.0)])
        drain = asyncio.Event()
        answer = httpx.Response(200, json={"name": "a"})

        async def draining(request: httpx.Request) -> httpx.Response:
            if request.method == "DELETE":  # the pod drains until told, keeping its status "ready"
                h.pods.calls.append(("DELETE", request.url.host, request.url.path))
                await drain.wait()
                if answer.status_code == 200:
                    h.pods.loaded["pod-0"].pop("a", None)
                return answer
            return h.pods.handler(request)

        h.ctl.admin.client = client = httpx.AsyncClient(transport=httpx.MockTransport(draining))
        h.pods.loaded["pod-0"]["a"] = "ready"
        assert await h.round() == []
        for t in (2.0, 3.0, 4.0):  # idle past its keep-alive each round; one unload is under way
            h.now = t
            await h.ctl.reconcile()
            await asyncio.sleep(0)
        assert h.pods.calls == [("DELETE", "pod-0", "/admin/instances/a")]
        answer = httpx.Response(500, text="Internal Server Error")
        drain.set()
        await h.ctl.settle()
        h.now = 5.0  # it failed and "a" is still there, idle: the next round tries again
        answer = httpx.Response(200, json={"name": "a"})
        assert await h.round() == ["Unload a@pod-0"]
        assert len(h.pods.calls) == 2 and "a" not in h.pods.loaded["pod-0"]
        assert h.ctl.status()["lost"] == []  # gone because asked: not re-placed
        await client.aclose()
        await h.client.aclose()
    run(go())


def test_a_load_that_returns_while_a_status_is_on_its_way_is_not_sent_again() -> None:
    # The pod answered the status before it took the load; the load returned before the round
    # decided: that status cannot show it, and the function must not be loaded a second time.
    async def go() -> None:
        h = Harness([fn("a")])
        loaded = asyncio.Event()
        race = {"on": False}

        async def pods(request: httpx.Request) -> httpx.Response:
            if request.method == "POST":
                await loaded.wait()
            if request.url.path == "/admin/status" and race["on"]:
                before = h.pods.handler(request)  # taken before the load lands
                h.now += 0.1
                loaded.set()
                await asyncio.sleep(0.05)  # the load returns meanwhile
                return before
            return h.pods.handler(request)

        h.ctl.admin.client = client = httpx.AsyncClient(transport=httpx.MockTransport(pods))
        h.ctl.report_demand({"a": 1}, [], seen_version=h.ctl.table.version)
        assert (await h.ctl.reconcile()).loads == [Load(FunctionId("a"), NodeId("pod-0"))]
        race["on"] = True
        h.now = 0.5
        assert (await h.ctl.reconcile()).actions == ()  # demand is still there: 2 s
        race["on"] = False
        await h.ctl.settle()
        assert [c for c in h.pods.calls if c[0] == "POST"] == [("POST", "pod-0", "/admin/instances")]
        h.now = 1.0
        assert await h.round() == []  # a fresh status shows it
        await client.aclose()
        await h.client.aclose()
    run(go())


def test_lost_instances_are_replaced_without_demand() -> None:
    async def go() -> None:
        h = Harness([fn("a"), fn("b")])
        h.pods.loaded["pod-0"] = {"a": "ready", "b": "ready"}
        assert await h.round() == []
        h.pods.down.add("pod-0")  # the pod died: its instances are lost
        h.pods.loaded["pod-0"] = {}
        h.now = 1.0
        assert await h.round() == ["Load a@pod-1", "Load b@pod-1"]
        h.now = 2.0
        assert await h.round() == []
        assert [e.instance_id for fn_ in ("a", "b") for e in h.ctl.table.endpoints_of(fn_)] == ["a@pod-1", "b@pod-1"]
        assert h.ctl.status()["lost"] == []
        await h.client.aclose()
    run(go())


def test_a_pod_shutting_down_has_its_instances_replaced_while_it_drains() -> None:
    # Its running requests drain there, then move (runtime.pod.Pod.hand_off): the instances they
    # move to are placed at once, not after the pod has gone, and nothing new is routed there.
    async def go() -> None:
        h = Harness([fn("a"), fn("b")])
        h.pods.loaded["pod-0"] = {"a": "ready", "b": "ready"}
        h.pods.batch[("pod-0", "a")] = 3
        assert await h.round() == []
        h.pods.terminating.add("pod-0")  # still answering, instances still listed
        h.now = 1.0
        assert await h.round() == ["Load a@pod-1", "Load b@pod-1"]
        assert [e.instance_id for f in ("a", "b") for e in h.ctl.table.endpoints_of(f)] == []  # none on pod-0
        h.now = 2.0
        assert await h.round() == []
        assert [e.instance_id for f in ("a", "b") for e in h.ctl.table.endpoints_of(f)] == ["a@pod-1", "b@pod-1"]
        node = next(n for n in h.ctl.status()["nodes"] if n["node"] == "pod-0")
        assert node["terminating"] is True and node["up"] is False
        assert ("DELETE", "pod-0", "/admin/instances/a") not in h.pods.calls  # it hands off by itself
        assert h.ctl.table.gone == ()  # what runs there finishes or moves in order: not cut
        await h.client.aclose()
    run(go())


def test_a_load_the_pod_already_has_is_not_a_failure() -> None:
    """A 409 already_loaded (the pod had the instance from an earlier load) means what the load
    wanted holds: the function must not be published as unable to start."""
    async def go() -> None:
        h = Harness([fn("a")])
        h.pods.refuse["a"] = httpx.Response(409, json={"error": {"message": "function 'a' is already ready here",
                                                                  "code": "already_loaded"}})
        h.ctl.report_demand({"a": 1}, [], seen_version=h.ctl.table.version)
        assert await h.round() == ["Load a@pod-0"]
        assert dict(h.ctl.table.unavailable) == {} and h.ctl.load_failures == {}
        h.pods.refuse["a"] = httpx.Response(409, json={"error": {"message": "conflict", "code": "other"}})
        h.ctl.report_demand({"a": 1}, [], seen_version=h.ctl.table.version)
        h.now = 1.0
        await h.round()
        assert "a" in h.ctl.load_failures  # any other refusal still is one
        await h.client.aclose()
    run(go())


def test_a_model_that_cannot_load_is_published_as_unavailable_until_redeployed() -> None:
    async def go() -> None:
        h = Harness([fn("a"), fn("b")])
        why = "cannot load model 'random:nope': unknown random preset 'nope'"
        h.pods.refuse["a"] = httpx.Response(400, json={"error": {"message": why, "code": "model_load_failed"}})
        h.pods.refuse["b"] = httpx.Response(507, json={"error": {"message": "full", "code": "insufficient_capacity"}})
        h.ctl.report_demand({"a": 1, "b": 1}, [], seen_version=h.ctl.table.version)
        assert await h.round() == ["Load a@pod-0", "Load b@pod-0"]
        h.now = 0.1
        await h.round()
        # The pod's own words reach the activator through the route table; a 5xx is not the
        # function's fault (capacity, a restarting pod) and it keeps waiting for another try.
        assert dict(h.ctl.table.unavailable) == {"a": f"pod-0 could not load it: {why}"}
        assert RouteTable.from_json(h.ctl.table.to_json()).unavailable == h.ctl.table.unavailable
        assert h.ctl.status()["load_errors"] == {"a": f"pod-0 could not load it: {why}"}
        # Retried by itself (its requests are answered at once: no demand comes), backing off
        # 5 s, then 10 s, ...
        h.now = 4.9
        assert "Load a@pod-0" not in await h.round()
        h.now = 5.2
        assert "Load a@pod-0" in await h.round()
        h.now = 15.0
        assert "Load a@pod-0" not in await h.round()
        h.now = 15.3
        assert "Load a@pod-0" in await h.round()
        assert h.ctl.load_failures["a"].count == 3
        before = h.ctl.table.version
        del h.pods.refuse["a"]
        h.ctl.deploy(fn("a", keep_alive_s=5.0))  # fixed: published at once, retried at once
        assert h.ctl.table.version > before and dict(h.ctl.table.unavailable) == {}
        h.ctl.report_demand({"a": 1}, [], seen_version=h.ctl.table.version)
        h.now = 15.4
        assert "Load a@pod-0" in await h.round()
        h.now = 15.5
        await h.round()
        assert [e.instance_id for e in h.ctl.table.endpoints_of("a")] == ["a@pod-0"]
        assert h.ctl.status()["load_errors"] == {}
        await h.client.aclose()
    run(go())


OLD, NEW = fn("a"), fn("a", system_prompt="v2")


@pytest.mark.parametrize("instances, loading, removing, unload, want", [
    # (node, state, digest, batch) per instance of "a"; idle ones have been for 5 s, but "a@pod-1" for 1 s
    ([("pod-0", "ready", OLD.instance_digest, 0)], [], [], ["a@pod-0"], []),  # idle: unloaded at once
    ([("pod-1", "ready", OLD.instance_digest, 0)], [], [], [], ["a"]),  # a pause in a stream of requests
    ([("pod-0", "ready", OLD.instance_digest, 2)], [], [], [], ["a"]),  # busy: a new one first
    ([("pod-0", "ready", OLD.instance_digest, 2), ("pod-1", "ready", NEW.instance_digest, 0)], [], [],
     ["a@pod-0"], []),  # the new one serves: the old one drains
    ([("pod-0", "ready", OLD.instance_digest, 2)], [("a", "pod-1")], [], [], []),  # the new one is loading
    ([("pod-0", "ready", OLD.instance_digest, 2), ("pod-1", "draining", OLD.instance_digest, 1)], [], [],
     [], []),  # one at a time
    ([("pod-0", "ready", OLD.instance_digest, 0), ("pod-1", "ready", OLD.instance_digest, 0)], [], ["a@pod-1"],
     [], []),  # an unload under way
    ([("pod-0", "ready", NEW.instance_digest, 2)], [], [], [], []),  # current
    ([("pod-0", "ready", None, 0)], [], [], [], []),  # a pod that reports no digest
])
def test_rollout_steps(instances: list[tuple[str, str, str | None, int]], loading: list[tuple[str, str]],
                       removing: list[str], unload: list[str], want: list[str]) -> None:
    pods = []
    for spec in NODES.specs:
        mine = [PodInstance("a", state, "m", batch=batch, digest=digest)
                for node, state, digest, batch in instances if node == spec.node_id]
        pods.append(PodStatus(spec, 1 << 20, tuple(mine), {}))
    idle = {InstanceId("a@pod-0"): 5.0, InstanceId("a@pod-1"): 1.0}
    got = rollout(pods, {"a": NEW}, [(f, NodeId(n)) for f, n in loading], {InstanceId(i) for i in removing}, idle)
    assert [u.instance_id for u in got.unload] == unload and all(u.drain for u in got.unload)
    assert list(got.want) == want
    assert [u.instance_id for u in got.fallback] == ([f"a@{instances[0][0]}"] if want else [])


def test_an_instance_on_a_device_its_function_no_longer_allows_is_moved() -> None:
    gpu_only = fn("a", device=DevicePreference.GPU)  # same digest: only where it may run changed
    pods = [PodStatus(NODES.specs[0], 1 << 20, (PodInstance("a", "ready", "m", batch=1,
                                                           digest=gpu_only.instance_digest),), {})]
    got = rollout(pods, {"a": gpu_only}, [], set(), {})
    assert list(got.want) == ["a"] and [u.instance_id for u in got.fallback] == ["a@pod-0"]
    assert rollout(pods, {"a": fn("a", device=DevicePreference.CPU)}, [], set(), {}) == Rollout()


def test_a_redeployed_function_is_replaced_make_before_break() -> None:
    async def go() -> None:
        h = Harness([fn("a"), fn("b")])
        h.ctl.report_demand({"a": 1, "b": 1}, [], seen_version=h.ctl.table.version)
        assert await h.round() == ["Load a@pod-0", "Load b@pod-0"]
        h.pods.batch[("pod-0", "a")] = 2  # a serves; b is idle
        h.now = 0.5
        assert await h.round() == []
        h.ctl.deploy(fn("a", system_prompt="Answer in French."))
        h.ctl.deploy(fn("b", keep_alive_s=30.0))  # scaling only: its instance serves on
        h.now = 1.0
        assert await h.round() == ["Load a@pod-1"]  # the new spec, beside the old one
        assert [e.instance_id for e in h.ctl.table.endpoints_of("a")] == ["a@pod-0"]  # (not ready yet)
        h.now = 1.5
        assert await h.round() == ["Unload a@pod-0"]  # the new one is ready: the old one drains
        assert [e.instance_id for e in h.ctl.table.endpoints_of("a")] == ["a@pod-1"]
        h.now = 2.0
        assert await h.round() == []
        assert "b" in h.pods.loaded["pod-0"] and h.ctl.status()["lost"] == []
        await h.client.aclose()
    run(go())


def test_a_redeploy_with_no_room_beside_drains_first_and_a_broken_one_keeps_the_old() -> None:
    async def go() -> None:
        h = Harness([fn("a", max_instances=1), fn("c")])
        h.ctl.report_demand({"a": 1, "c": 1}, [], seen_version=h.ctl.table.version)
        assert await h.round() == ["Load a@pod-0", "Load c@pod-0"]
        h.pods.batch[("pod-0", "a")] = h.pods.batch[("pod-0", "c")] = 1
        # c's new model does not load: its old instance goes on serving, and is left alone
        h.pods.refuse["c"] = httpx.Response(400, json={"error": {"message": "no such model",
                                                                  "code": "model_load_failed"}})
        h.ctl.deploy(fn("c", model="random:llama-tiny?seed=1"))
        h.ctl.deploy(fn("a", model="random:llama-tiny?seed=2", max_instances=1))
        h.now = 1.0
        assert await h.round() == ["Load c@pod-1", "Unload a@pod-0"]  # a cannot have two: break first
        h.now = 2.0
        assert await h.round() == []
        assert [e.instance_id for e in h.ctl.table.endpoints_of("c")] == ["c@pod-0"]
        assert h.ctl.status()["load_errors"] == {"c": "pod-1 could not load it: no such model"}
        h.ctl.report_demand({"a": 1}, [], seen_version=h.ctl.table.version)  # a's requests wait
        h.now = 3.0
        assert await h.round() == ["Load a@pod-0"]
        assert h.pods.digest["pod-0", "a"] == fn("a", model="random:llama-tiny?seed=2", max_instances=1).instance_digest
        await h.client.aclose()
    run(go())


def test_a_model_whose_loads_take_pods_down_is_published_as_unavailable_after_two() -> None:
    # An OOM-killed pod drops the load's connection; re-placing the model would kill the next pod.
    async def go() -> None:
        h = Harness([fn("huge"), fn("a")])
        h.pods.crash.add("huge")
        h.ctl.report_demand({"huge": 1}, [], seen_version=h.ctl.table.version)
        assert await h.round() == ["Load huge@pod-0"]
        assert h.ctl.load_failures == {}  # one may be a pod killed by chance
        h.now = 0.5
        assert await h.round() == ["Load huge@pod-0"]
        why = h.ctl.status()["load_errors"]["huge"]
        assert "went away while loading it 2 times in a row" in why and "memory" in why
        h.now = 1.0
        h.ctl.report_demand({"huge": 1, "a": 1}, [], seen_version=h.ctl.table.version)
        assert await h.round() == ["Load a@pod-0"]  # huge waits out its backoff; the others go on
        assert dict(h.ctl.table.unavailable) == {"huge": why}
        h.pods.crash.clear()
        h.now = 6.0  # retried after 5 s; it loads now and the error is gone
        assert await h.round() == ["Load huge@pod-0"]
        assert h.ctl.load_failures == {} and h.ctl.load_crashes == {}
        await h.client.aclose()
    run(go())


def refused_for_memory(needed_bytes: int) -> httpx.Response:
    return httpx.Response(507, json={"error": {"message": "cannot load model ...: loading it takes up to ...",
                                               "code": "insufficient_memory", "weight_bytes": needed_bytes // 2,
                                               "needed_bytes": needed_bytes}})


def test_a_load_refused_for_memory_teaches_the_models_size_and_the_next_goes_where_it_fits() -> None:
    async def go() -> None:
        h = Harness([fn("m", model="random:smollm2-shape?seed=1"), fn("huge", model="random:smollm2-shape?seed=2")])
        h.ctl.node_source = StaticNodes((NodeSpec(NodeId("pod-0"), "http://pod-0", DeviceKind.CPU, 1 << 30),
                                         NodeSpec(NodeId("pod-1"), "http://pod-1", DeviceKind.CPU, 4 << 30)))
        h.pods.refuse["pod-0", "m"] = refused_for_memory(2 << 30)
        h.ctl.report_demand({"m": 1}, [], seen_version=h.ctl.table.version)
        assert await h.round() == ["Load m@pod-0"]  # no pod holds the model: its size is unknown
        # what its first load on a pod needs: the load's peak
        assert h.ctl.load_failures == {} and h.ctl.weight_hints == {"random:smollm2-shape?seed=1": 2 << 30}
        h.now = 0.1
        assert await h.round() == ["Load m@pod-1"]  # 2 GiB fits the 4 GiB pod only
        h.now = 0.2
        await h.round()
        assert [e.instance_id for e in h.ctl.table.endpoints_of("m")] == ["m@pod-1"]
        assert h.ctl.memory_refusals == {}
        # A model larger than any pod declares cannot start: said at once, not waited on
        h.pods.refuse["huge"] = refused_for_memory(8 << 30)
        h.ctl.report_demand({"huge": 1}, [], seen_version=h.ctl.table.version)
        assert await h.round() == ["Load huge@pod-1"]  # (the busier pod first)
        assert h.ctl.status()["load_errors"]["huge"] == (
            "no pod could make room for it: loading it takes up to 8.00 GiB; the most any pod could hold is 4.00 GiB")
        h.now = 0.3
        h.ctl.report_demand({"huge": 1}, [], seen_version=h.ctl.table.version)
        assert await h.round() == []  # not tried on the other pod: it waits out its backoff
        await h.client.aclose()
    run(go())


def test_placement_counts_the_memory_pods_report_not_only_what_they_declare() -> None:
    async def go() -> None:
        h = Harness([fn("m", model="random:smollm2-shape?seed=1"), fn("huge", model="random:smollm2-shape?seed=2")])
        h.ctl.weight_hints["random:smollm2-shape?seed=1"] = 900 << 20  # learned from an earlier refusal
        # both declare 1 GiB; pod-0 could take only 500 MiB now, pod-1 950 MiB
        h.pods.memory["pod-0"] = {"load_room_bytes": 500 << 20, "most_room_bytes": 800 << 20}
        h.pods.memory["pod-1"] = {"load_room_bytes": 950 << 20, "most_room_bytes": 1000 << 20}
        h.ctl.report_demand({"m": 1}, [], seen_version=h.ctl.table.version)
        assert await h.round() == ["Load m@pod-1"]
        snap = snapshot(0.0, list(h.ctl.pods.values()), h.ctl.functions, {}, weight_hints=h.ctl.weight_hints)
        assert {n.node_id: n.free_memory_bytes for n in snap.nodes} == {"pod-0": 500 << 20, "pod-1": 950 << 20}
        # a refusal for more than any pod could hold with everything unloaded: it cannot start
        h.pods.refuse["huge"] = refused_for_memory(1050 << 20)
        h.ctl.report_demand({"huge": 1}, [], seen_version=h.ctl.table.version)
        h.now = 0.1
        assert await h.round() == ["Load huge@pod-1"]
        # (1000 MiB: less than the 1 GiB both declare)
        assert h.ctl.status()["load_errors"]["huge"].endswith("the most any pod could hold is 0.98 GiB")
        await h.client.aclose()
    run(go())


def test_loads_refused_for_memory_again_and_again_are_published_after_three() -> None:
    # pods that declare more memory than they have keep refusing a model that fits on paper
    async def go() -> None:
        h = Harness([fn("m", model="random:smollm2-shape?seed=1")])
        h.pods.refuse["m"] = refused_for_memory(1 << 20)
        for i in range(3):
            h.now = i * 0.1
            h.ctl.report_demand({"m": 1}, [], seen_version=h.ctl.table.version)
            assert await h.round() == ["Load m@pod-0"]
            assert ("m" in h.ctl.load_failures) == (i == 2)
        why = h.ctl.status()["load_errors"]["m"]
        assert "refused it for lack of memory 3 times in a row" in why and "declare more memory" in why
        await h.client.aclose()
    run(go())


@pytest.mark.parametrize("body,status", [(b"{", 400), (b'{"name": "x"}', 400), (b'{"name": "x", "model": "m"}', 201)])
def test_deploy_validates_the_spec(body: bytes, status: int) -> None:
    from starlette.testclient import TestClient

    from autoscaler.service.api import create_api

    async def make() -> Controller:
        return Controller(NODES, {}, ControllerSettings(TOKEN), httpx.AsyncClient(transport=httpx.MockTransport(
            FakePods().handler)))

    ctl = run(make())
    with TestClient(create_api(ctl, TOKEN)) as c:
        assert c.post("/functions", content=body).status_code == 401
        r = c.post("/functions", content=body, headers={"Authorization": f"Bearer {TOKEN}"})
        assert r.status_code == status, r.text
        if status == 400:
            assert r.json()["error"]["code"] in ("invalid_json", "invalid_spec")
        else:
            assert "x" in ctl.functions


def test_a_fresh_instance_outlives_a_zero_keep_alive_until_its_requests_arrive() -> None:
    async def go() -> None:
        h = Harness([fn("a", keep_alive_s=0.0)])
        h.ctl.report_demand({"a": 1}, [], seen_version=h.ctl.table.version)
        assert await h.round() == ["Load a@pod-0"]
        h.now = 0.5
        assert await h.round() == []  # ready and published, idle, but its request is on the way
        h.now = 1.9
        assert await h.round() == []
        h.now = 2.6  # past the grace with no request: keep-alive 0 unloads it
        assert await h.round() == ["Unload a@pod-0"]
        await h.client.aclose()
    run(go())


def test_a_slow_pod_keeps_its_instances_and_its_loading_one_counts() -> None:
    async def go() -> None:
        h = Harness([fn("a"), fn("b")])
        h.pods.loaded["pod-0"] = {"a": "ready", "b": "loading"}
        assert await h.round() == []
        h.pods.slow.add("pod-0")  # b's load is profiling: status waits for the device thread
        h.ctl.report_demand({"b": 2}, [], seen_version=h.ctl.table.version)
        h.now = 1.0
        assert await h.round() == []  # not lost, not down; b is loading there already
        assert h.ctl.status()["lost"] == [] and all(n["up"] for n in h.ctl.status()["nodes"])
        assert [e.instance_id for e in h.ctl.table.endpoints_of("a")] == ["a@pod-0"]
        h.pods.slow.clear()
        h.pods.down.add("pod-0")  # now really gone
        h.now = 2.0
        assert await h.round() == ["Load b@pod-1", "Load a@pod-1"]  # most waiting first
        await h.client.aclose()
    run(go())


def test_arrival_counts_become_arrival_rates_in_the_snapshot_and_status() -> None:
    async def go() -> None:
        h = Harness([fn("a"), fn("b")])
        h.ctl.report_demand({}, arrived={"a": 30, "b": 3})
        h.now = 10.0
        h.ctl.report_demand({}, arrived={"a": 30})
        assert h.ctl.status()["arrival_rate_per_s"] == {"a": 0.2, "b": 0.01}  # over 300 s
        pods = await h.ctl.observe()
        snap = snapshot(h.now, pods, h.ctl.functions, {}, rates=h.ctl.rates.rates(h.now))
        assert snap.busier_than(FunctionId("b")) == {"a"}
        assert {"a", "b"} <= set(h.ctl.activity)  # arrivals still count as activity (keep-alive)
        h.now = 305.0  # the first report left the window
        assert h.ctl.status()["arrival_rate_per_s"] == {"a": 0.1}
        await h.client.aclose()
    run(go())


@pytest.mark.parametrize("body, status", [
    ({"waiting": {"a": 1}, "active": ["a"], "arrived": {"a": 2}, "routes_version": 3}, 200),
    ({"waiting": {}, "active": ["a"]}, 200),  # an activator that sends no counts
    ({"waiting": {}, "arrived": {"a": -1}}, 400),
    ({"waiting": {"a": -2}}, 400),
    ({"waiting": {}, "arrived": ["a"]}, 400),
    ({"waiting": {}, "arrived": {"a": "many"}}, 400),
    ({"waiting": {"a": 2.7}}, 400),
    ({"waiting": {"a": True}}, 400),
    ({"waiting": {}, "routes_version": "3"}, 400),
    (b'{"waiting": {"a": 1e400}}', 400),  # inf: int() of it raised OverflowError, a 500
    (b'{"waiting": {}, "routes_version": 1e400}', 400),
])
def test_demand_reports_are_validated(body: dict[str, Any] | bytes, status: int) -> None:
    from starlette.testclient import TestClient

    from autoscaler.service.api import create_api

    async def make() -> Controller:
        return Controller(NODES, {}, ControllerSettings(TOKEN), httpx.AsyncClient(transport=httpx.MockTransport(
            FakePods().handler)))

    ctl = run(make())
    with TestClient(create_api(ctl, TOKEN)) as c:
        auth = {"Authorization": f"Bearer {TOKEN}"}
        r = (c.post("/demand", content=body, headers={**auth, "content-type": "application/json"})
             if isinstance(body, bytes) else c.post("/demand", json=body, headers=auth))
        assert r.status_code == status, r.text
        if status == 400:
            assert r.json()["error"]["code"] == "invalid_demand"
        elif isinstance(body, dict) and "arrived" in body:
            assert ctl.status()["arrival_rate_per_s"] == {"a": round(2 / 300, 4)}


def test_cli_list_shows_why_a_function_cannot_load(monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from autoscaler.service import cli

    h = Harness([fn("a"), fn("b")])
    h.ctl.load_failures["a"] = LoadFailure("pod-0 could not load it: model '/m' not found", 1, 5.0)
    monkeypatch.setattr(cli, "_mesh", lambda state_dir: {})
    monkeypatch.setattr(cli, "_control", lambda info, method, path: httpx.Response(200, json=h.ctl.status()))
    cli.list_([])
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.startswith(("a ", "b "))}
    assert lines["a"].endswith("none: cannot load (pod-0 could not load it: model '/m' not found)")
    assert lines["b"].endswith("none (scaled to zero)")
    run(h.client.aclose())


@pytest.mark.parametrize("how", ["frozen", "stuck"])
def test_a_pod_frozen_or_stuck_is_taken_as_gone_at_once(how: str) -> None:
    async def go() -> None:
        h = Harness([fn("a")])
        h.pods.loaded["pod-0"] = {"a": "ready"}
        assert await h.round() == []
        # status times out, and /healthz either times out too (the process is frozen) or says the
        # device thread stalled: not a load holding the device thread
        (h.pods.frozen if how == "frozen" else h.pods.stuck).add("pod-0")
        h.now = 1.0
        assert await h.round() == ["Load a@pod-1"]
        assert [n["node"] for n in h.ctl.status()["nodes"] if not n["up"]] == ["pod-0"]
        assert [e.instance_id for e in h.ctl.table.endpoints_of("a")] == []  # no longer routed there
        assert h.ctl.table.gone == ("http://pod-0",)  # the activator cuts what is in flight there
        h.pods.frozen.clear()
        h.pods.stuck.clear()
        h.now = 2.0
        await h.round()
        assert h.ctl.table.gone == ()
        await h.client.aclose()
    run(go())


def test_a_pod_silent_past_the_limit_is_taken_as_gone_and_back_when_it_answers() -> None:
    async def go() -> None:
        h = Harness([fn("a")])
        h.pods.loaded["pod-0"] = {"a": "ready"}
        assert await h.round() == []
        h.pods.slow.add("pod-0")  # its device thread is stuck: every status times out
        for t in (1.0, 30.0, 60.5):
            h.now = t
            assert await h.round() == []  # a load may hold it this long: its instances stand
            assert [e.instance_id for e in h.ctl.table.endpoints_of("a")] == ["a@pod-0"]
        h.now = 61.5  # silent for 60.5 s since the first timeout at 1.0
        assert await h.round() == ["Load a@pod-1"]  # gone: a is re-placed, and no longer routed there
        assert h.ctl.status()["lost"] == ["a"] and [e.instance_id for e in h.ctl.table.endpoints_of("a")] == []
        h.now = 62.0
        await h.round()
        assert [e.instance_id for e in h.ctl.table.endpoints_of("a")] == ["a@pod-1"]
        h.pods.slow.clear()  # it answers again: back in the snapshot, with what it holds
        h.now = 63.0
        await h.round()
        assert {n["node"] for n in h.ctl.status()["nodes"] if n["up"]} == {"pod-0", "pod-1"}
        await h.client.aclose()
    run(go())


def test_a_pod_declaring_more_memory_than_it_has_is_warned_about_once(caplog: pytest.LogCaptureFixture) -> None:
    async def go() -> None:
        h = Harness([fn("a")])
        h.pods.memory["pod-0"] = {"load_room_bytes": 500 << 20, "most_room_bytes": 700 << 20}  # 1 GiB declared
        h.pods.memory["pod-1"] = {"load_room_bytes": 900 << 20, "most_room_bytes": 1000 << 20}  # + 64 MiB KV: enough
        for t in (0.0, 1.0):
            h.now = t
            await h.round()
        await h.client.aclose()
    with caplog.at_level("WARNING", logger="slinfer.autoscaler"):
        run(go())
    warned = [r.getMessage() for r in caplog.records if "declares" in r.getMessage()]
    assert warned == ["pod pod-0 declares 1024 MiB for weights and KV, but could hold 764 MiB (700 MiB of weights "
                      "beside its KV budget): placement counts the smaller"]
