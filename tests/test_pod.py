"""A runtime pod over real uvicorn: the admin API, instances sharing one device, admission
refusals as HTTP 429, eviction with continuation, unload with drain, the host weight cache."""

from __future__ import annotations

import json
import threading
from typing import Any

import httpx
import pytest
from conftest import ADMIN_TOKEN, TINY_POD, make_app, serve_app, tiny_spec

from functions import SLO
from runtime.pod import PodConfig

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
TINY = "random:llama-tiny?seed=0"


def spec_body(name: str, model: str = TINY, **kw: Any) -> dict[str, Any]:
    return {"name": name, "model": model, "max_context_tokens": 256, "max_output_tokens": 255, **kw}


def complete(base: str, model: str, prompt: Any, max_tokens: int = 12) -> httpx.Response:
    return httpx.post(f"{base}/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": max_tokens,
                                                      "temperature": 0}, timeout=60)


@pytest.fixture(scope="module")
def pod_url():
    with serve_app(make_app([tiny_spec("base", TINY)])) as base:
        yield base


def test_admin_api_needs_the_token(pod_url):
    assert httpx.get(f"{pod_url}/admin/status").status_code == 401
    assert httpx.get(f"{pod_url}/admin/status", headers={"Authorization": "Bearer nope"}).status_code == 401
    r = httpx.get(f"{pod_url}/admin/status", headers=AUTH)
    assert r.status_code == 200
    inst = {i["name"]: i for i in r.json()["instances"]}
    assert inst["base"]["state"] == "ready"
    assert [p[0] for p in inst["base"]["profile"]["prefill_ms"]] == [16, 64]  # measured on load
    # what the autoscaler compares with the deployed spec to find instances a redeploy made stale
    assert r.json()["functions"]["base"]["digest"] == tiny_spec("base", TINY).instance_digest


def test_load_serve_and_refuse_duplicates_and_bad_specs(pod_url):
    r = httpx.post(f"{pod_url}/admin/instances", json=spec_body("extra", "random:qwen2-tiny?seed=4"), headers=AUTH,
                   timeout=60)
    assert r.status_code == 201, r.text
    assert r.json()["state"] == "ready"
    assert "extra" in [m["id"] for m in httpx.get(f"{pod_url}/v1/models").json()["data"]]
    assert complete(pod_url, "extra", "hello").status_code == 200
    dup = httpx.post(f"{pod_url}/admin/instances", json=spec_body("extra"), headers=AUTH)
    assert dup.status_code == 409 and dup.json()["error"]["code"] == "already_loaded"
    bad = httpx.post(f"{pod_url}/admin/instances", json=spec_body("bad", slo={"tpot_s": -1}), headers=AUTH)
    assert bad.status_code == 400 and "slo.tpot_s" in bad.json()["error"]["message"]
    assert complete(pod_url, "base", "still serving").status_code == 200
    dev = httpx.get(f"{pod_url}/admin/status", headers=AUTH).json()["device"]
    assert dev["admission_decisions"] >= 2 and 0 < dev["admission_mean_us"] <= dev["admission_max_us"]


def test_a_function_whose_output_schema_cannot_be_kept_does_not_load(pod_url):
    # Checked where the model's tokenizer is: the pod, at load; the weights go back to the cache.
    bad = httpx.post(f"{pod_url}/admin/instances", json=spec_body("typed-bad", output_schema={"type": "nonsense"}),
                     headers=AUTH, timeout=60)
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_output_schema", bad.text
    assert "output_schema" in bad.json()["error"]["message"] and "nonsense" in bad.json()["error"]["message"]
    status = httpx.get(f"{pod_url}/admin/status", headers=AUTH).json()
    assert "typed-bad" not in {i["name"] for i in status["instances"] if i["state"] == "ready"}
    good = httpx.post(f"{pod_url}/admin/instances", headers=AUTH, timeout=60,
                      json=spec_body("typed-good", output_schema={"type": "object", "required": ["k"],
                                                                  "properties": {"k": {"enum": ["a", "b"]}},
                                                                  "additionalProperties": False}))
    assert good.status_code == 201, good.text
    out = complete(pod_url, "typed-good", "x", max_tokens=40).json()["choices"][0]
    assert json.loads(out["text"])["k"] in ("a", "b") and out["finish_reason"] == "stop"
    assert complete(pod_url, "base", "still serving").status_code == 200
    assert httpx.delete(f"{pod_url}/admin/instances/typed-good", headers=AUTH, timeout=60).status_code == 200
    (entry,) = [m for m in httpx.get(f"{pod_url}/admin/status", headers=AUTH).json()["weights_cache"]["models"]
                if m["ref"] == TINY]
    assert entry["pins"] == 1  # base only: the refused load gave its pin back


