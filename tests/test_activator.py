"""The activator over real loopback servers: two runtime pods (in-process uvicorn, tiny random
models) and an activator given a fixed route table (no autoscaler: its seam is the RouteSource)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import openai
import pytest
from cloudevents.core.bindings.http import HTTPMessage, from_http_event, to_binary_event, to_structured_event
from cloudevents.core.v1.event import CloudEvent
from conftest import ADMIN_TOKEN, make_app, serve_app, slow_post

from activator.app import ActivatorSettings, create_app
from activator.routes import Endpoint, RouteTable, StaticRouteSource
from functions import FunctionSpec

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
TINY = "random:llama-tiny?seed=0"
EVENT_FN = "summarize-tiny"
TYPED_FN, CUT_FN = "typed", "typed-cut"  # functions with an output_schema; the second's answers are cut
TYPED_SCHEMA = {"type": "object", "required": ["label", "score"], "additionalProperties": False,
                "properties": {"label": {"enum": ["yes", "no"]}, "score": {"type": "integer", "minimum": 0, "maximum": 9}}}


@dataclass(frozen=True)
class Setup:
    url: str  # the activator
    pods: tuple[str, ...]
    specs: dict[str, FunctionSpec]
    source: StaticRouteSource


BROKEN_WHY = "pod-0 could not load it: cannot load model 'random:nope': unknown random preset 'nope'"


def spec(name: str, **kw: Any) -> FunctionSpec:
    return FunctionSpec(name=name, model=TINY, **{"max_context_tokens": 256, "max_output_tokens": 255, **kw})


@pytest.fixture(scope="module")
def setup() -> Iterator[Setup]:
    """Pods a and b both serve "tiny" and the event function; "cold" is deployed but has no
    instance and a 2 s timeout; "broken" has no instance because its model failed to load; the
    activator queues at most 1 request per function."""
    tiny = spec("tiny")
    event_fn = spec(EVENT_FN, event_template="Summarize: {data}", event_type="dev.example.summary",
                    event_source="/tests/summarize", max_output_tokens=8)
    cold = spec("cold", timeout_s=2.0)
    broken = spec("broken", timeout_s=60.0)
    typed = spec(TYPED_FN, output_schema=json.dumps(TYPED_SCHEMA), event_type="dev.example.typed")
    cut = spec(CUT_FN, output_schema=json.dumps(TYPED_SCHEMA), max_output_tokens=4)
    with serve_app(make_app([tiny, event_fn, typed, cut])) as a, serve_app(make_app([tiny])) as b:
        eps = {"tiny": (Endpoint("tiny@a", "a", a), Endpoint("tiny@b", "b", b)),
               EVENT_FN: (Endpoint(f"{EVENT_FN}@a", "a", a),),
               TYPED_FN: (Endpoint(f"{TYPED_FN}@a", "a", a),), CUT_FN: (Endpoint(f"{CUT_FN}@a", "a", a),)}
        specs = {s.name: s for s in (tiny, event_fn, cold, broken, typed, cut)}
        source = StaticRouteSource(RouteTable(1, specs, eps, {"broken": BROKEN_WHY}))
        settings = ActivatorSettings(queue_limit=1, first_routes_timeout_s=1.0, demand_interval_s=0.1)
        with serve_app(create_app(settings, source)) as url:
            yield Setup(url, (a, b), specs, source)


def complete(url: str, model: str, prompt: str | list[int], **kw: Any) -> httpx.Response:
    body = {"model": model, "prompt": prompt, "temperature": 0, **kw}
    return httpx.post(f"{url}/v1/completions", json=body, timeout=60)


def stream_text(url: str, body: dict[str, Any], on_chunk: Any = None) -> tuple[str, list[dict[str, Any]], int]:
    """(text, parsed chunks, [DONE] count) of a streamed completion or chat."""
    chunks: list[dict[str, Any]] = []
    done = 0
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    with httpx.stream("POST", url + path, json={**body, "stream": True}, timeout=60) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line == "data: [DONE]":
                done += 1
            elif line.startswith("data: {"):
                chunks.append(json.loads(line[6:]))
                if on_chunk is not None:
                    on_chunk(len(chunks))
    text = "".join((c["choices"][0].get("text") or c["choices"][0].get("delta", {}).get("content") or "")
                   for c in chunks if c.get("choices"))
    return text, chunks, done


def counts(usage: dict[str, Any]) -> dict[str, Any]:
    """Usage but the prompt's cached tokens, which depend on what the pod served before; where
    the pod named them, the client's share is at most its prompt."""
    details = usage.get("prompt_tokens_details")
    if details is not None:
        assert 0 <= details["cached_tokens"] <= usage["prompt_tokens"]
    return {k: v for k, v in usage.items() if k != "prompt_tokens_details"}


def logprobs_ask(chat: bool) -> dict[str, Any]:
    return {"logprobs": True, "top_logprobs": 2} if chat else {"logprobs": 2}


def logprob_trail(choices: list[dict[str, Any]]) -> tuple[list[str], list[float], list[list[str]], set[str]]:
    """(tokens, logprobs, each token's alternatives, shapes) of a response's choices in order, in
    OpenAI's chat shape or the completions API's; checks that text_offset runs on across them."""
    tokens: list[str] = []
    values: list[float] = []
    tops: list[list[str]] = []
    shapes: set[str] = set()
    for ch in choices:
        lp = ch.get("logprobs")
        if not lp:
            continue
        if "content" in lp:
            shapes.add("chat")
            tokens += [e["token"] for e in lp["content"]]
            values += [e["logprob"] for e in lp["content"]]
            tops += [[t["token"] for t in e["top_logprobs"]] for e in lp["content"]]
        else:
            shapes.add("completion")
            assert lp["text_offset"] == [sum(len(t) for t in tokens + lp["tokens"][:i]) for i in range(len(lp["tokens"]))]
            tokens += lp["tokens"]
            values += [1.0 if v is None else v for v in lp["token_logprobs"]]  # an echo's first has none
            tops += [sorted(top or []) for top in lp["top_logprobs"]]
    return tokens, values, tops, shapes


def assert_same_logprobs(got: list[dict[str, Any]], want: list[dict[str, Any]], n: int) -> None:
    (t1, v1, top1, s1), (t2, v2, top2, s2) = logprob_trail(got), logprob_trail(want)
    assert len(t2) == n and len(s2) == 1
    assert (t1, top1, s1) == (t2, top2, s2) and v1 == pytest.approx(v2, abs=1e-4)


