"""The embedded mesh end to end with real processes on loopback: two runtime pods as child
processes, the autoscaler and the activator (what `slinfer up` runs), tiny random models.

The tests run in file order and share one mesh; each names its own functions, and a test that
needs a quiet mesh waits for it by polling the autoscaler's status, never by sleeping."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import pytest

from activator.app import ActivatorSettings
from autoscaler.service.controller import ControllerSettings
from autoscaler.service.local import PodResources
from autoscaler.service.mesh import MeshHandle, MeshSettings, mesh_in_thread
from functions import FunctionSpec

TOKEN = "mesh-test-token"
LLAMA = "random:llama-tiny?seed=0"
QWEN = "random:qwen2-tiny?seed=1"


def fn(name: str, model: str = LLAMA, **kw: Any) -> FunctionSpec:
    return FunctionSpec(name=name, model=model, **{"max_context_tokens": 256, "max_output_tokens": 255,
                                                   "keep_alive_s": 30.0, **kw})


FUNCTIONS = (
    fn("alpha", keep_alive_s=2.0),  # scale from zero, keep-alive
    fn("beta"),  # shares a pod with gamma, then its pod is killed under load
    fn("gamma", QWEN),
    fn("delta", timeout_s=60.0),  # waits through an autoscaler restart
)


@pytest.fixture(scope="module")
def mesh() -> Iterator[MeshHandle]:
    settings = MeshSettings(FUNCTIONS, TOKEN, pods=2, port=0, autoscaler_port=0,
                            resources=PodResources(kv_budget_mb=32, weight_cache_mb=512, memory_mb=2048, threads=1,
                                                   shutdown_drain_s=0.0),  # SIGTERM hands off at once
                            controller=ControllerSettings(TOKEN, profile=False),
                            activator=ActivatorSettings(demand_interval_s=0.1))
    with mesh_in_thread(settings) as handle:
        yield handle


def status(mesh: MeshHandle) -> dict[str, Any]:
    r = httpx.get(f"{mesh.autoscaler_url}/status", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
    r.raise_for_status()
    return r.json()  # type: ignore[no-any-return]


def placed(mesh: MeshHandle, function: str, state: str = "ready") -> list[str]:
    """The nodes holding an instance of ``function`` in ``state``."""
    return [n["node"] for n in status(mesh)["nodes"] for i in n["instances"]
            if i["function"] == function and i["state"] == state]


def hosted(mesh: MeshHandle, function: str) -> list[str]:
    """Nodes with an instance of ``function`` or a load of it under way."""
    st = status(mesh)
    nodes = {n["node"] for n in st["nodes"] for i in n["instances"] if i["function"] == function}
    return sorted(nodes | {x["node"] for x in st["loads_in_flight"] if x["function"] == function})


def wait_until(cond: Callable[[], Any], what: str, timeout_s: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = cond()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out after {timeout_s} s waiting until {what}"
        time.sleep(0.05)


def chat(mesh: MeshHandle, function: str, content: str = "hello", **kw: Any) -> httpx.Response:
    body = {"model": function, "messages": [{"role": "user", "content": content}], "temperature": 0, **kw}
    return httpx.post(f"{mesh.url}/v1/chat/completions", json=body, timeout=120)


def metric(url: str, name: str, **labels: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(f"{name}{{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def pod_admin(mesh: MeshHandle, node: str) -> dict[str, Any]:
    url = next(n["url"] for n in status(mesh)["nodes"] if n["node"] == node)
    return httpx.get(f"{url}/admin/status", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10).json()  # type: ignore[no-any-return]


def test_scale_from_zero_answers_without_error(mesh: MeshHandle) -> None:
    assert hosted(mesh, "alpha") == []
    client = openai.OpenAI(base_url=f"{mesh.url}/v1", api_key="unused", max_retries=0)
    r = client.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "hello"}],
                                       max_tokens=120, temperature=0)
    assert r.choices[0].finish_reason == "length" and r.usage is not None and r.usage.completion_tokens == 120
    # One instance: while the request ran on it, it was not reported as demand again.
    assert len(hosted(mesh, "alpha")) == 1
    # The activator reported its arrival, so the autoscaler knows alpha's arrival rate (preemption).
    wait_until(lambda: status(mesh)["arrival_rate_per_s"].get("alpha", 0) > 0, "alpha's rate is reported", 5)


def test_idle_function_is_unloaded_after_keep_alive_and_reloaded_on_demand(mesh: MeshHandle) -> None:
    wait_until(lambda: hosted(mesh, "alpha") == [], "alpha is unloaded after its 2 s keep-alive")
    r = chat(mesh, "alpha", max_tokens=3)
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length"
    (node,) = wait_until(lambda: hosted(mesh, "alpha"), "alpha is placed again")
    cache = pod_admin(mesh, node)["weights_cache"]
    assert cache["hits"] >= 1  # the second load took the weights from the pod's host cache


def test_two_functions_share_one_pod(mesh: MeshHandle) -> None:
    wait_until(lambda: hosted(mesh, "alpha") == [], "the mesh is empty again")
    assert chat(mesh, "beta", max_tokens=3).status_code == 200
    assert chat(mesh, "gamma", max_tokens=3).status_code == 200
    (b,) = placed(mesh, "beta")
    (g,) = placed(mesh, "gamma")
    assert b == g  # packing: the non-empty pod first, the other stays empty
    insts = {i["name"] for i in pod_admin(mesh, b)["instances"]}
    assert {"beta", "gamma"} <= insts


def test_killed_pod_requests_complete_elsewhere_and_lost_instances_are_replaced(mesh: MeshHandle) -> None:
    (victim,) = placed(mesh, "beta")
    assert placed(mesh, "gamma") == [victim]
    index = int(victim.removeprefix("pod-"))
    results: list[httpx.Response] = []

    def request() -> None:
        results.append(chat(mesh, "beta", max_tokens=150))

    threads = [threading.Thread(target=request) for _ in range(4)]
    for t in threads:
        t.start()
    wait_until(lambda: any(i["name"] == "beta" and i["batch"] + i["waiting"] > 0
                           for i in pod_admin(mesh, victim)["instances"]), "beta is serving on its pod")
    mesh.mesh.pods.kill(index)  # SIGKILL: no drain, no goodbye
    for t in threads:
        t.join(120)
    assert [r.status_code for r in results] == [200] * 4, [r.text[:200] for r in results]
    assert all(r.json()["choices"][0]["finish_reason"] in ("length", "stop") for r in results)
    # gamma got no request after the kill: the autoscaler re-placed it because it was lost.
    wait_until(lambda: placed(mesh, "gamma"), "the lost gamma instance is re-placed", 60)
    wait_until(lambda: all(n["up"] for n in status(mesh)["nodes"]), "the killed pod is restarted", 60)
    assert mesh.mesh.pods.children[index].restarts == 1


def _stream_cut_by(mesh: MeshHandle, stop_pod: Callable[[int], None], counter: str) -> None:
    """Stream a long greedy chat from beta, stop its pod on the second piece with ``stop_pod``;
    the client must see one unbroken stream equal to an uninterrupted run, moved once (``counter``)."""
    wait_until(lambda: all(n["up"] for n in status(mesh)["nodes"]), "both pods are up", 60)
    n = 255
    for prompt in ("hello", "a rolling update", "go on", "more", "and then"):  # one that runs long (random weights)
        plain = chat(mesh, "beta", prompt, max_tokens=n).json()["choices"][0]
        want, want_finish = plain["message"]["content"], plain["finish_reason"]
        if len(want) > 100:  # long enough to be cut mid-stream
            break
    assert len(want) > 100
    (node,) = placed(mesh, "beta")
    index = int(node.removeprefix("pod-"))
    moves = metric(mesh.url, counter, function="beta")
    body = {"model": "beta", "messages": [{"role": "user", "content": prompt}], "temperature": 0,
            "max_tokens": n, "stream": True}
    pieces: list[str] = []
    finish, errors = None, []
    with httpx.stream("POST", f"{mesh.url}/v1/chat/completions", json=body, timeout=120) as r:
        for line in r.iter_lines():
            assert not line.startswith(":"), "a pod's note reached the client"
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                errors.append(chunk["error"])
                continue
            if len(pieces) == 2:
                stop_pod(index)
            choice = chunk["choices"][0]
            pieces.append(choice["delta"].get("content") or "")
            finish = choice.get("finish_reason") or finish
    assert errors == [] and finish == want_finish
    assert "".join(pieces) == want
    assert metric(mesh.url, counter, function="beta") == moves + 1
    wait_until(lambda: mesh.mesh.pods.children[index].proc.poll() is None and all(n["up"] for n in status(mesh)["nodes"]),
               "the stopped pod is restarted", 60)


def test_a_terminated_pod_hands_its_streams_off_to_another(mesh: MeshHandle) -> None:
    # SIGTERM (a rolling update, a node drain) mid-stream: the pod evicts its instances with
    # continuations before it exits, and the activator continues the stream on the other pod;
    # the client sees one unbroken stream, equal to an uninterrupted greedy run.
    _stream_cut_by(mesh, mesh.mesh.pods.terminate, "slinfer_activator_continuations_total")


def test_a_stream_whose_pod_is_killed_goes_on_elsewhere(mesh: MeshHandle) -> None:
    # SIGKILL (OOM kill, node loss) mid-stream: no continuation from the pod; the activator resumes
    # from the token ids the pod's notes named, on the other pod once the autoscaler has re-placed
    # the function there, and the client still sees one unbroken stream equal to a greedy run.
    _stream_cut_by(mesh, mesh.mesh.pods.kill, "slinfer_activator_failovers_total")


def test_restarting_the_autoscaler_loses_no_waiting_request(mesh: MeshHandle) -> None:
    assert hosted(mesh, "delta") == []
    mesh.call(mesh.mesh.stop_autoscaler())
    result: dict[str, httpx.Response] = {}
    t = threading.Thread(target=lambda: result.setdefault("r", chat(mesh, "delta", max_tokens=4)))
    t.start()

    def queued() -> bool:
        text = httpx.get(f"{mesh.url}/metrics").text
        return 'slinfer_activator_queue_depth{function="delta"} 1.0' in text

    wait_until(queued, "the request waits in the activator")
    assert t.is_alive()
    mesh.call(mesh.mesh.start_autoscaler())
    t.join(60)
    r = result["r"]
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length"
    assert placed(mesh, "delta")


def test_the_autoscaler_api_refuses_a_body_over_the_limit(mesh: MeshHandle) -> None:
    # Internal and token-protected, but it parses what it is sent: the activator's 8 MiB limit.
    auth = {"Authorization": f"Bearer {TOKEN}", "content-type": "application/json"}
    r = httpx.post(f"{mesh.autoscaler_url}/functions", content=b"[" + b" " * (9 << 20) + b"]", headers=auth, timeout=30)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large", r.text
    assert httpx.get(f"{mesh.autoscaler_url}/status", headers=auth, timeout=10).status_code == 200


def test_a_model_that_cannot_load_is_answered_at_once_with_why(mesh: MeshHandle) -> None:
    api = f"{mesh.autoscaler_url}/functions"
    auth = {"Authorization": f"Bearer {TOKEN}"}
    spec = fn("epsilon", "random:nope").to_dict()
    assert httpx.post(api, json=spec, headers=auth, timeout=10).status_code == 201
    t0 = time.monotonic()
    r = chat(mesh, "epsilon", max_tokens=3)  # its timeout_s is 300 s: no waiting it out
    assert r.status_code == 503, r.text
    err = r.json()["error"]
    assert err["code"] == "function_unavailable" and time.monotonic() - t0 < 30
    assert "function 'epsilon' cannot start: pod-" in err["message"]
    assert "unknown random preset 'nope'" in err["message"]  # the pod's own words
    assert "unknown random preset 'nope'" in status(mesh)["load_errors"]["epsilon"]
    assert chat(mesh, "alpha", max_tokens=2).status_code == 200  # nothing else is affected
    # Redeployed with a model that loads: served, and the error is gone.
    spec["model"] = LLAMA
    assert httpx.post(api, json=spec, headers=auth, timeout=10).status_code == 201
    # (the activator learns the new table by long-poll, a moment after the 201)
    r = wait_until(lambda: (x := chat(mesh, "epsilon", max_tokens=3)).status_code != 503 and x, "epsilon is served", 30)
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length", r.text
    assert "epsilon" not in status(mesh)["load_errors"]


def test_a_redeployed_function_serves_its_new_model_with_no_failed_request(mesh: MeshHandle) -> None:
    api = f"{mesh.autoscaler_url}/functions"
    auth = {"Authorization": f"Bearer {TOKEN}"}
    new_model = "random:llama-tiny?seed=5"
    for spec in (fn("zeta"), fn("zeta-ref", new_model)):
        assert httpx.post(api, json=spec.to_dict(), headers=auth, timeout=10).status_code == 201
    wait_until(lambda: chat(mesh, "zeta", max_tokens=1).status_code == 200, "zeta is served")
    old = chat(mesh, "zeta", max_tokens=8).json()["choices"][0]["message"]["content"]
    new = chat(mesh, "zeta-ref", max_tokens=8).json()["choices"][0]["message"]["content"]
    assert old != new  # the two models answer differently
    statuses: list[int] = []
    done = threading.Event()

    def callers() -> None:  # a steady caller through the redeploy
        while not done.is_set():
            statuses.append(chat(mesh, "zeta", max_tokens=4).status_code)

    t = threading.Thread(target=callers)
    t.start()
    try:
        assert httpx.post(api, json=fn("zeta", new_model).to_dict(), headers=auth, timeout=10).status_code == 201
        wait_until(lambda: chat(mesh, "zeta", max_tokens=8).json()["choices"][0]["message"]["content"] == new,
                   "zeta answers with its new model")
    finally:
        done.set()
        t.join(60)
    assert statuses and set(statuses) == {200}, statuses
    (node,) = wait_until(lambda: placed(mesh, "zeta"), "one instance of zeta")
    assert pod_admin(mesh, node)["functions"]["zeta"]["digest"] == fn("zeta", new_model).instance_digest


@pytest.mark.slow
def test_smollm2_example_function_from_zero_through_the_openai_client() -> None:
    """The shipped example `chat` (bundled SmolLM2) in a mesh of one pod: the first request
    loads it and the answer streams back through the official client."""
    from autoscaler.service.cli import EXAMPLES_DIR
    from functions import load_function_spec

    chat_fn = load_function_spec(EXAMPLES_DIR / "chat.yaml")
    settings = MeshSettings((chat_fn,), TOKEN, pods=1, port=0, autoscaler_port=0,
                            resources=PodResources(kv_budget_mb=128, threads=2),
                            controller=ControllerSettings(TOKEN, profile=False))
    with mesh_in_thread(settings) as m:
        client = openai.OpenAI(base_url=f"{m.url}/v1", api_key="unused", max_retries=0)
        stream = client.chat.completions.create(
            model="chat", messages=[{"role": "user", "content": "What is the capital of France?"}],
            temperature=0, max_tokens=24, stream=True)
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        assert "Paris" in text


def test_a_frozen_pod_fails_its_liveness_probes_and_is_restarted() -> None:
    # SIGSTOP freezes a pod whole (as a hung device or a stuck runtime would leave it): its
    # process lives, so only the probes can tell. The supervisor kills and restarts it.
    import asyncio
    import os
    import signal

    from autoscaler.service.local import LocalPods

    async def go() -> None:
        pods = LocalPods(1, TOKEN, PodResources(kv_budget_mb=32, threads=1))
        pods.start()
        try:
            await pods.wait_ready()
            child = pods.children[0]
            assert child.proc is not None
            frozen = child.proc.pid
            supervisor = asyncio.create_task(pods.supervise(poll_s=0.05, probe_s=0.3, probe_timeout_s=0.5,
                                                            failure_threshold=2))
            await asyncio.sleep(1.0)
            assert child.proc.pid == frozen and child.failed_probes == 0  # healthy: left alone
            os.kill(frozen, signal.SIGSTOP)
            deadline = time.monotonic() + 30
            while child.proc.pid == frozen and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            assert child.proc.pid != frozen and child.restarts == 1
            await pods.wait_ready()
            async with httpx.AsyncClient() as c:
                assert (await c.get(pods.url(0) + "/healthz")).status_code == 200
            supervisor.cancel()
        finally:
            pods.stop()

    asyncio.run(go())