def test_two_functions_on_one_checkpoint_are_two_instances_sharing_weights(pod_url):
    for name in ("twin-a", "twin-b"):
        assert httpx.post(f"{pod_url}/admin/instances", json=spec_body(name), headers=AUTH, timeout=60).status_code == 201
    st = httpx.get(f"{pod_url}/admin/status", headers=AUTH).json()
    names = [i["name"] for i in st["instances"]]
    assert "twin-a" in names and "twin-b" in names
    (entry,) = [m for m in st["weights_cache"]["models"] if m["ref"] == TINY]
    assert entry["pins"] == 3  # base, twin-a, twin-b: one copy of the weights
    a, b = complete(pod_url, "twin-a", "same model"), complete(pod_url, "twin-b", "same model")
    assert a.json()["choices"][0]["text"] == b.json()["choices"][0]["text"]


def test_a_bfloat16_function_has_its_own_weights_at_half_the_memory(pod_url):
    r = httpx.post(f"{pod_url}/admin/instances", json=spec_body("half", dtype="bfloat16"), headers=AUTH, timeout=60)
    assert r.status_code == 201, r.text
    st = httpx.get(f"{pod_url}/admin/status", headers=AUTH).json()
    models = {m["ref"]: m for m in st["weights_cache"]["models"]}
    assert models[f"{TINY}#bfloat16"]["pins"] == 1  # not the float32 copy "base" uses
    assert models[f"{TINY}#bfloat16"]["bytes"] * 2 == models[TINY]["bytes"]
    assert st["functions"]["half"]["model"] == f"{TINY}#bfloat16"
    answer = complete(pod_url, "half", "a bfloat16 answer")
    assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 12
    assert httpx.delete(f"{pod_url}/admin/instances/half", headers=AUTH, timeout=60).status_code == 200
    st = httpx.get(f"{pod_url}/admin/status", headers=AUTH).json()
    assert {m["ref"]: m["pins"] for m in st["weights_cache"]["models"]}[f"{TINY}#bfloat16"] == 0  # unpinned


def test_a_bfloat16_function_on_a_cpu_without_bf16_instructions_is_loaded_with_a_warning(
        pod_url, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture):
    monkeypatch.setattr("runtime.pod.cpu_has_bf16", lambda: False)
    with caplog.at_level("WARNING", logger="runtime.pod"):
        r = httpx.post(f"{pod_url}/admin/instances", json=spec_body("slow-half", dtype="int8"), headers=AUTH, timeout=60)
    assert r.status_code == 201, r.text
    assert any("'slow-half' computes in int8" in m and "no bfloat16 instructions" in m for m in caplog.messages)
    assert httpx.get(f"{pod_url}/admin/status", headers=AUTH).json()["device"]["cpu_bf16"] is False
    assert httpx.delete(f"{pod_url}/admin/instances/slow-half", headers=AUTH, timeout=60).status_code == 200