def metric(url: str, name: str, default: float | None = None, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(f"{name}{{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    if default is not None:
        return default
    raise AssertionError(f"no {name}{{{want}}} in /metrics")


def still_serving(url: str) -> None:
    r = complete(url, "tiny", "still there?", max_tokens=3)
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length"


# -- routing ------------------------------------------------------------------------------------
def test_openai_client_chat_stream_and_models(setup: Setup) -> None:
    client = openai.OpenAI(base_url=f"{setup.url}/v1", api_key="unused", max_retries=0)
    assert {m.id for m in client.models.list()} == set(setup.specs)
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=6, temperature=0)
    assert r.choices[0].finish_reason == "length" and r.usage is not None and r.usage.completion_tokens == 6
    chunks = list(client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=6, temperature=0, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == r.choices[0].message.content
    comp = client.completions.create(model="tiny", prompt="abc", max_tokens=4, temperature=0)
    assert comp.choices[0].text == complete(setup.pods[0], "tiny", "abc", max_tokens=4).json()["choices"][0]["text"]


def test_names_a_client_makes_up_do_not_become_metric_labels(setup: Setup) -> None:
    for i in range(3):
        assert httpx.post(f"{setup.url}/functions/made-up-{i}", content=b"x").status_code == 404
    text = httpx.get(f"{setup.url}/metrics").text
    assert "made-up" not in text
    assert metric(setup.url, "slinfer_activator_errors_total", function="-", code="function_not_found") >= 3


def test_unknown_function_is_404_listing_the_deployed_ones(setup: Setup) -> None:
    r = httpx.post(f"{setup.url}/v1/chat/completions", json={"model": "nope", "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 404
    err = r.json()["error"]
    assert err["code"] == "function_not_found" and "deployed: broken, cold, summarize-tiny, tiny, typed, typed-cut" in err["message"]
    assert httpx.post(f"{setup.url}/functions/nope", content=b"x").status_code == 404
    still_serving(setup.url)


@pytest.mark.parametrize("chunked", [False, True])
def test_a_body_over_the_size_limit_is_413(setup: Setup, chunked: bool) -> None:
    # 9 MiB (the limit is 8): refused before anything reads it whole, the pods never see it
    from functions.http import MAX_REQUEST_BYTES

    raw = json.dumps({"model": "tiny", "prompt": "x" * (9 << 20), "max_tokens": 2}).encode()
    content: Any = (raw[i:i + (1 << 20)] for i in range(0, len(raw), 1 << 20)) if chunked else raw
    r = httpx.post(f"{setup.url}/v1/completions", content=content, headers={"content-type": "application/json"},
                   timeout=60)
    assert r.status_code == 413, r.text
    err = r.json()["error"]
    assert err["code"] == "request_too_large" and str(MAX_REQUEST_BYTES) in err["message"]
    still_serving(setup.url)


def test_a_body_that_stops_arriving_is_408(setup: Setup) -> None:
    # The activator faces clients: one that sends headers and part of a body, then nothing, gets
    # 408 when the body has not moved for read_timeout_s (60 s by default), not a connection held forever.
    with serve_app(create_app(ActivatorSettings(first_routes_timeout_s=1.0, read_timeout_s=0.5), setup.source)) as url:
        head = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: 100\r\n\r\n")
        got, waited = slow_post(url, head, [b'{"model": "tiny"'], 0.0, 10)
        assert got.startswith(b"HTTP/1.1 408") and b"request_timeout" in got, got[:300]
        assert 0.3 < waited < 3
        assert metric(url, "slinfer_activator_requests_total", 0.0, function="tiny", status="200") == 0
        still_serving(url)


@pytest.mark.parametrize("body", [b"{not json", b"[1, 2]", b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"])
@pytest.mark.parametrize("path", ["/v1/completions", "/functions/tiny"])
def test_malformed_body_is_400(setup: Setup, body: bytes, path: str) -> None:
    r = httpx.post(f"{setup.url}{path}", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] in ("invalid_json", "invalid_request"), r.text
    still_serving(setup.url)


def test_an_unexpected_error_is_a_500_in_shape_and_logged(setup: Setup, monkeypatch: pytest.MonkeyPatch,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    from activator import events

    def broken(_: object) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(events, "event_mode", broken)
    r = httpx.post(f"{setup.url}/functions/tiny", content=b"hello")
    assert r.status_code == 500
    assert r.json()["error"] == {"message": "internal error in the activator (logged)", "type": "server_error",
                                 "param": None, "code": "internal_error"}
    assert any("unexpected error answering POST /functions/tiny" in m for m in caplog.messages)
    assert metric(setup.url, "slinfer_activator_errors_total", function="tiny", code="internal_error") >= 1
    monkeypatch.undo()
    still_serving(setup.url)


@pytest.mark.parametrize("model", [["tiny"], {"name": "tiny"}, 5])
def test_a_model_that_is_not_a_string_is_400(setup: Setup, model: object) -> None:
    r = httpx.post(f"{setup.url}/v1/chat/completions",
                   json={"model": model, "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "model" and r.json()["error"]["code"] == "invalid_value"
    still_serving(setup.url)


@pytest.mark.parametrize("extra", [{"stream": "no"}, {"stream": "false"},
                                   {"stream": True, "stream_options": {"include_usage": "no"}}])
def test_stream_flags_must_be_booleans(setup: Setup, extra: dict[str, object]) -> None:
    # A lax reading ("no" -> False at the runtime) once met a truthy one at the activator: JSON
    # sent back as an event stream.
    r = httpx.post(f"{setup.url}/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2, **extra})
    assert r.status_code == 422 and r.headers["content-type"].startswith("application/json"), r.text
    assert r.json()["error"]["param"].startswith("stream")
    still_serving(setup.url)


def test_runtime_validation_errors_pass_through(setup: Setup) -> None:
    r = httpx.post(f"{setup.url}/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 0})
    assert r.status_code == 422
    still_serving(setup.url)


def test_knative_revision_header_and_host_name_the_function(setup: Setup) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    r = httpx.post(f"{setup.url}/v1/chat/completions", json=body,
                   headers={"Knative-Serving-Revision": "tiny-00001", "Knative-Serving-Namespace": "default"})
    assert r.status_code == 200 and r.json()["model"] == "tiny"
    r = httpx.post(f"{setup.url}/", json={"prompt": "hi", "max_tokens": 3},
                   headers={"Host": "tiny.default.svc.cluster.local"})
    # The tiny random model samples (temperature 1 by default), so it may end early on EOS.
    assert r.status_code == 200 and r.json()["model"] == "tiny"
    assert r.json()["choices"][0]["finish_reason"] in ("length", "stop")
    r = httpx.post(f"{setup.url}/functions/tiny", content=b"plain text prompt")
    assert r.status_code == 200 and r.json()["object"] == "chat.completion"


def test_knative_probes_health_and_metrics(setup: Setup) -> None:
    r = httpx.get(f"{setup.url}/anything", headers={"K-Network-Probe": "probe", "K-Network-Hash": "h123"})
    assert r.status_code == 200 and r.headers["K-Network-Hash"] == "h123"
    r = httpx.get(f"{setup.url}/", headers={"K-Network-Probe": "activator"})
    assert r.status_code == 200 and r.text == "activator"
    assert httpx.get(f"{setup.url}/healthz").json()["status"] == "ok"
    still_serving(setup.url)
    assert metric(setup.url, "slinfer_activator_requests_total", function="tiny", status="200") >= 1
    assert metric(setup.url, "slinfer_activator_ttft_seconds_count", function="tiny") >= 1


# -- waiting: overflow and timeout ------------------------------------------------------------------
def test_queue_overflow_503_and_timeout_504_then_keeps_serving(setup: Setup) -> None:
    first: dict[str, httpx.Response] = {}

    def waiter() -> None:
        first["r"] = complete(setup.url, "cold", "wait for me", max_tokens=2)

    t = threading.Thread(target=waiter)
    t0 = time.monotonic()
    t.start()
    deadline = time.monotonic() + 5
    while metric(setup.url, "slinfer_activator_queue_depth", 0.0, function="cold") < 1:
        assert time.monotonic() < deadline, "the first request never started waiting"
        time.sleep(0.02)
    r = complete(setup.url, "cold", "no room", max_tokens=2)  # the queue holds 1
    assert r.status_code == 503 and r.headers["Retry-After"] == "1"
    assert r.json()["error"]["code"] == "queue_full"
    t.join(10)
    waited = time.monotonic() - t0
    assert first["r"].status_code == 504 and first["r"].json()["error"]["code"] == "timeout"
    assert 2.0 <= waited < 5.0  # the function's timeout_s
    assert {"cold": 1} in setup.source.demand  # the autoscaler was asked for capacity
    assert metric(setup.url, "slinfer_activator_queue_depth", function="cold") == 0
    still_serving(setup.url)


def test_a_function_whose_model_cannot_load_is_503_at_once_with_why(setup: Setup) -> None:
    t0 = time.monotonic()
    r = complete(setup.url, "broken", "hello", max_tokens=2)
    assert time.monotonic() - t0 < 5  # its timeout_s is 60 s: nothing to wait for
    assert r.status_code == 503
    assert r.json()["error"] == {"message": f"function 'broken' cannot start: {BROKEN_WHY}", "type": "server_error",
                                 "param": None, "code": "function_unavailable"}
    still_serving(setup.url)


class _Republishing(StaticRouteSource):
    """A route source whose table a test may replace (the activator sees it within 20 ms)."""

    async def next_table(self, after_version: int) -> RouteTable:
        while self.table.version <= after_version:
            await asyncio.sleep(0.02)
        return self.table


def test_a_request_held_for_a_function_deleted_meanwhile_is_404_at_once() -> None:
    waiting = spec("waiting", timeout_s=60.0)
    source = _Republishing(RouteTable(1, {"waiting": waiting}, {}))
    with serve_app(create_app(ActivatorSettings(first_routes_timeout_s=1.0), source)) as url:
        got: dict[str, httpx.Response] = {}
        t = threading.Thread(target=lambda: got.update(r=complete(url, "waiting", "hello", max_tokens=2)))
        t.start()
        deadline = time.monotonic() + 5
        while metric(url, "slinfer_activator_queue_depth", 0.0, function="waiting") < 1:
            assert time.monotonic() < deadline, "the request never started waiting"
            time.sleep(0.02)
        t0 = time.monotonic()
        source.table = RouteTable(2, {}, {})  # `slinfer delete waiting`
        t.join(10)
        assert time.monotonic() - t0 < 2  # not its 60 s timeout
        r = got["r"]
        assert r.status_code == 404 and r.json()["error"]["code"] == "function_not_found", r.text
        assert "deleted" in r.json()["error"]["message"]
        assert metric(url, "slinfer_activator_queue_depth", function="waiting") == 0


def test_requests_arriving_are_reported_per_function_for_arrival_rates(setup: Setup) -> None:
    time.sleep(0.3)  # earlier tests' last requests are reported (every 0.1 s here)
    before = setup.source.arrived.get("tiny", 0)
    for _ in range(3):
        assert complete(setup.url, "tiny", "count me", max_tokens=1).status_code == 200
    deadline = time.monotonic() + 5
    while setup.source.arrived.get("tiny", 0) < before + 3:  # reports go every 0.1 s here
        assert time.monotonic() < deadline, f"reported {setup.source.arrived}"
        time.sleep(0.02)
    time.sleep(0.3)
    assert setup.source.arrived["tiny"] == before + 3  # each request once


# -- CloudEvents ----------------------------------------------------------------------------------
def _event(data: str) -> CloudEvent:
    return CloudEvent({"specversion": "1.0", "id": "evt-1", "source": "/tests/source", "type": "dev.example.text"},
                      data=data)


@pytest.mark.parametrize("mode", ["binary", "structured"])
def test_cloudevent_round_trip(setup: Setup, mode: str) -> None:
    msg = (to_binary_event if mode == "binary" else to_structured_event)(_event("the quick brown fox"))
    r = httpx.post(f"{setup.url}/functions/{EVENT_FN}", content=msg.body, headers=msg.headers, timeout=60)
    assert r.status_code == 200, r.text
    if mode == "structured":
        assert r.headers["content-type"].startswith("application/cloudevents+json")
    else:
        assert r.headers["ce-specversion"] == "1.0"
    reply = from_http_event(HTTPMessage(dict(r.headers), r.content))
    assert reply.get_type() == "dev.example.summary" and reply.get_source() == "/tests/summarize"
    assert reply.get_id() and reply.get_id() != "evt-1" and reply.get_time() is not None
    assert reply.get_subject() == "evt-1"
    # The data is the function's answer to the templated prompt (greedy, so reproducible).
    direct = httpx.post(f"{setup.pods[0]}/v1/chat/completions", timeout=60, json={
        "model": EVENT_FN, "temperature": 0,
        "messages": [{"role": "user", "content": "Summarize: the quick brown fox"}]}).json()
    data = reply.get_data()
    text = data.decode() if isinstance(data, bytes) else data
    assert text == direct["choices"][0]["message"]["content"]


def test_knative_trigger_delivery_gets_a_cloudevent_reply(setup: Setup) -> None:
    headers = {"ce-specversion": "1.0", "ce-id": "trig-7", "ce-source": "/apis/v1/namespaces/default/ping",
               "ce-type": "dev.knative.sources.ping", "ce-knativearrivaltime": "2026-01-01T00:00:00Z",
               "content-type": "text/plain", "Prefer": "reply",
               "Knative-Serving-Revision": f"{EVENT_FN}-00001", "Knative-Serving-Namespace": "default"}
    r = httpx.post(f"{setup.url}/", content=b"a ping", headers=headers, timeout=60)
    assert r.status_code == 200
    if r.content:  # Knative: an empty reply, or a valid CloudEvent
        reply = from_http_event(HTTPMessage(dict(r.headers), r.content))
        assert reply.get_type() == "dev.example.summary"


@pytest.mark.parametrize("mode", ["binary", "structured"])
def test_a_typed_function_s_cloudevent_reply_is_its_json(setup: Setup, mode: str) -> None:
    msg = (to_binary_event if mode == "binary" else to_structured_event)(_event("is this good?"))
    r = httpx.post(f"{setup.url}/functions/{TYPED_FN}", content=msg.body, headers=msg.headers, timeout=60)
    assert r.status_code == 200, r.text
    reply = from_http_event(HTTPMessage(dict(r.headers), r.content))
    assert reply.get_type() == "dev.example.typed" and reply.get_datacontenttype() == "application/json"
    value = reply.get_data()
    assert isinstance(value, dict) and value["label"] in ("yes", "no") and 0 <= value["score"] <= 9
    # over HTTP, the function's schema holds without asking; a request's own response_format wins
    body: dict[str, Any] = {"model": TYPED_FN, "temperature": 0, "messages": [{"role": "user", "content": "hi"}]}
    out = httpx.post(f"{setup.url}/v1/chat/completions", json=body, timeout=60).json()["choices"][0]
    assert set(json.loads(out["message"]["content"])) == {"label", "score"} and out["finish_reason"] == "stop"
    free = httpx.post(f"{setup.url}/v1/chat/completions", timeout=60,
                      json={**body, "max_tokens": 12, "response_format": {"type": "text"}}).json()["choices"][0]
    with pytest.raises(ValueError):
        json.loads(free["message"]["content"])


def test_models_lists_every_function_with_its_instances_and_a_typed_one_s_schema(setup: Setup) -> None:
    data = {m["id"]: m for m in httpx.get(f"{setup.url}/v1/models").json()["data"]}
    assert sorted(data) == ["broken", "cold", EVENT_FN, "tiny", TYPED_FN, CUT_FN]
    assert (data["tiny"]["ready_instances"], data["cold"]["ready_instances"], data["tiny"]["max_model_len"]) == (2, 0, 256)
    assert data[TYPED_FN]["output_schema"] == TYPED_SCHEMA and "output_schema" not in data["tiny"]


def test_a_typed_function_s_cut_answer_is_no_reply(setup: Setup) -> None:
    # max_output_tokens (4) ends the JSON early: no half a value as a reply; a 502 the Broker
    # can send to its dead-letter sink
    msg = to_binary_event(_event("is this good?"))
    r = httpx.post(f"{setup.url}/functions/{CUT_FN}", content=msg.body, headers=msg.headers, timeout=60)
    assert r.status_code == 502 and r.json()["error"]["code"] == "incomplete_output", r.text
    assert "max_output_tokens is 4" in r.json()["error"]["message"]
    still_serving(setup.url)


@pytest.mark.parametrize("headers,body", [
    ({"ce-specversion": "1.0", "ce-id": "x", "content-type": "text/plain"}, b"no source or type"),
    ({"content-type": "application/cloudevents+json"}, b'{"specversion": "1.0", "id": "x"}'),
    ({"content-type": "application/cloudevents+json"}, b"{broken"),
    ({"ce-specversion": "1.0", "ce-id": "x", "ce-source": "/s", "ce-type": "t"}, b""),
    ({"ce-specversion": "1.0", "ce-source": "/s", "ce-type": "t", "content-type": "text/plain"}, b"no id"),
    ({"content-type": "application/cloudevents+json"}, b'{"specversion": "1.0", "source": "/s", "type": "t", "data": "x"}'),
    # data_base64 that is not base64 (the SDK decoded "!!!" to nothing), and base64 of nothing
    ({"content-type": "application/cloudevents+json"},
     b'{"specversion": "1.0", "id": "x", "source": "/s", "type": "t", "data_base64": "!!!"}'),
    ({"content-type": "application/cloudevents+json"},
     b'{"specversion": "1.0", "id": "x", "source": "/s", "type": "t", "data_base64": ""}'),
    ({"content-type": "application/cloudevents+json"}, b"[1, 2]"),
])
def test_malformed_cloudevent_is_400(setup: Setup, headers: dict[str, str], body: bytes) -> None:
    r = httpx.post(f"{setup.url}/functions/{EVENT_FN}", content=body, headers=headers)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_cloudevent", r.text
    still_serving(setup.url)


# -- preemption: a stream moved to another instance --------------------------------------------------
def _evict_and_reload(pod: str, name: str) -> None:
    ev = httpx.post(f"{pod}/admin/instances/{name}/evict", headers=AUTH, timeout=30)
    assert ev.status_code == 200 and ev.json()["evicted_requests"] == 1, "the request finished before eviction"


def _reload(pod: str, spec_: FunctionSpec) -> None:
    r = httpx.post(f"{pod}/admin/instances", json=spec_.to_dict(), headers=AUTH, params={"profile": "false"},
                   timeout=60)
    assert r.status_code == 201


@pytest.mark.parametrize(("chat", "logprobs"), [(False, False), (True, False), (False, True), (True, True)])
def test_stream_moved_by_preemption_equals_the_uninterrupted_greedy_output(setup: Setup, chat: bool, logprobs: bool,
                                                                          request: pytest.FixtureRequest) -> None:
    n = 150
    base: dict[str, Any] = {"model": "tiny", "temperature": 0, "max_tokens": n}
    base |= {"messages": [{"role": "user", "content": "hello"}]} if chat else {"prompt": "hello"}
    base |= logprobs_ask(chat) if logprobs else {}
    full, plain, _ = stream_text(setup.pods[1], {**base, "stream_options": {"include_usage": True}})
    want_reason = plain[-2]["choices"][0]["finish_reason"]  # uninterrupted, straight from pod b
    assert plain[-1]["usage"]["completion_tokens"] > 20, "too short to be moved mid-stream"
    moves = metric(setup.url, "slinfer_activator_continuations_total", 0.0, function="tiny")
    request.getfixturevalue("paced_device")  # so the eviction lands mid-stream on any machine
    # Through the activator: pod a is tried first (ids sort); evict it on the second chunk.
    try:
        text, chunks, done = stream_text(setup.url, {**base, "stream_options": {"include_usage": True}},
                                         on_chunk=lambda i: i == 2 and _evict_and_reload(setup.pods[0], "tiny"))
    finally:
        _reload(setup.pods[0], setup.specs["tiny"])
    assert text == full
    assert done == 1 and all("error" not in c for c in chunks)
    reasons = [c["choices"][0]["finish_reason"] for c in chunks if c.get("choices")]
    assert reasons[-1] == want_reason and "preempted" not in reasons
    assert all("continuation" not in c["choices"][0] for c in chunks if c.get("choices"))
    assert len({c["id"] for c in chunks}) == 1
    assert counts(chunks[-1]["usage"]) == counts(plain[-1]["usage"])
    if logprobs:  # every token's, the held-back ones at the eviction included
        assert_same_logprobs([c["choices"][0] for c in chunks if c.get("choices")],
                             [c["choices"][0] for c in plain if c.get("choices")], plain[-1]["usage"]["completion_tokens"])
    if chat:
        assert all(c["object"] == "chat.completion.chunk" for c in chunks)
        assert metric(setup.url, "slinfer_activator_continuations_total", function="tiny") == moves + 1


def generated_until_it_stops(pod: str, before: float) -> float:
    """Tokens "tiny" generated on ``pod`` since ``before``, once it has stopped generating."""
    deadline = time.monotonic() + 10
    last = -1.0
    while True:
        time.sleep(0.3)
        now = metric(pod, "slinfer_generation_tokens_total", 0.0, model="tiny")
        if now == last:
            return now - before
        assert time.monotonic() < deadline, "the pod kept generating after the client left"
        last = now


def test_client_leaving_a_stream_aborts_the_request_on_the_runtime(setup: Setup, paced_device: float) -> None:
    # Uninterrupted, this request generates ~250 tokens (>= 2.5 s paced). Pod a is tried first (ids sort).
    before = metric(setup.pods[0], "slinfer_generation_tokens_total", 0.0, model="tiny")
    body = {"model": "tiny", "prompt": "hello", "temperature": 0, "max_tokens": 255, "stream": True}
    with httpx.stream("POST", setup.url + "/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        for i, _ in enumerate(r.iter_lines()):
            if i >= 4:
                break  # leaving the block closes the connection
    assert 0 < generated_until_it_stops(setup.pods[0], before) < 200
    still_serving(setup.url)


def test_client_leaving_a_non_streaming_request_aborts_it_on_the_runtime(setup: Setup, paced_device: float) -> None:
    # A client that times out (its own 0.5 s here): the pod stops generating the ~250 tokens
    # (>= 2.5 s paced) nobody will read, as it does for a stream.
    before = metric(setup.pods[0], "slinfer_generation_tokens_total", 0.0, model="tiny")
    gone = metric(setup.url, "slinfer_activator_errors_total", 0.0, function="tiny", code="client_closed")
    body = {"model": "tiny", "prompt": "hello", "temperature": 0, "max_tokens": 255}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(setup.url + "/v1/completions", json=body, timeout=httpx.Timeout(60, read=0.5))
    assert 0 < generated_until_it_stops(setup.pods[0], before) < 200
    assert metric(setup.url, "slinfer_activator_errors_total", function="tiny", code="client_closed") == gone + 1
    still_serving(setup.url)


def test_a_held_request_whose_client_leaves_gives_up_its_place(setup: Setup) -> None:
    # "cold" has no instance and a queue of 1: the client that gave up on waiting no longer holds
    # it (before, its place was taken until the function's 2 s timeout, answering nobody).
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{setup.url}/v1/completions", json={"model": "cold", "prompt": "x", "max_tokens": 2},
                   timeout=httpx.Timeout(60, read=0.3))
    t0 = time.monotonic()
    while metric(setup.url, "slinfer_activator_queue_depth", 0.0, function="cold") > 0:
        assert time.monotonic() - t0 < 0.5, "the abandoned request is still queued"
        time.sleep(0.02)
    assert metric(setup.url, "slinfer_activator_errors_total", function="cold", code="client_closed") >= 1
    r = complete(setup.url, "cold", "my turn", max_tokens=2)  # holds the place, then times out itself
    assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"


def test_a_try_cancelled_mid_flight_closes_its_connection_and_gives_its_place_back() -> None:
    # The pod has the request but has not answered when the client leaves: the connection closes
    # (the pod aborts the request) and the instance's in-flight count (routing's order) drops back.
    import asyncio

    from activator.dispatch import Dispatcher
    from activator.metrics import ActivatorMetrics
    from activator.routes import RouteView
    from activator.upstream import UpstreamClient
    from activator.waiting import WaitingRoom

    async def go() -> None:
        got_request = asyncio.Event()
        closed = asyncio.Event()

        async def silent_pod(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            got_request.set()
            while await reader.read(1024):  # never answers; reads until the activator hangs up
                pass
            closed.set()
            writer.close()

        server = await asyncio.start_server(silent_pod, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        f = spec("f")
        routes = RouteView(RouteTable(1, {"f": f}, {"f": (Endpoint("f@a", "a", f"http://127.0.0.1:{port}"),)}))
        d = Dispatcher(routes, WaitingRoom(4), UpstreamClient(), ActivatorMetrics())
        opening = asyncio.ensure_future(d.open(f, "/v1/completions", {"prompt": "x"}))
        await asyncio.wait_for(got_request.wait(), 5)
        assert d.inflight == {"f@a": 1}
        opening.cancel()
        with pytest.raises(asyncio.CancelledError):
            await opening
        assert d.inflight == {}
        await asyncio.wait_for(closed.wait(), 5)
        server.close()

    asyncio.run(go())


def test_non_streaming_request_moved_by_preemption_is_joined(setup: Setup, request: pytest.FixtureRequest) -> None:
    n = 150
    plain = complete(setup.pods[1], "tiny", "hello", max_tokens=n, logprobs=2, echo=True).json()
    request.getfixturevalue("paced_device")  # so the eviction lands mid-request on any machine
    result: dict[str, httpx.Response] = {}
    t = threading.Thread(target=lambda: result.setdefault("r", complete(setup.url, "tiny", "hello",
                                                                         max_tokens=n, logprobs=2, echo=True)))
    t.start()
    try:
        deadline = time.monotonic() + 10
        while True:  # evict once the request is running on pod a
            st = httpx.get(f"{setup.pods[0]}/admin/status", headers=AUTH).json()
            if any(i["name"] == "tiny" and i["batch"] > 0 for i in st["instances"]):
                break
            assert time.monotonic() < deadline and t.is_alive(), "the request never ran on pod a"
            time.sleep(0.01)
        _evict_and_reload(setup.pods[0], "tiny")
        t.join(60)
    finally:
        _reload(setup.pods[0], setup.specs["tiny"])
    body = result["r"].json()
    assert result["r"].status_code == 200
    assert body["choices"][0]["text"] == plain["choices"][0]["text"]
    assert body["choices"][0]["finish_reason"] == plain["choices"][0]["finish_reason"]
    assert counts(body["usage"]) == counts(plain["usage"]) and "continuation" not in body["choices"][0]
    assert "prompt_tokens_details" in body["usage"]  # from the pod that finished it, bounded by the prompt
    assert body["choices"][0]["text"].startswith("hello")  # echoed, once
    assert_same_logprobs(body["choices"], plain["choices"], plain["usage"]["completion_tokens"] + len("hello"))


def test_held_requests_are_demand_only_once_they_have_tried_the_current_routes() -> None:
    # A request held while routes v5 were current, then v6 published a new instance: until the
    # request has tried v6 it is on its way there, not demand (else the function scales out twice).
    from activator.waiting import WaitingRoom

    room = WaitingRoom(limit=4)
    room.missed("f", 5)
    with room.hold("f"):
        assert room.demand(5) == {"f": 1}
        assert room.demand(6) == {}
        room.missed("f", 6)
        assert room.demand(6) == {"f": 1}
        with room.trying("f"):  # being tried on an instance: not demand either
            assert room.demand(6) == {}
    assert room.demand() == {} and "f" not in room.tried


class _Refusing:
    """An upstream client that answers 429 (admission refused) ``refusals`` times, then 200;
    records the elapsed-time header of every try."""

    def __init__(self, refusals: int) -> None:
        self.refusals = refusals
        self.elapsed: list[float] = []
        self.first_token_age: list[float | None] = []

    async def post(self, url: str, content: bytes, headers: dict[str, str]) -> Any:
        from functions import ELAPSED_HEADER, FIRST_TOKEN_AGE_HEADER

        self.elapsed.append(float(headers[ELAPSED_HEADER]))
        age = headers.get(FIRST_TOKEN_AGE_HEADER)
        self.first_token_age.append(None if age is None else float(age))
        status = 429 if len(self.elapsed) <= self.refusals else 200

        class Resp:
            status_code = status

            async def aclose(self) -> None:
                pass
        return Resp()


@pytest.mark.parametrize("status, tries", [
    (500, 1),  # the pod failed on this request: the answer goes back at once, not retried until timeout_s
    (502, 2), (503, 2), (504, 2), (404, 2), (429, 2),  # refused, going, gone: tried again (the 2nd try: 200)
])
def test_which_answers_are_tried_elsewhere(status: int, tries: int) -> None:
    import asyncio

    from activator.dispatch import Dispatcher
    from activator.metrics import ActivatorMetrics
    from activator.routes import RouteView
    from activator.waiting import WaitingRoom

    class Answers:
        def __init__(self) -> None:
            self.tries = 0

        async def post(self, url: str, content: bytes, headers: dict[str, str]) -> Any:
            self.tries += 1
            code = status if self.tries == 1 else 200

            class Resp:
                status_code = code

                async def aclose(self) -> None:
                    pass
            return Resp()

    f = spec("f")
    table = RouteTable(1, {"f": f}, {"f": (Endpoint("f@a", "a", "http://a"),)})

    async def go() -> tuple[int, int]:
        client = Answers()
        d = Dispatcher(RouteView(table), WaitingRoom(4), client, ActivatorMetrics())  # type: ignore[arg-type]
        up = await d.open(f, "/v1/completions", {})
        await up.close()
        return up.response.status_code, client.tries

    got, n = asyncio.run(go())
    assert n == tries and got == (500 if status == 500 else 200)


@pytest.mark.parametrize("case", ["refused", "loading", "continued"])
def test_each_try_tells_the_pod_how_long_the_request_has_run(case: str) -> None:
    # Held while instances refuse it, the time counts (its deadlines keep running at the pod);
    # held while its function has no instance (a model load), it does not; a continuation
    # counts from the client request's arrival.
    import asyncio

    from activator.dispatch import Dispatcher, Elapsed
    from activator.metrics import ActivatorMetrics
    from activator.routes import RouteView
    from activator.waiting import WaitingRoom

    f = spec("f")
    ready = RouteTable(2, {"f": f}, {"f": (Endpoint("f@a", "a", "http://a"),)})

    async def go() -> _Refusing:
        routes = RouteView(ready if case != "loading" else RouteTable(1, {"f": f}, {}))
        client = _Refusing(2 if case == "refused" else 0)
        d = Dispatcher(routes, WaitingRoom(4), client, ActivatorMetrics())  # type: ignore[arg-type]
        if case == "loading":
            asyncio.get_running_loop().call_later(0.6, routes.publish, ready)  # the load is done
        now = time.monotonic()
        elapsed = Elapsed(now - 2.0, first_token_at=now - 1.5) if case == "continued" else None
        up = await d.open(f, "/v1/completions", {}, elapsed=elapsed)
        await up.close()
        return client

    client = asyncio.run(go())
    sent = client.elapsed
    if case == "refused":
        assert len(sent) == 3 and sent[0] < 0.1 and sent[2] >= 0.45  # two rechecks, 0.25 s apart
    elif case == "loading":
        assert len(sent) == 1 and sent[0] < 0.2  # 0.6 s waited for the load, excused
    else:
        assert len(sent) == 1 and 2.0 <= sent[0] < 2.2
        (age,) = client.first_token_age
        assert age is not None and 1.5 <= age < 1.7  # when its first token came
    if case != "continued":
        assert set(client.first_token_age) == {None}


def test_a_continuation_tells_when_the_stream_s_first_token_came() -> None:
    from activator.relay import Moved

    m = Moved([1, 2])
    m.absorb({"prompt_token_ids": [1, 2], "output_token_ids": [3], "first_token_age_s": 2.0})
    assert m.first_token_at is not None and abs(time.monotonic() - 2.0 - m.first_token_at) < 0.1
    first = m.first_token_at
    m.absorb({"prompt_token_ids": [1, 2, 3], "output_token_ids": [4], "first_token_age_s": 0.1})
    assert m.first_token_at == first and m.output_ids == [3, 4]  # the stream's first, not a later move's
    for bad in ("soon", -1.0, float("inf"), None):
        fresh = Moved([1])
        fresh.absorb({"prompt_token_ids": [1], "output_token_ids": [], "first_token_age_s": bad})
        assert fresh.first_token_at is None


def test_a_continuation_asks_for_the_same_sampling() -> None:
    # Everything that shapes the next token goes with a moved stream; what only shapes the
    # response (stream_options, n, user) is the activator's to set or not the pod's to see.
    from activator.relay import Moved

    original = {"model": "f", "messages": [], "temperature": 0.7, "top_p": 0.9, "seed": 3, "stop": ["x"],
                "presence_penalty": 0.5, "frequency_penalty": -1.0, "logit_bias": {"7": -100}, "user": "u",
                "max_tokens": 9, "response_format": {"type": "json_object"}}
    m = Moved([1, 2], output_ids=[3], max_tokens=9)
    body = m.body("f-fn", original, stream=True)
    assert body == {"model": "f-fn", "prompt": [1, 2, 3], "stream": True, "max_tokens": 8, "resumed_tokens": 1,
                    "stream_options": {"include_usage": True}, "temperature": 0.7, "top_p": 0.9, "seed": 3,
                    "stop": ["x"], "presence_penalty": 0.5, "frequency_penalty": -1.0, "logit_bias": {"7": -100},
                    "response_format": {"type": "json_object"}}


def test_held_requests_retry_through_the_gate_without_a_storm() -> None:
    # 30 requests find no room and are held; then room frees one request at a time, each with a
    # wake-up (a request finished). Ungated, every held request retries on every change; through
    # the gate, a change costs about one refusal. Both serve everyone.
    import asyncio

    from activator.dispatch import Dispatcher
    from activator.metrics import ActivatorMetrics
    from activator.routes import RouteView
    from activator.waiting import WaitingRoom

    class Pod:
        def __init__(self) -> None:
            self.free = 0
            self.tries = 0

        async def post(self, url: str, content: bytes, headers: dict[str, str]) -> Any:
            self.tries += 1
            await asyncio.sleep(0.003)  # admission runs between device steps
            admitted = self.free > 0
            self.free -= admitted

            class Resp:
                status_code = 200 if admitted else 429

                async def aclose(self) -> None:
                    pass
            return Resp()

    f = spec("f", timeout_s=30.0)
    table = RouteTable(1, {"f": f}, {"f": (Endpoint("f@a", "a", "http://a"),)})

    async def go(slots: int) -> tuple[int, int]:
        pod, room = Pod(), WaitingRoom(100)
        d = Dispatcher(RouteView(table), room, pod, ActivatorMetrics(), retry_slots=slots)  # type: ignore[arg-type]

        async def one() -> None:
            up = await d.open(f, "/v1/completions", {})
            await up.close()  # no wake-up: the test decides when room frees

        tasks = [asyncio.ensure_future(one()) for _ in range(30)]
        await asyncio.sleep(0.05)
        held = pod.tries
        for _ in range(10):
            pod.free += 1
            room.wake("f")
            await asyncio.sleep(0.02)
        pod.free += 100
        room.wake("f")
        await asyncio.wait_for(asyncio.gather(*tasks), 10)
        return held, pod.tries - held

    first_gated, gated = asyncio.run(go(2))
    first_ungated, ungated = asyncio.run(go(0))
    assert first_gated == first_ungated == 30  # a fresh request's first try is never held back
    assert ungated > 150, ungated  # ~every held request on each of 11 changes
    assert gated < ungated / 3, (gated, ungated)


def test_the_retry_window_doubles_while_tries_are_admitted_and_falls_back_at_a_refusal() -> None:
    import asyncio

    from activator.dispatch import RetryGate

    async def go() -> list[int]:
        gate = RetryGate(2)
        seen = []
        for _ in range(2):
            await gate.enter()
        third = asyncio.ensure_future(gate.enter())
        await asyncio.sleep(0.01)
        assert not third.done()  # the window (2) is full
        gate.leave(admitted=True)  # admitted: 4
        await asyncio.wait_for(third, 1)
        seen.append(gate.window)
        await gate.enter()  # 3 out of 4
        gate.leave(admitted=None)  # no answer yet: the window stays
        seen.append(gate.window)
        gate.leave(admitted=False)  # refused: back to 2
        seen.append(gate.window)
        for _ in range(20):
            gate.leave(admitted=True)
            await gate.enter()
        seen.append(gate.window)  # capped
        # A waiter cancelled while it waits, or right after its turn came, loses no place.
        while gate.out < gate.window:
            await gate.enter()
        waiting = [asyncio.ensure_future(gate.enter()) for _ in range(2)]
        await asyncio.sleep(0)
        waiting[0].cancel()
        gate.leave(admitted=None)  # turns go to the second waiter; the first was cancelled
        await asyncio.sleep(0)
        seen.append(int(waiting[1].done() and gate.out == gate.window))
        with contextlib.suppress(asyncio.CancelledError):
            await waiting[0]  # cancelled, and nothing else
        return seen

    assert asyncio.run(go()) == [4, 4, 2, RetryGate.MAX_WINDOW, 1]


# -- a pod that dies mid-stream ---------------------------------------------------------------------
class CutProxy:
    """A TCP proxy in front of a pod that breaks a streamed response as a crashed pod would: after
    the response head (``after_events=0``, then ``linger_s`` of silence) or after the event number
    ``after_events`` / the first event containing ``marker``, it forwards nothing more and resets
    both connections. ``dead_after_cut``: from then on it resets every new connection at once (the
    pod is gone), else it proxies again (and cuts again)."""

    def __init__(self, target: str, after_events: int | None = None, marker: bytes | None = None,
                 dead_after_cut: bool = True, linger_s: float = 0.0) -> None:
        import asyncio
        from urllib.parse import urlsplit

        u = urlsplit(target)
        self.host, self.port = u.hostname or "127.0.0.1", u.port or 80
        self.after_events, self.marker = after_events, marker
        self.dead_after_cut, self.linger_s = dead_after_cut, linger_s
        self.cuts = 0
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self) -> str:
        import asyncio

        self.thread.start()
        self.server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._serve, "127.0.0.1", 0), self.loop).result(10)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    def __exit__(self, *exc: object) -> None:
        self.loop.call_soon_threadsafe(self.server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    def _cut_at(self, buf: bytes, state: dict[str, int]) -> int | None:
        """Where in ``buf`` to cut (None: not yet); ``state`` carries the scan across reads."""
        if "body" not in state:
            head = buf.find(b"\r\n\r\n")
            if head < 0:
                return None
            state["body"] = state["scan"] = head + 4
            if self.after_events == 0:
                return head + 4
        while (end := buf.find(b"\n\n", state["scan"])) >= 0:
            event, state["scan"] = buf[state["scan"]:end], end + 2
            state["events"] = state.get("events", 0) + 1
            if state["events"] == self.after_events or (self.marker is not None and self.marker in event):
                return end + 2
        return None

    async def _serve(self, reader: Any, writer: Any) -> None:
        import asyncio

        if self.dead_after_cut and self.cuts:
            writer.transport.abort()
            return
        up_reader, up_writer = await asyncio.open_connection(self.host, self.port)

        async def upward() -> None:
            while data := await reader.read(65536):
                up_writer.write(data)
                await up_writer.drain()

        pump = asyncio.ensure_future(upward())
        buf, sent, state = b"", 0, {}
        try:
            while data := await up_reader.read(65536):
                buf += data
                cut = self._cut_at(buf, state)
                writer.write(buf[sent:cut])
                await writer.drain()
                sent = len(buf) if cut is None else cut
                if cut is not None:
                    self.cuts += 1
                    await asyncio.sleep(self.linger_s)
                    break
        finally:
            pump.cancel()
            writer.transport.abort()
            up_writer.transport.abort()


@contextlib.contextmanager
def activator_over(setup: Setup, first: str, second: str) -> Iterator[str]:
    """An activator routing "tiny" to ``first`` (tried first: ids sort) and then ``second``."""
    eps = {"tiny": (Endpoint("tiny@a", "a", first), Endpoint("tiny@b", "b", second))}
    source = StaticRouteSource(RouteTable(1, {"tiny": setup.specs["tiny"]}, eps))
    with serve_app(create_app(ActivatorSettings(first_routes_timeout_s=1.0), source)) as url:
        yield url


# ~90 tokens of JSON from the tiny model, ended by the grammar
WORDS_FORMAT = {"type": "json_schema", "json_schema": {"name": "words", "schema": {
    "type": "object", "required": ["words"], "additionalProperties": False,
    "properties": {"words": {"type": "array", "items": {"type": "string", "maxLength": 8}, "minItems": 8,
                             "maxItems": 8}}}}}


def long_body(chat: bool, logprobs: bool = False, structured: bool = False, echo: bool = False) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "tiny", "temperature": 0, "max_tokens": 150,
                            "stream_options": {"include_usage": True}}
    body |= logprobs_ask(chat) if logprobs else {}
    body |= {"response_format": WORDS_FORMAT} if structured else {}
    body |= {"echo": True} if echo else {}
    return body | ({"messages": [{"role": "user", "content": "hello"}]} if chat else {"prompt": "hello"})


@pytest.mark.parametrize(("chat", "after_events", "linger_s", "logprobs", "structured", "echo"), [
    (False, 5, 0.0, False, False, False), (True, 5, 0.0, False, False, False), (True, 0, 0.3, False, False, False),
    (False, 5, 0.0, True, False, False), (True, 5, 0.0, True, False, False), (True, 5, 0.0, False, True, False),
    (False, 5, 0.0, True, False, True)])
def test_a_stream_whose_pod_dies_mid_stream_goes_on_elsewhere(setup: Setup, chat: bool, after_events: int,
                                                               linger_s: float, logprobs: bool, structured: bool,
                                                               echo: bool) -> None:
    # The pod behind the proxy "dies" after the 5th event (or right after its response head): the
    # activator continues from the ids its notes named (or sends the request again when nothing
    # reached the client) on the other pod; the client sees one stream equal to an uninterrupted one.
    full, plain, _ = stream_text(setup.pods[1], long_body(chat, logprobs, structured, echo))
    assert plain[-1]["usage"]["completion_tokens"] > 20, "too short to be cut mid-stream"
    if structured:  # the grammar ended it, and goes on where it was after the move
        assert plain[-2]["choices"][0]["finish_reason"] == "stop" and len(json.loads(full)["words"]) == 8
    with CutProxy(setup.pods[0], after_events=after_events, linger_s=linger_s) as proxy, \
            activator_over(setup, proxy, setup.pods[1]) as url:
        text, chunks, done = stream_text(url, long_body(chat, logprobs, structured, echo))
        assert metric(url, "slinfer_activator_failovers_total", function="tiny") == 1
        assert metric(url, "slinfer_activator_continuations_total", 0.0, function="tiny") == 0
    assert text == full
    assert done == 1 and all("error" not in c for c in chunks)
    assert len({c["id"] for c in chunks}) == 1 and len({c["object"] for c in chunks}) == 1
    reasons = [c["choices"][0]["finish_reason"] for c in chunks if c.get("choices")]
    assert reasons[-1] == plain[-2]["choices"][0]["finish_reason"] and reasons.count(reasons[-1]) == 1
    assert counts(chunks[-1]["usage"]) == counts(plain[-1]["usage"])
    if logprobs:  # with echo, the prompt's first (and text_offset counting it after the move)
        n = plain[-1]["usage"]["completion_tokens"] + (plain[-1]["usage"]["prompt_tokens"] if echo else 0)
        assert_same_logprobs([c["choices"][0] for c in chunks if c.get("choices")],
                             [c["choices"][0] for c in plain if c.get("choices")], n)
    if chat:
        assert chunks[0]["choices"][0]["delta"].get("role") == "assistant"
        assert sum(1 for c in chunks if c.get("choices") and "role" in c["choices"][0]["delta"]) == 1


def test_a_stream_cut_after_its_last_text_ends_without_going_elsewhere(setup: Setup) -> None:
    # Only the usage chunk and [DONE] were lost: the activator ends the stream itself.
    full, plain, _ = stream_text(setup.pods[1], long_body(chat=False))
    cutter = CutProxy(setup.pods[0], marker=b'"finish_reason": "length"')
    with cutter as proxy, activator_over(setup, proxy, setup.pods[1]) as url:
        text, chunks, done = stream_text(url, long_body(chat=False))
        assert metric(url, "slinfer_activator_failovers_total", 0.0, function="tiny") == 0
    assert cutter.cuts == 1
    assert text == full and done == 1 and all("error" not in c for c in chunks)
    assert counts(chunks[-1]["usage"]) == counts(plain[-1]["usage"]) and chunks[-1]["id"] == chunks[0]["id"]


def test_a_stream_that_kills_every_pod_it_reaches_stops_after_two_failovers(setup: Setup) -> None:
    # A "query of death" must not take down the fleet: two continuations, then an error event.
    with CutProxy(setup.pods[0], after_events=3, dead_after_cut=False) as a, \
            CutProxy(setup.pods[1], after_events=3, dead_after_cut=False) as b, activator_over(setup, a, b) as url:
        text, chunks, done = stream_text(url, long_body(chat=False))
        assert metric(url, "slinfer_activator_failovers_total", function="tiny") == 2
    errors = [c["error"] for c in chunks if "error" in c]
    assert done == 1 and len(errors) == 1 and errors[0]["code"] == "continuation_failed"
    assert len(text) > 0


@pytest.mark.parametrize("chat", [False, True])
def test_a_non_streaming_answer_cut_after_its_head_is_asked_again_elsewhere(setup: Setup, chat: bool) -> None:
    # The pod died between its status line and its body: nothing reached the client, so the
    # request is sent again (it was a 500 "internal error in the activator" in a chaos soak).
    body = long_body(chat) | {"max_tokens": 20}
    want = httpx.post(f"{setup.pods[1]}/v1/{'chat/' if chat else ''}completions", json=body, timeout=60).json()
    with CutProxy(setup.pods[0], after_events=0, linger_s=0.3) as proxy, activator_over(setup, proxy, setup.pods[1]) as url:
        r = httpx.post(f"{url}/v1/{'chat/' if chat else ''}completions", json=body, timeout=60)
        assert metric(url, "slinfer_activator_failovers_total", function="tiny") == 1
    assert r.status_code == 200, r.text
    assert r.json()["choices"] == want["choices"] and counts(r.json()["usage"]) == counts(want["usage"])


def test_a_non_streaming_request_that_kills_every_pod_it_reaches_is_a_502_after_two_failovers(setup: Setup) -> None:
    with CutProxy(setup.pods[0], after_events=0, dead_after_cut=False) as a, \
            CutProxy(setup.pods[1], after_events=0, dead_after_cut=False) as b, activator_over(setup, a, b) as url:
        r = complete(url, "tiny", "hello")
        assert metric(url, "slinfer_activator_failovers_total", function="tiny") == 2
    assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_failed", r.text
    still_serving(setup.url)


def test_a_pod_newly_gone_in_the_route_table_is_cut_once() -> None:
    from activator.routes import RouteView

    cut: list[str] = []
    view = RouteView(on_gone=cut.append)
    view.publish(RouteTable(1, gone=("http://a",)))
    view.publish(RouteTable(2, gone=("http://a", "http://b")))  # only b is new
    view.publish(RouteTable(3, gone=("http://b",)))  # a came back
    view.publish(RouteTable(4, gone=("http://a", "http://b")))  # gone again: cut again
    assert cut == ["http://a", "http://b", "http://a"]
    table = RouteTable(5, gone=("http://a",))
    assert RouteTable.from_json(table.to_json()) == table
    assert RouteTable.from_json({"version": 1}).gone == ()  # an older autoscaler's table