def test_evict_mid_stream_ends_with_a_continuation_that_resumes_exactly(pod_url, request: pytest.FixtureRequest):
    assert httpx.post(f"{pod_url}/admin/instances", json=spec_body("victim"), headers=AUTH, timeout=60).status_code == 201
    prompt, n = "hello", 230
    whole = complete(pod_url, "base", prompt, max_tokens=n).json()
    assert whole["usage"]["completion_tokens"] == n, "this prompt must run to max_tokens (no early EOS)"
    full = whole["choices"][0]["text"]
    request.getfixturevalue("paced_device")  # after loading: profiling runs unpaced
    body = {"model": "victim", "prompt": prompt, "max_tokens": n, "temperature": 0, "stream": True}
    chunks: list[dict[str, Any]] = []
    evicted: dict[str, Any] = {}
    # Evict from the reading loop on the first token: 230 paced steps (>= 2.3 s) outlast one admin call.
    with httpx.stream("POST", f"{pod_url}/v1/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                chunks.append(json.loads(line[6:]))
                if len(chunks) == 1:
                    ev = httpx.post(f"{pod_url}/admin/instances/victim/evict", headers=AUTH, timeout=30)
                    assert ev.status_code == 200 and ev.json()["state"] == "evicted"
                    evicted = ev.json()
    assert evicted["evicted_requests"] == 1, "the stream finished before the eviction landed"
    last = chunks[-1]["choices"][0]
    assert last["finish_reason"] == "preempted"
    cont = last["continuation"]
    streamed = "".join(c["choices"][0]["text"] for c in chunks)
    assert 0 < len(cont["output_token_ids"]) < n
    assert 0 <= cont["first_token_age_s"] < 30  # its later tokens stay due TPOT apart from the first
    # Another instance of the same checkpoint continues from prompt + tokens so far.
    rest = complete(pod_url, "base", cont["prompt_token_ids"] + cont["output_token_ids"],
                    max_tokens=n - len(cont["output_token_ids"]))
    assert streamed + rest.json()["choices"][0]["text"] == full
    r = complete(pod_url, "victim", "x")
    assert r.status_code == 404 and "base" in r.json()["error"]["message"]


def test_hand_off_lets_short_work_finish_and_hands_the_rest_off_with_continuations(request: pytest.FixtureRequest):
    # What SIGTERM does (a rolling update): a short request finishes within the drain window, a
    # long stream leaves with a continuation, and the pod takes nothing new.
    with serve_app(make_app([tiny_spec("base", TINY)])) as url:
        request.getfixturevalue("paced_device")  # >= 10 ms a step: 230 tokens outlast the 1 s drain
        short: dict[str, httpx.Response] = {}
        body = {"model": "base", "prompt": "hello", "max_tokens": 230, "temperature": 0, "stream": True}
        chunks: list[dict[str, Any]] = []
        handed: dict[str, Any] = {}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    chunks.append(json.loads(line[6:]))
                    if len(chunks) == 1:
                        t = threading.Thread(target=lambda: short.update(r=complete(url, "base", "hi", max_tokens=20)))
                        t.start()
                        for _ in range(500):  # until the short one runs beside the stream
                            st = httpx.get(f"{url}/admin/status", headers=AUTH).json()
                            if sum(i["batch"] + i["waiting"] for i in st["instances"]) >= 2:
                                break
                        bad = httpx.post(f"{url}/admin/hand-off?drain_s=-1", headers=AUTH)
                        assert bad.status_code == 400
                        h = httpx.post(f"{url}/admin/hand-off?drain_s=1.0", headers=AUTH, timeout=30)
                        assert h.status_code == 200
                        handed = h.json()
        t.join(30)
        assert handed == {"handed_off": 1, "terminating": True}
        last = chunks[-1]["choices"][0]
        assert last["finish_reason"] == "preempted" and last["continuation"]["output_token_ids"]
        assert short["r"].status_code == 200 and short["r"].json()["usage"]["completion_tokens"] == 20
        assert httpx.get(f"{url}/healthz").json()["status"] == "terminating"
        assert httpx.get(f"{url}/admin/status", headers=AUTH).json()["terminating"] is True
        load = httpx.post(f"{url}/admin/instances", json=spec_body("late"), headers=AUTH, timeout=60)
        assert load.status_code == 503 and load.json()["error"]["code"] == "pod_terminating"


def test_unload_drains_then_reload_hits_the_weight_cache(pod_url):
    body = spec_body("drainee", "random:llama-tiny?seed=9")
    first = httpx.post(f"{pod_url}/admin/instances", json=body, headers=AUTH, timeout=60).json()
    assert first["weights_cached"] is False
    result: dict[str, Any] = {}

    def long_request() -> None:
        result["r"] = complete(pod_url, "drainee", "finish me", max_tokens=60)

    t = threading.Thread(target=long_request)
    t.start()
    for _ in range(200):  # wait until it runs
        st = httpx.get(f"{pod_url}/admin/status", headers=AUTH).json()
        if any(i["name"] == "drainee" and i["batch"] for i in st["instances"]):
            break
    un = httpx.delete(f"{pod_url}/admin/instances/drainee", headers=AUTH, timeout=60)
    t.join(60)
    assert un.status_code == 200 and un.json()["state"] == "unloaded"
    r = result["r"]
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length"
    assert r.json()["usage"]["completion_tokens"] == 60  # drained, not cut
    again = httpx.post(f"{pod_url}/admin/instances", json=body, headers=AUTH, timeout=60).json()
    assert again["weights_cached"] is True


def test_unloads_of_an_instance_that_is_draining_join_the_drain(pod_url):
    # An autoscaler that repeats itself (a retry, a second plan) while a drain runs: every call
    # gets the one answer, none is a 500, and the running request still ends on its own.
    body = spec_body("twice", "random:llama-tiny?seed=11")
    assert httpx.post(f"{pod_url}/admin/instances", json=body, headers=AUTH, timeout=60).status_code == 201
    result: dict[str, Any] = {}
    t = threading.Thread(target=lambda: result.update(r=complete(pod_url, "twice", "finish me", max_tokens=80)))
    t.start()
    for _ in range(200):
        st = httpx.get(f"{pod_url}/admin/status", headers=AUTH).json()
        if any(i["name"] == "twice" and i["batch"] for i in st["instances"]):
            break
    answers: list[httpx.Response] = []
    calls = [threading.Thread(target=lambda: answers.append(
        httpx.delete(f"{pod_url}/admin/instances/twice", headers=AUTH, timeout=60))) for _ in range(3)]
    for c in calls:
        c.start()
    for c in calls:
        c.join(60)
    t.join(60)
    assert [a.status_code for a in answers] == [200] * 3, [a.text for a in answers]
    assert {a.json()["state"] for a in answers} == {"unloaded"}
    assert result["r"].json()["usage"]["completion_tokens"] == 80  # drained, not cut by the repeats
    gone = httpx.delete(f"{pod_url}/admin/instances/twice", headers=AUTH, timeout=60)
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "instance_not_found"


def test_an_evict_during_a_drain_ends_it_now():
    with serve_app(make_app([], PodConfig(drain_timeout_s=60))) as base:
        body = spec_body("slow", "random:llama-tiny?seed=12")
        assert httpx.post(f"{base}/admin/instances?profile=false", json=body, headers=AUTH, timeout=60).status_code == 201
        req = {"model": "slow", "prompt": "go", "max_tokens": 240, "temperature": 0, "stream": True}
        got: dict[str, Any] = {}
        with httpx.stream("POST", f"{base}/v1/completions", json=req, timeout=60) as stream:
            lines = stream.iter_lines()
            next(line for line in lines if line.startswith("data: {"))  # it runs
            drain = threading.Thread(target=lambda: got.update(
                drain=httpx.delete(f"{base}/admin/instances/slow", headers=AUTH, timeout=60)))
            drain.start()
            for _ in range(200):  # until the pod says it drains
                state = httpx.get(f"{base}/admin/status", headers=AUTH).json()["functions"]["slow"]["state"]
                if state == "draining":
                    break
            assert state == "draining"
            ev = httpx.post(f"{base}/admin/instances/slow/evict", headers=AUTH, timeout=60)
            drain.join(60)
            rest = list(lines)
        assert ev.status_code == 200 and ev.json()["evicted_requests"] == 1, ev.text
        assert got["drain"].status_code == 200 and got["drain"].json() == ev.json()  # one removal, one answer
        assert ev.json()["state"] == "evicted"
        assert any("continuation" in line for line in rest), rest[-3:]  # it left to go on elsewhere


def test_admission_refusals_are_429_with_reason_and_retry_after():
    # 12 blocks of 16 tokens in the whole pod: a request that may generate up to 240 tokens
    # reserves prompt + 512 look-ahead, capped at the 256-token context = 16 blocks: it cannot fit.
    bpb = 2 * 4 * 16 * 2 * 32 * 4  # llama-tiny: layers 4, kv heads 2, head dim 32, fp32
    small = PodConfig(block_size=16, kv_budget_bytes=12 * bpb)
    with serve_app(make_app([], small)) as base:
        r = httpx.post(f"{base}/admin/instances?profile=false", json=spec_body("m"), headers=AUTH, timeout=60)
        assert r.status_code == 201, r.text
        r = complete(base, "m", "hello", max_tokens=240)
        assert r.status_code == 429, r.text
        assert r.json()["error"]["code"] == "memory" and int(r.headers["Retry-After"]) >= 1
    # A TTFT no prefill can meet, while the device has other work (an idle device admits
    # anything that fits): refused on prefill, and the pod keeps serving the others.
    with serve_app(make_app([tiny_spec("strict", TINY, slo=SLO(ttft_base_s=1e-6, prefill_rate_tok_s=1e9)),
                             tiny_spec("easy", TINY)], TINY_POD)) as base:
        body = {"model": "easy", "prompt": "hello", "max_tokens": 230, "temperature": 0, "stream": True}
        refused: list[httpx.Response] = []
        finish = None
        with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=60) as busy:
            for line in busy.iter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[6:])["choices"][0]
                finish = chunk["finish_reason"] or finish
                if not refused:  # first token of the busy stream: the device is working
                    refused.append(complete(base, "strict", "a prompt of some length"))
                    refused.append(httpx.post(f"{base}/v1/completions", timeout=30,
                                              json={"model": "strict", "prompt": "x", "stream": True}))
        r, s = refused
        assert r.status_code == 429 and r.json()["error"]["code"] == "prefill", r.text
        assert s.status_code == 429  # streaming is refused before any byte is sent
        assert finish == "length"  # the busy stream ran to its end
        assert complete(base, "easy", "hello").status_code == 200
        metrics = httpx.get(f"{base}/metrics").text
        assert 'slinfer_admission_refusals_total{model="strict",reason="prefill"} 2.0' in metrics


def test_unload_returns_weights_and_kv_to_the_os_when_the_cache_is_full():
    # No room in the host weight cache: unloading must give the 538 MB back (process RSS).
    cfg = PodConfig(block_size=16, kv_budget_bytes=64 << 20, weight_cache_bytes=0)
    with serve_app(make_app([], cfg)) as base:
        before = httpx.get(f"{base}/admin/status", headers=AUTH).json()["rss_bytes"]
        body = spec_body("big", "random:smollm2-shape?seed=0")
        assert httpx.post(f"{base}/admin/instances?profile=false", json=body, headers=AUTH, timeout=120).status_code == 201
        assert complete(base, "big", "hi", max_tokens=2).status_code == 200
        loaded = httpx.get(f"{base}/admin/status", headers=AUTH).json()["rss_bytes"]
        assert loaded - before > 400e6
        after = httpx.delete(f"{base}/admin/instances/big", headers=AUTH, timeout=60).json()["rss_bytes"]
        assert loaded - after > 400e6, (before, loaded, after)
        assert after - before < 100e6, (before, loaded, after)  # all of it, not only the load's spare copies


def test_a_load_that_would_not_fit_in_memory_is_refused_before_it_starts():
    # The pod's memory as a test sets it: a model too big for what is left is refused with 507
    # and its size (what the autoscaler learns), the function already there serves on, and the
    # same load goes through once there is room.
    from conftest import ADMIN_TOKEN as token

    from runtime.host_memory import MemoryReading
    from runtime.pod import Pod
    from runtime.server.app import create_app

    free = [300 << 20]
    pod = Pod(TINY_POD, memory=lambda: MemoryReading(1 << 30, free[0], "configured"))
    with serve_app(create_app(pod, admin_token=token, functions=[tiny_spec("base", TINY)])) as base:
        big = spec_body("big", "random:smollm2-shape?seed=0")
        r = httpx.post(f"{base}/admin/instances?profile=false", json=big, headers=AUTH, timeout=120)
        assert r.status_code == 507, r.text
        err = r.json()["error"]
        assert err["code"] == "insufficient_memory" and err["weight_bytes"] == 542254336  # float32 SmolLM2 shape
        assert err["needed_bytes"] > err["weight_bytes"] and err["spare_bytes"] <= 300 << 20
        assert "GiB of host memory" in err["message"] and "KV budget kept free" in err["message"]
        st = httpx.get(f"{base}/admin/status", headers=AUTH).json()
        assert [m["ref"] for m in st["weights_cache"]["models"]] == [TINY]  # nothing was read
        assert st["functions"]["big"]["state"] == "failed"
        mem, dev = st["memory"], st["device"]
        assert (mem["limit_bytes"], mem["available_bytes"], mem["source"]) == (1 << 30, 300 << 20, "configured")
        # what the autoscaler places by: the KV budget not yet allocated is kept free; with every
        # instance gone the cached weights and all KV would be free, the whole budget still kept
        cached = sum(m["bytes"] for m in st["weights_cache"]["models"])
        assert mem["load_room_bytes"] == (300 << 20) - (dev["kv_budget_bytes"] - dev["kv_bytes"])
        assert mem["most_room_bytes"] == (300 << 20) + cached + dev["kv_bytes"] - dev["kv_budget_bytes"]
        assert complete(base, "base", "still serving").status_code == 200
        small = httpx.post(f"{base}/admin/instances?profile=false", json=spec_body("small", "random:qwen2-tiny?seed=3"),
                           headers=AUTH, timeout=60)
        assert small.status_code == 201, small.text  # a model that fits loads beside it
        free[0] = 2 << 30
        r = httpx.post(f"{base}/admin/instances?profile=false", json=big, headers=AUTH, timeout=120)
        assert r.status_code == 201, r.text
        assert complete(base, "big", "hi", max_tokens=2).status_code == 200


def test_healthz_fails_while_the_device_thread_makes_no_progress():
    # A thread alive but stuck (here: a call that holds it 1.5 s) is what a liveness probe must
    # catch; requests and status wait for it meanwhile, /healthz does not.
    import asyncio
    import dataclasses
    import time

    from runtime.pod import Pod
    from runtime.server.app import create_app

    pod = Pod(dataclasses.replace(TINY_POD, stall_timeout_s=0.5))
    with serve_app(create_app(pod, admin_token=ADMIN_TOKEN, functions=[])) as base:
        assert httpx.get(f"{base}/healthz").status_code == 200
        loop = pod.device._loop
        assert loop is not None
        held = asyncio.run_coroutine_threadsafe(pod.device.call(lambda dev: time.sleep(1.5)), loop)
        time.sleep(1.0)
        r = httpx.get(f"{base}/healthz", timeout=5)
        assert r.status_code == 503 and "no progress for 1 s" in r.json()["reason"], r.text
        held.result(timeout=10)
        time.sleep(0.1)
        assert httpx.get(f"{base}/healthz").status_code == 200  # it came round again
