"""runtime.server.app under a real uvicorn server: the OpenAI-compatible API, streaming, errors,
client disconnects, concurrency and metrics.

The tiny models have random weights and a byte tokenizer (one token per byte), so their text is
junk, but greedy decoding is deterministic and token counts are exact."""

from __future__ import annotations

import asyncio
import json
import math
import re
import time
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlsplit

import httpx
import openai
import pytest
from conftest import make_app, serve_app, slow_post, tiny_spec

from runtime.models.tokenizer import byte_tokenizer

PROMPT = "Hello world"  # greedy on "tiny" runs past 200 tokens without hitting EOS
ERROR_KEYS = {"message", "type", "param", "code"}


# -- helpers ------------------------------------------------------------------------------------
@pytest.fixture
def http(tiny_server: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=tiny_server, timeout=60) as client:
        yield client


def completion_body(**overrides: Any) -> dict[str, Any]:
    return {"model": "tiny", "prompt": PROMPT, "max_tokens": 8, "temperature": 0, **overrides}


def chat_body(**overrides: Any) -> dict[str, Any]:
    return {"model": "tiny", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 12,
            "temperature": 0, **overrides}


def complete(http: httpx.Client, **overrides: Any) -> dict[str, Any]:
    r = http.post("/v1/completions", json=completion_body(**overrides))
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def text_of(http: httpx.Client, **overrides: Any) -> str:
    return str(complete(http, **overrides)["choices"][0]["text"])


def sse_payloads(lines: list[str]) -> list[dict[str, Any]]:
    """The JSON payloads of an SSE body, in order; asserts the framing and the final [DONE]."""
    data = [line for line in lines if line]
    assert all(line.startswith("data: ") for line in data), data
    assert data[-1] == "data: [DONE]"
    assert data.count("data: [DONE]") == 1
    return [json.loads(line[len("data: "):]) for line in data[:-1]]


def stream_lines(http: httpx.Client, path: str, body: dict[str, Any]) -> list[str]:
    with http.stream("POST", path, json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        return list(r.iter_lines())


def metric(text: str, name: str, model: str = "tiny") -> float:
    m = re.search(rf'^{re.escape(name)}\{{model="{re.escape(model)}"\}} (\S+)$', text, re.MULTILINE)
    assert m is not None, f"{name}{{model={model!r}}} not in /metrics"
    return float(m.group(1))


def counts(usage: dict[str, Any]) -> dict[str, Any]:
    """Usage but the prompt's cached tokens (prefix caching: they depend on what ran before),
    which are always named and never more than the prompt."""
    assert 0 <= usage["prompt_tokens_details"]["cached_tokens"] <= usage["prompt_tokens"], usage
    return {k: v for k, v in usage.items() if k != "prompt_tokens_details"}


def assert_error(r: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == ERROR_KEYS
    assert isinstance(err["message"], str) and err["message"]
    assert err["type"] == "invalid_request_error"
    if code is not None:
        assert err["code"] == code
    return err  # type: ignore[no-any-return]


def assert_still_serving(http: httpx.Client) -> None:
    out = complete(http, max_tokens=3)
    assert out["usage"]["completion_tokens"] == 3


# -- plain endpoints ----------------------------------------------------------------------------
def test_healthz_and_models_list(http: httpx.Client) -> None:
    r = http.get("/healthz")
    assert r.status_code == 200
    assert r.json() == {"status": "ok"}

    r = http.get("/v1/models")
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == ["tiny", "tiny-qwen"]
    assert {m["max_model_len"] for m in body["data"]} == {256}


# -- completions and chat -----------------------------------------------------------------------
def test_completion_counts_tokens_and_is_greedy_deterministic(http: httpx.Client) -> None:
    out = complete(http)
    assert out["object"] == "text_completion"
    assert out["model"] == "tiny"
    assert out["id"].startswith("cmpl-")
    [choice] = out["choices"]
    assert choice["finish_reason"] == "length"
    assert isinstance(choice["text"], str) and choice["text"]
    assert counts(out["usage"]) == {"prompt_tokens": len(PROMPT.encode()), "completion_tokens": 8,
                                    "total_tokens": len(PROMPT.encode()) + 8}

    assert complete(http)["choices"][0]["text"] == choice["text"]


def test_completion_accepts_token_ids(http: httpx.Client) -> None:
    ids = byte_tokenizer().encode(PROMPT, add_special_tokens=False)
    assert len(ids) == len(PROMPT)
    out = complete(http, prompt=ids)
    assert out["usage"]["prompt_tokens"] == len(ids)
    assert out["choices"][0]["text"] == text_of(http)


def test_models_are_routed_by_name(http: httpx.Client) -> None:
    assert text_of(http, model="tiny-qwen") != text_of(http, model="tiny")


def test_chat_completion(http: httpx.Client) -> None:
    r = http.post("/v1/chat/completions", json=chat_body())
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["object"] == "chat.completion"
    assert out["id"].startswith("chatcmpl-")
    [choice] = out["choices"]
    assert choice["message"]["role"] == "assistant"
    assert isinstance(choice["message"]["content"], str) and choice["message"]["content"]
    assert choice["finish_reason"] == "length"
    assert out["usage"]["completion_tokens"] == 12
    # ChatML around the user turn: "<|im_start|>user\n" + PROMPT + "<|im_end|>\n<|im_start|>assistant\n"
    assert out["usage"]["prompt_tokens"] == 1 + len("user\n") + len(PROMPT) + 3 + len("assistant\n")


# -- streaming ----------------------------------------------------------------------------------
def test_streaming_chat_matches_non_streaming(http: httpx.Client) -> None:
    expected = http.post("/v1/chat/completions", json=chat_body()).json()
    payloads = sse_payloads(stream_lines(
        http, "/v1/chat/completions", chat_body(stream=True, stream_options={"include_usage": True})))

    *chunks, usage_chunk = payloads
    assert all(c["object"] == "chat.completion.chunk" for c in payloads)
    assert len({c["id"] for c in payloads}) == 1
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    content = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert content == expected["choices"][0]["message"]["content"]
    reasons = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"][0]["finish_reason"]]
    assert reasons == ["length"]
    assert usage_chunk["choices"] == []
    assert counts(usage_chunk["usage"]) == counts(expected["usage"])


def test_streaming_completion_matches_non_streaming(http: httpx.Client) -> None:
    expected = complete(http, max_tokens=20)
    payloads = sse_payloads(stream_lines(
        http, "/v1/completions",
        completion_body(max_tokens=20, stream=True, stream_options={"include_usage": True})))

    *chunks, usage_chunk = payloads
    assert all(c["object"] == "text_completion" for c in payloads)
    assert "".join(c["choices"][0]["text"] for c in chunks) == expected["choices"][0]["text"]
    reasons = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"][0]["finish_reason"]]
    assert reasons == ["length"]
    assert usage_chunk["choices"] == []
    assert counts(usage_chunk["usage"]) == counts(expected["usage"])


def test_streaming_without_include_usage_has_no_usage_chunk(http: httpx.Client) -> None:
    payloads = sse_payloads(stream_lines(http, "/v1/completions", completion_body(stream=True)))
    assert all(len(p["choices"]) == 1 for p in payloads)
    assert all("usage" not in p for p in payloads)


# -- sampling -----------------------------------------------------------------------------------
def test_stop_string_cuts_text_before_it(http: httpx.Client) -> None:
    full = text_of(http, max_tokens=32)
    # a 3-character window from the middle that is whole text (no U+FFFD from split UTF-8)
    starts = [i for i in range(len(full) // 2, len(full) - 3) if "\ufffd" not in full[i:i + 3]]
    assert starts, f"no clean 3-character window in {full!r}"
    stop = full[starts[0]:starts[0] + 3]

    out = complete(http, max_tokens=32, stop=stop)
    [choice] = out["choices"]
    assert choice["finish_reason"] == "stop"
    assert choice["text"] == full[:full.index(stop)]
    assert stop not in choice["text"]
    assert out["usage"]["completion_tokens"] < 32


def test_stop_string_in_stream(http: httpx.Client) -> None:
    full = text_of(http, max_tokens=32)
    stop = next(full[i:i + 2] for i in range(len(full) // 2, len(full) - 2) if "\ufffd" not in full[i:i + 2])
    payloads = sse_payloads(stream_lines(
        http, "/v1/completions", completion_body(max_tokens=32, stop=[stop], stream=True)))
    assert "".join(p["choices"][0]["text"] for p in payloads) == full[:full.index(stop)]
    assert payloads[-1]["choices"][0]["finish_reason"] == "stop"


def test_seeded_sampling_is_reproducible(http: httpx.Client) -> None:
    first = text_of(http, temperature=1.0, seed=7, max_tokens=16)
    assert text_of(http, temperature=1.0, seed=7, max_tokens=16) == first


# -- errors, each followed by a normal request --------------------------------------------------
def test_unknown_model_is_404_listing_models(http: httpx.Client) -> None:
    err = assert_error(http.post("/v1/completions", json=completion_body(model="nope")), 404, "model_not_found")
    assert err["message"] == "model 'nope' not found; available: tiny, tiny-qwen"
    assert err["param"] == "model"
    assert_error(http.post("/v1/chat/completions", json=chat_body(model="nope")), 404, "model_not_found")
    assert_still_serving(http)


def test_prompt_longer_than_context_is_400(http: httpx.Client) -> None:
    err = assert_error(http.post("/v1/completions", json=completion_body(prompt="a" * 300)), 400,
                       "context_length_exceeded")
    assert "256" in err["message"]
    assert "300" in err["message"]
    err = assert_error(http.post("/v1/chat/completions",
                                 json=chat_body(messages=[{"role": "user", "content": "a" * 300}])),
                       400, "context_length_exceeded")
    assert "256" in err["message"]
    assert_still_serving(http)


def test_a_prompt_far_over_the_context_is_refused_from_its_head(http: httpx.Client) -> None:
    # 1 MB of prompt for a 256-token model: refused after tokenising its first 256 x 16
    # characters, not all of it (a 20 MB prompt took a pod 20 s, blocking its event loop)
    for path, body in (("/v1/completions", completion_body(prompt="a" * 1_000_000)),
                       ("/v1/chat/completions", chat_body(messages=[{"role": "user", "content": "a" * 1_000_000}]))):
        err = assert_error(http.post(path, json=body), 400, "context_length_exceeded")
        assert "256" in err["message"] and "its first 4096 characters alone are" in err["message"], err
    assert_still_serving(http)


@pytest.mark.parametrize("size, chunked, status", [
    (1000, False, 200),
    (1000, True, 200),  # read here up to the limit, then handed on
    (5000, False, 413),  # refused on its Content-Length, before the body is read
    (5000, True, 413),  # refused while reading
])
def test_a_body_over_the_size_limit_is_413(size: int, chunked: bool, status: int) -> None:
    from conftest import ADMIN_TOKEN, TINY_MODELS, TINY_POD

    from runtime.pod import Pod
    from runtime.server.app import create_app

    app = create_app(Pod(TINY_POD), admin_token=ADMIN_TOKEN, functions=[tiny_spec("tiny", TINY_MODELS["tiny"])],
                     max_request_bytes=4096)
    raw = json.dumps(completion_body(prompt="ab", max_tokens=2)).encode()
    raw += b" " * (size - len(raw))  # JSON allows trailing whitespace
    with serve_app(app) as url, httpx.Client(base_url=url, timeout=60) as c:
        content: Any = iter([raw[:100], raw[100:]]) if chunked else raw
        r = c.post("/v1/completions", content=content, headers={"content-type": "application/json"})
        if status == 413:
            err = assert_error(r, 413, "request_too_large")
            assert "4096 bytes" in err["message"]
        else:
            assert r.status_code == 200, r.text
        assert c.post("/v1/completions", json=completion_body(max_tokens=2)).status_code == 200


@pytest.mark.parametrize("chunked", [False, True])
def test_a_body_that_stops_arriving_is_408_and_one_that_trickles_in_time_is_served(chunked: bool) -> None:
    # Slowloris: headers, then part of the body, then nothing. Before, the connection and its task
    # were held forever (checked through `make run`: no answer after 40 s).
    from conftest import ADMIN_TOKEN, TINY_MODELS, TINY_POD

    from runtime.pod import Pod
    from runtime.server.app import create_app

    app = create_app(Pod(TINY_POD), admin_token=ADMIN_TOKEN, functions=[tiny_spec("tiny", TINY_MODELS["tiny"])],
                     read_timeout_s=0.5)
    raw = json.dumps(completion_body(prompt="ab", max_tokens=2)).encode()
    framing = b"Transfer-Encoding: chunked" if chunked else f"Content-Length: {len(raw)}".encode()
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" + framing + b"\r\n\r\n"

    def part(data: bytes, last: bool = False) -> bytes:
        if not chunked:
            return data
        return f"{len(data):x}\r\n".encode() + data + b"\r\n" + (b"0\r\n\r\n" if last else b"")

    with serve_app(app) as url:
        got, waited = slow_post(url, head, [part(raw[:10])], 0.0, 10)
        assert got.startswith(b"HTTP/1.1 408"), got[:200]
        assert 0.3 < waited < 3
        err = json.loads(got.split(b"\r\n\r\n", 1)[1])["error"]
        assert err["code"] == "request_timeout" and "after 10 bytes" in err["message"]
        # four parts 0.3 s apart: 1.2 s in all, but never 0.5 s without a byte
        cuts = [0, 10, 20, 30, len(raw)]
        parts = [part(raw[a:b], last=b == len(raw)) for a, b in zip(cuts, cuts[1:], strict=False)]
        got, _ = slow_post(url, head, parts, 0.3, 30)
        assert got.startswith(b"HTTP/1.1 200"), got[:300]
        with httpx.Client(base_url=url, timeout=60) as c:
            assert c.post("/v1/completions", json=completion_body(max_tokens=2)).status_code == 200


def test_headers_that_take_too_long_are_408_and_the_server_keeps_serving() -> None:
    # Slowloris on headers: part of a request line and nothing more, a new connection that sends
    # nothing, and a second request on a kept-alive connection that stops mid-headers. Before,
    # each held its connection for good (no answer after 40 s through `make run`).
    import socket

    from conftest import ADMIN_TOKEN, TINY_MODELS, TINY_POD

    from functions.http import http_protocol
    from runtime.pod import Pod
    from runtime.server.app import create_app

    app = create_app(Pod(TINY_POD), admin_token=ADMIN_TOKEN, functions=[tiny_spec("tiny", TINY_MODELS["tiny"])])
    with serve_app(app, http=http_protocol(0.5)) as url:
        got, waited = slow_post(url, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Le", [], 0.0, 10)
        assert got.startswith(b"HTTP/1.1 408"), got[:200]
        assert json.loads(got.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "request_timeout"
        assert 0.3 < waited < 3
        got, _ = slow_post(url, b"", [], 0.0, 10)
        assert got.startswith(b"HTTP/1.1 408"), got[:200]
        u = urlsplit(url)
        with socket.create_connection((u.hostname, u.port), timeout=10) as sock:
            body = json.dumps(completion_body(max_tokens=2)).encode()
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            first = b""
            while not first.rstrip().endswith(b"}"):
                first += sock.recv(65536)
            assert first.startswith(b"HTTP/1.1 200"), first[:200]
            time.sleep(0.3)  # slow, yet in time: the deadline is per request, from its first byte
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHo")
            t0 = time.monotonic()
            second = sock.recv(65536)
            assert second.startswith(b"HTTP/1.1 408") and 0.3 < time.monotonic() - t0 < 3, second[:200]
        with httpx.Client(base_url=url, timeout=60) as c:  # a request in time is served as before
            assert c.post("/v1/completions", json=completion_body(max_tokens=2)).status_code == 200
            assert c.get("/healthz").status_code == 200


def test_prompt_too_long_names_the_prompt_param(http: httpx.Client) -> None:
    err = assert_error(http.post("/v1/completions", json=completion_body(prompt="a" * 300)), 400)
    assert err["param"] == "prompt"


@pytest.mark.parametrize("body", [b'{"model": "tiny", "prompt": ',
                                  b'{"model": "tiny", "prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"])
def test_malformed_json_is_400(http: httpx.Client, body: bytes) -> None:
    r = http.post("/v1/completions", content=body, headers={"content-type": "application/json"})
    err = assert_error(r, 400, "invalid_json")
    assert err["param"] is None
    assert_still_serving(http)


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", b'{"model": "tiny", "prompt": "a\\ud800b", "max_tokens": 2}', "prompt"),
    ("/v1/chat/completions", b'{"model": "tiny", "messages": [{"role": "user", "content": "\\udc00"}]}', "messages"),
])
def test_text_with_a_lone_surrogate_is_400(http: httpx.Client, path: str, body: bytes, param: str) -> None:
    # valid JSON, not valid text: the tokenizer raised, and the activator retried the 500 until timeout_s
    err = assert_error(http.post(path, content=body, headers={"content-type": "application/json"}), 400,
                       "invalid_value")
    assert err["param"] == param and "not valid Unicode" in err["message"]
    assert_still_serving(http)


def test_an_unknown_path_is_404_in_shape(http: httpx.Client) -> None:
    assert_error(http.post("/v1/nope", json={}), 404)


def test_a_bug_is_a_500_in_shape(tiny_server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from runtime.engine.engine import LLMEngine

    def broken(self: object, prompt: str) -> list[int]:
        raise RuntimeError("a bug")

    monkeypatch.setattr(LLMEngine, "encode_prompt", broken)
    # the server runs in this process: the patched method is the one it calls
    r = httpx.post(f"{tiny_server}/v1/completions", json=completion_body(), timeout=30)
    assert r.status_code == 500
    assert r.json()["error"] == {"message": "internal error in the runtime: RuntimeError (logged)",
                                 "type": "server_error", "param": None, "code": "internal_error"}
    monkeypatch.undo()
    assert httpx.post(f"{tiny_server}/v1/completions", json=completion_body(max_tokens=2)).status_code == 200


@pytest.mark.parametrize("body, param, status", [
    (chat_body(messages=[{"role": "user", "content": "a"}] * 300), "messages", 400),  # > 256-token context
    (chat_body(messages=[{"role": "user", "content": ""}] * 70_000), "messages", 422),  # counted before parsing
    (chat_body(stop=["x"] * 17), "stop", 422),
    (chat_body(stop="x" * 1025), "stop", 422),
])
def test_request_shapes_past_any_use_are_refused(http: httpx.Client, body: dict[str, Any], param: str,
                                                 status: int) -> None:
    t0 = time.monotonic()
    err = assert_error(http.post("/v1/chat/completions", json=body), status)
    assert err["param"] == param and time.monotonic() - t0 < 2.0
    assert_still_serving(http)


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/v1/completions", completion_body(max_tokens="abc"), "max_tokens"),
    ("/v1/chat/completions", chat_body(messages="hi"), "messages"),
    ("/v1/completions", completion_body(temperature=-1), "temperature"),
    ("/v1/chat/completions", chat_body(n=17), "n"),
    ("/v1/chat/completions", chat_body(messages=[]), "messages"),
    ("/v1/completions", {"model": "tiny"}, "prompt"),
    ("/v1/chat/completions", chat_body(stream="no"), "stream"),
    ("/v1/completions", completion_body(stream=True, stream_options={"include_usage": "false"}),
     "stream_options.include_usage"),
    ("/v1/completions", completion_body(seed=10**30), "seed"),
    ("/v1/chat/completions", chat_body(messages=[{"role": "user"}]), "messages.0"),
    ("/v1/chat/completions", chat_body(frequency_penalty=2.5), "frequency_penalty"),
    ("/v1/completions", completion_body(presence_penalty=-3), "presence_penalty"),
    ("/v1/completions", completion_body(logit_bias={"a": 1}), "logit_bias"),
    ("/v1/completions", completion_body(logit_bias={"-1": 1}), "logit_bias"),
    ("/v1/chat/completions", chat_body(logit_bias={"5": 101}), "logit_bias.5"),
    ("/v1/completions", completion_body(logit_bias={"5": 1, "05": 2}), "logit_bias"),
    ("/v1/chat/completions", chat_body(logprobs=True, top_logprobs=21), "top_logprobs"),
    ("/v1/chat/completions", chat_body(top_logprobs=2), "top_logprobs"),  # needs logprobs: true
    ("/v1/chat/completions", chat_body(logprobs=1), "logprobs"),
    ("/v1/completions", completion_body(logprobs=-1), "logprobs"),
    ("/v1/completions", completion_body(logprobs=True), "logprobs"),
], ids=["max_tokens-str", "messages-str", "temperature-negative", "n-17", "messages-empty", "prompt-missing",
        "stream-str", "include_usage-str", "seed-past-64-bits",
        "user-without-content", "frequency_penalty-2.5", "presence_penalty--3", "logit_bias-word",
        "logit_bias-negative-id", "logit_bias-101", "logit_bias-id-twice", "top_logprobs-21",
        "top_logprobs-without-logprobs", "chat-logprobs-int", "completion-logprobs-negative",
        "completion-logprobs-true"])
def test_invalid_fields_are_422(http: httpx.Client, path: str, body: dict[str, Any], param: str) -> None:
    err = assert_error(http.post(path, json=body), 422, "invalid_value")
    assert err["param"] == param
    assert param in err["message"]
    assert_still_serving(http)


@pytest.mark.parametrize("ids", [[5, 320], [-1, 5]], ids=["past-vocab", "negative"])
def test_token_ids_out_of_vocab_are_400(http: httpx.Client, ids: list[int]) -> None:
    err = assert_error(http.post("/v1/completions", json=completion_body(prompt=ids)), 400)
    assert err["message"] == "token ids must be in [0, 320)"
    assert err["param"] == "prompt"
    assert_still_serving(http)


def test_logit_bias_past_the_vocabulary_is_400(http: httpx.Client) -> None:
    err = assert_error(http.post("/v1/completions", json=completion_body(logit_bias={"320": 5})), 400, "invalid_value")
    assert err["param"] == "logit_bias" and "[0, 320)" in err["message"]
    assert_still_serving(http)


@pytest.mark.parametrize(("path", "asks"), [
    ("/v1/chat/completions", {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}),
    ("/v1/chat/completions", {"tool_choice": "required"}),
    ("/v1/chat/completions", {"modalities": ["text", "audio"]}),
    ("/v1/completions", {"best_of": 2}),
    ("/v1/completions", {"suffix": "}"}),
], ids=lambda v: v if isinstance(v, str) and v.startswith("/") else "-".join(f"{k}={v[k]}"[:24] for k in v))
def test_what_we_do_not_serve_is_refused_not_ignored(http: httpx.Client, path: str, asks: dict[str, Any]) -> None:
    # Answered as if not asked, a client that wanted tool calls would get plain text and could
    # not tell.
    body = (chat_body if "chat" in path else completion_body)(**asks)
    err = assert_error(http.post(path, json=body), 400, "unsupported_parameter")
    (name,) = asks
    assert err["param"] == name and f"'{name}'" in err["message"]
    assert_still_serving(http)


@pytest.mark.parametrize(("path", "asks"), [
    ("/v1/chat/completions", {"logprobs": False,
                              "tools": [], "tool_choice": "auto", "parallel_tool_calls": True, "user": "u"}),
    ("/v1/completions", {"echo": False, "best_of": 1, "suffix": "", "logprobs": None, "user": "u"}),
], ids=["chat", "completion"])
def test_fields_set_to_ask_for_nothing_are_served(http: httpx.Client, path: str, asks: dict[str, Any]) -> None:
    body = (chat_body if "chat" in path else completion_body)(**asks)
    plain = (chat_body if "chat" in path else completion_body)()
    r, want = http.post(path, json=body), http.post(path, json=plain)
    assert r.status_code == 200, r.text
    assert r.json()["choices"] == want.json()["choices"]


def greedy_ids(http: httpx.Client, **asks: Any) -> list[int]:
    """The token ids of a greedy completion (from its stream's notes)."""
    events = noted_stream(http, "/v1/completions", completion_body(**{"max_tokens": 12, **asks}))
    return [i for note, _ in events for i in note.get("token_ids", [])]


def test_logit_bias_steers_and_bans_tokens(http: httpx.Client) -> None:
    plain = greedy_ids(http)
    forced = 100 + plain[0] % 100  # a byte token
    assert greedy_ids(http, logit_bias={str(forced): 100}) == [forced] * 12
    banned = greedy_ids(http, logit_bias={str(t): -100 for t in set(plain)})
    assert banned and not set(banned) & set(plain)


@pytest.mark.parametrize("asks", [{"frequency_penalty": 2.0}, {"presence_penalty": 2.0}, {"frequency_penalty": -2.0}],
                         ids=["frequency", "presence", "negative"])
def test_penalties_reach_the_sampler(http: httpx.Client, asks: dict[str, Any]) -> None:
    # The tiny model's logits spread over ~8 (std), so a penalty of 2 changes a greedy answer only
    # here and there: over 40 tokens, somewhere. sample()'s own tests check the arithmetic.
    plain = greedy_ids(http, max_tokens=40)
    got = greedy_ids(http, max_tokens=40, **asks)
    assert len(got) == len(plain) == 40 and got != plain


# -- n choices ---------------------------------------------------------------------------------
def test_n_choices_are_sampled_apart_and_each_as_one_request_would_be(http: httpx.Client) -> None:
    body = completion_body(temperature=1.0, seed=7, max_tokens=10, n=3, logprobs=1)
    out = http.post("/v1/completions", json=body).json()
    choices = out["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2]
    assert len({c["text"] for c in choices}) == 3  # seeds 7, 8, 9
    for i, c in enumerate(choices):  # each is what one request with its seed gives
        alone = complete(http, **{**body, "n": 1, "seed": 7 + i})["choices"][0]
        assert (c["text"], c["logprobs"]["tokens"]) == (alone["text"], alone["logprobs"]["tokens"])
    generated = sum(len(c["logprobs"]["tokens"]) for c in choices)  # a sampled end-of-sequence may come early
    assert counts(out["usage"]) == {"prompt_tokens": len(PROMPT), "completion_tokens": generated,
                                    "total_tokens": len(PROMPT) + generated}
    chat = http.post("/v1/chat/completions", json=chat_body(n=2)).json()["choices"]
    assert len(chat) == 2 and chat[0]["message"] == chat[1]["message"]  # greedy: the same answer twice


def test_n_choices_are_all_or_nothing(http: httpx.Client, monkeypatch: pytest.MonkeyPatch) -> None:
    # The third choice is refused (429): the answer is a 429, and the two admitted are aborted.
    from runtime.core.admission import Decision, RefusalReason
    from runtime.device_thread import AdmissionRefused, AsyncDevice

    real, calls = AsyncDevice.generate, []

    def third_refused(self: AsyncDevice, *a: Any, **kw: Any) -> Any:
        calls.append(a)
        if len(calls) == 3:
            async def refused() -> Any:
                raise AdmissionRefused(Decision(False, RefusalReason.MEMORY, 1.0, "simulated"))
                yield  # an async generator, as generate is
            return refused()
        return real(self, *a, **kw)

    assert_still_serving(http)  # (so the token counter has its label)
    monkeypatch.setattr(AsyncDevice, "generate", third_refused)
    before = metric(http.get("/metrics").text, "slinfer_generation_tokens_total")
    r = http.post("/v1/completions", json=completion_body(max_tokens=240, n=3))
    assert r.status_code == 429 and r.json()["error"]["code"] == "memory", r.text
    monkeypatch.undo()
    deadline = time.monotonic() + 5
    while not idle(http.get("/metrics").text):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    # aborted, not finished: 2 x 240 tokens had they run to the end
    assert metric(http.get("/metrics").text, "slinfer_generation_tokens_total") - before < 100
    assert_still_serving(http)


def test_n_choices_preempted_are_a_503_to_send_again(http: httpx.Client, monkeypatch: pytest.MonkeyPatch) -> None:
    # One answer of several choices cannot continue elsewhere choice by choice: sent again, whole.
    # (A single choice gets its continuation, as before.)
    from runtime.engine.engine import LLMEngine

    real = LLMEngine.step

    def evicting(self: LLMEngine, *a: Any, **kw: Any) -> Any:
        victims = [r.rid for r in self.scheduler.running if len(r.output_token_ids) >= 2]
        return [o for o in (self.evict(v) for v in victims) if o is not None] if victims else real(self, *a, **kw)

    monkeypatch.setattr(LLMEngine, "step", evicting)
    r = http.post("/v1/completions", json=completion_body(max_tokens=20, n=2))
    assert r.status_code == 503 and r.json()["error"]["code"] == "instance_unavailable", r.text
    one = http.post("/v1/completions", json=completion_body(max_tokens=20)).json()["choices"][0]
    assert one["finish_reason"] == "preempted" and one["continuation"]["output_token_ids"]
    monkeypatch.undo()
    assert_still_serving(http)


def test_n_with_stream_is_refused(http: httpx.Client) -> None:
    err = assert_error(http.post("/v1/chat/completions", json=chat_body(n=2, stream=True)), 400, "unsupported_parameter")
    assert err["param"] == "n"
    assert_still_serving(http)


# -- logprobs ----------------------------------------------------------------------------------
def stream_choices(http: httpx.Client, path: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    return [p["choices"][0] for p in sse_payloads(stream_lines(http, path, {**body, "stream": True})) if p["choices"]]


def test_chat_logprobs_name_each_token_with_its_top_alternatives(http: httpx.Client) -> None:
    body = chat_body(max_tokens=16, logprobs=True, top_logprobs=3)
    out = http.post("/v1/chat/completions", json=body).json()
    (choice,) = out["choices"]
    content = choice["logprobs"]["content"]
    assert len(content) == out["usage"]["completion_tokens"] == 16
    # the tokens' bytes spell the answer (byte tokens split characters; all text is out at the end;
    # special tokens have an entry but no text)
    special = set(byte_tokenizer().all_special_tokens)
    spelled = b"".join(bytes(e["bytes"]) for e in content if e["token"] not in special)
    assert spelled.decode("utf-8", "replace") == choice["message"]["content"]
    for e in content:
        top = e["top_logprobs"]
        assert len(top) == 3 and [t["logprob"] for t in top] == sorted((t["logprob"] for t in top), reverse=True)
        assert (e["token"], e["logprob"], e["bytes"]) == (top[0]["token"], top[0]["logprob"], top[0]["bytes"])  # greedy
        assert e["logprob"] <= 0 and sum(math.exp(t["logprob"]) for t in top) <= 1 + 1e-6
    # streamed: the same entries, each with the chunk that carries its text
    chunks = stream_choices(http, "/v1/chat/completions", body)
    assert chunks[0]["logprobs"] is None  # the role chunk
    assert [e for c in chunks[1:] for e in c["logprobs"]["content"]] == content
    # not asked: none
    assert http.post("/v1/chat/completions", json=chat_body()).json()["choices"][0]["logprobs"] is None


def test_a_token_s_logprob_is_the_same_decoded_or_prefilled(http: httpx.Client) -> None:
    # Token j's logprob, computed while decoding, equals the one a request whose prompt ends just
    # before it computes in its prefill: the invariant a continued stream's logprobs rest on.
    first = noted_stream(http, "/v1/completions", completion_body(max_tokens=10))
    prompt = first[0][0]["prompt_token_ids"]
    ids = [i for note, _ in first for i in note.get("token_ids", [])]
    full = complete(http, max_tokens=10, logprobs=5)["choices"][0]["logprobs"]
    for j in (0, 4, 9):
        one = complete(http, prompt=prompt + ids[:j], max_tokens=1, logprobs=5)["choices"][0]["logprobs"]
        assert one["tokens"] == [full["tokens"][j]]
        assert one["token_logprobs"][0] == pytest.approx(full["token_logprobs"][j], abs=1e-4)
        assert one["top_logprobs"][0].keys() == full["top_logprobs"][j].keys()


def test_completion_logprobs_in_the_completions_api_s_shape(http: httpx.Client) -> None:
    out = complete(http, max_tokens=12, logprobs=2)
    lp = out["choices"][0]["logprobs"]
    assert set(lp) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    assert all(len(lp[k]) == 12 for k in lp)
    assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:i]) for i in range(12)]
    for tok, value, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"], strict=True):
        assert 1 <= len(top) <= 3 and top[tok] == value == max(top.values())  # greedy: the chosen is the top
    chunks = stream_choices(http, "/v1/completions", completion_body(max_tokens=12, logprobs=2))
    assert {k: [x for c in chunks for x in c["logprobs"][k]] for k in lp} == lp
    # a continued stream's offsets go on from the text its client has
    ids = [i for note, _ in noted_stream(http, "/v1/completions", completion_body(max_tokens=12))
           for i in note.get("token_ids", [])]
    prompt = byte_tokenizer().encode(PROMPT)
    rest = complete(http, prompt=prompt + ids[:5], resumed_tokens=5, max_tokens=7, logprobs=2)
    assert rest["choices"][0]["logprobs"]["text_offset"] == lp["text_offset"][5:]
    # in chat's shape, for a chat stream the activator continues here
    chat_shape = complete(http, prompt=prompt + ids[:5], resumed_tokens=5, max_tokens=7, logprobs=2,
                          chat_logprobs=True)["choices"][0]["logprobs"]
    assert [e["logprob"] for e in chat_shape["content"]] == pytest.approx(lp["token_logprobs"][5:], abs=1e-4)


def test_logprobs_are_the_model_s_before_bias_and_penalties(http: httpx.Client) -> None:
    plain = complete(http, max_tokens=1, logprobs=5)["choices"][0]["logprobs"]
    biased = complete(http, max_tokens=1, logprobs=5, logit_bias={"150": 100, "151": 100},
                      frequency_penalty=2.0)["choices"][0]["logprobs"]
    assert biased["tokens"] != plain["tokens"]  # the bias chose the token (150 or 151) ...
    assert biased["token_logprobs"][0] < min(plain["top_logprobs"][0].values())  # ... an unlikely one
    top = dict(biased["top_logprobs"][0])
    top.pop(biased["tokens"][0])  # ... the top 5 stay the model's own
    assert top.items() <= plain["top_logprobs"][0].items()


def test_echo_puts_the_prompt_first_and_scores_it(http: httpx.Client) -> None:
    plain = complete(http, max_tokens=6)["choices"][0]["text"]
    echoed = complete(http, max_tokens=6, echo=True)
    assert echoed["choices"][0]["text"] == PROMPT + plain and echoed["choices"][0]["logprobs"] is None
    # max_tokens 0: the prompt's likelihood, as evaluation harnesses ask for it
    scored = complete(http, max_tokens=0, echo=True, logprobs=1)
    (choice,) = scored["choices"]
    assert choice["text"] == PROMPT and choice["finish_reason"] == "length"
    assert scored["usage"] == {"prompt_tokens": len(PROMPT), "completion_tokens": 0, "total_tokens": len(PROMPT),
                               "prompt_tokens_details": {"cached_tokens": 0}}  # a scored prompt is computed whole
    lp = choice["logprobs"]
    assert "".join(lp["tokens"]) == PROMPT and lp["text_offset"] == list(range(len(PROMPT)))
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert all(v < 0 for v in lp["token_logprobs"][1:]) and all(len(t) <= 2 for t in lp["top_logprobs"][1:])
    # with an answer: the prompt's entries, then the answer's, offsets running on
    both = complete(http, max_tokens=6, echo=True, logprobs=1)["choices"][0]["logprobs"]
    assert both["tokens"][:len(PROMPT)] == lp["tokens"] and len(both["tokens"]) == len(PROMPT) + 6
    assert both["text_offset"] == [sum(len(t) for t in both["tokens"][:i]) for i in range(len(PROMPT) + 6)]
    # streamed: the prompt is the first chunk
    for body in (completion_body(max_tokens=0, echo=True, logprobs=1), completion_body(max_tokens=6, echo=True)):
        chunks = stream_choices(http, "/v1/completions", body)
        assert chunks[0]["text"] == PROMPT
        assert "".join(c["text"] for c in chunks) == (PROMPT if body["max_tokens"] == 0 else PROMPT + plain)
        if body.get("logprobs") is not None:
            assert chunks[0]["logprobs"] == lp and len(chunks) == 2 and chunks[1]["finish_reason"] == "length"


@pytest.mark.parametrize("stream", [False, True])
def test_an_echo_preempted_before_its_first_token_is_a_503_to_send_again(http: httpx.Client, stream: bool,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    # Its prompt's logprobs are not all there, and a continuation elsewhere would not echo: the
    # activator sends a 503 before any answer to another instance, whole.
    from runtime.engine.engine import LLMEngine

    real = LLMEngine.step

    def evicting(self: LLMEngine, *a: Any, **kw: Any) -> Any:
        victims = [r.rid for r in (*self.scheduler.running, *self.scheduler.waiting)
                   if r.params.prompt_logprobs is not None and not r.output_token_ids]
        return [o for o in (self.evict(v) for v in victims) if o is not None] if victims else real(self, *a, **kw)

    monkeypatch.setattr(LLMEngine, "step", evicting)
    body = completion_body(max_tokens=0, echo=True, logprobs=1, stream=stream)
    r = http.post("/v1/completions", json=body)
    assert r.status_code == 503, r.text
    assert r.json()["error"]["code"] == "instance_unavailable" and "send it again" in r.json()["error"]["message"]
    assert complete(http, max_tokens=3)["usage"]["completion_tokens"] == 3  # others are served
    monkeypatch.undo()
    assert complete(http, max_tokens=0, echo=True, logprobs=1)["choices"][0]["text"] == PROMPT


def test_echo_asks_that_make_no_sense_are_refused(http: httpx.Client) -> None:
    err = assert_error(http.post("/v1/completions", json=completion_body(max_tokens=0)), 422, "invalid_value")
    assert err["param"] == "max_tokens" and "echo" in err["message"]
    ids = byte_tokenizer().encode(PROMPT)
    err = assert_error(http.post("/v1/completions", json=completion_body(prompt=ids, resumed_tokens=2, echo=True)), 400)
    assert err["param"] == "echo"
    assert_still_serving(http)


# -- structured output (response_format) --------------------------------------------------------
WORDS_SCHEMA = {"type": "object", "additionalProperties": False, "required": ["ok", "n", "words"],
                "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0, "maximum": 99},
                               "words": {"type": "array", "items": {"type": "string", "maxLength": 6},
                                         "minItems": 3, "maxItems": 3}}}
WORDS_FORMAT = {"type": "json_schema", "json_schema": {"name": "words", "schema": WORDS_SCHEMA}}


def assert_follows_words_schema(text: str) -> None:
    value = json.loads(text)
    assert set(value) == {"ok", "n", "words"} and isinstance(value["ok"], bool)
    assert isinstance(value["n"], int) and 0 <= value["n"] <= 99
    assert len(value["words"]) == 3 and all(isinstance(w, str) and len(w) <= 6 for w in value["words"])


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_json_schema_output_follows_the_schema_and_ends_there(http: httpx.Client, path: str) -> None:
    # A random-weight model writes what the grammar lets it: every token it could not is masked.
    make = chat_body if "chat" in path else completion_body
    body = make(max_tokens=200, response_format=WORDS_FORMAT)
    out = http.post(path, json=body).json()
    (choice,) = out["choices"]
    text = choice["message"]["content"] if "chat" in path else choice["text"]
    assert choice["finish_reason"] == "stop" and out["usage"]["completion_tokens"] < 200  # the grammar ended it
    assert_follows_words_schema(text)
    chunks = stream_choices(http, path, body)
    assert "".join((c.get("delta") or {}).get("content") or c.get("text") or "" for c in chunks) == text
    plain = http.post(path, json=make(max_tokens=40)).json()["choices"][0]
    with pytest.raises(ValueError):  # unconstrained, the same model writes no JSON
        json.loads(plain["message"]["content"] if "chat" in path else plain["text"])


def test_a_continued_structured_stream_goes_on_where_the_grammar_was(http: httpx.Client) -> None:
    # The guide of a continuation follows its resumed tokens first, so the rest is the same.
    body = completion_body(max_tokens=200, response_format=WORDS_FORMAT)
    events = noted_stream(http, "/v1/completions", body)
    ids = [i for note, _ in events for i in note.get("token_ids", [])]
    full = "".join(c["choices"][0]["text"] for _, c in events if c["choices"])
    prompt = events[0][0]["prompt_token_ids"]
    for k in (1, 9, len(ids) // 2):
        sent = byte_tokenizer().decode(ids[:k])
        rest = complete(http, prompt=prompt + ids[:k], resumed_tokens=k, max_tokens=200 - k, response_format=WORDS_FORMAT)
        if not sent.endswith("\ufffd"):  # (a split character is re-sent whole: text compared whole below)
            assert sent + rest["choices"][0]["text"] == full, f"after {k} tokens"
        assert rest["choices"][0]["finish_reason"] == "stop"
    # resumed tokens the grammar does not allow are refused, and the server goes on
    bad = byte_tokenizer().encode("xy")
    err = assert_error(http.post("/v1/completions", json=completion_body(prompt=prompt + bad, resumed_tokens=2,
                                                                          response_format=WORDS_FORMAT)), 400)
    assert "grammar" in err["message"]
    assert_still_serving(http)


@pytest.mark.parametrize(("fmt", "status"), [
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}, 400),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "minProperties": "x"}}}, 400),
    ({"type": "json_schema"}, 422),
    ({"type": "xml"}, 422),
    ("json", 422),
], ids=["type-nonsense", "minProperties-str", "json_schema-missing", "type-xml", "not-an-object"])
def test_a_response_format_we_cannot_enforce_is_refused(http: httpx.Client, fmt: Any, status: int) -> None:
    err = assert_error(http.post("/v1/chat/completions", json=chat_body(response_format=fmt)), status)
    assert (err["param"] or "").startswith("response_format")
    assert_still_serving(http)


def test_response_format_text_is_plain_output(http: httpx.Client) -> None:
    got = http.post("/v1/chat/completions", json=chat_body(response_format={"type": "text"})).json()
    assert got["choices"] == http.post("/v1/chat/completions", json=chat_body()).json()["choices"]


# -- disconnects, concurrency, metrics ----------------------------------------------------------
def idle(metrics_text: str) -> bool:
    return (metric(metrics_text, "slinfer_kv_blocks_used") == 0
            and metric(metrics_text, "slinfer_requests_running") == 0)


def wait_for_metrics(http: httpx.Client, done: Callable[[str], bool], step_first: bool = False,
                     timeout_s: float = 10.0) -> str:
    """/metrics once done(text) holds, or at timeout_s. With step_first, a short request runs
    before each read, so the engine steps and refreshes its gauges."""
    deadline = time.monotonic() + timeout_s
    while True:
        if step_first:
            assert_still_serving(http)
        text = http.get("/metrics").text
        if done(text) or time.monotonic() > deadline:
            return text
        time.sleep(0.05)


def open_stream_and_hang_up(http: httpx.Client, chunks: int) -> list[dict[str, Any]]:
    """Start a 200-token stream, read `chunks` events, and return them; leaving the block
    closes the connection. Asserts the request was still running while it was open."""
    with http.stream("POST", "/v1/completions", json=completion_body(max_tokens=200, stream=True)) as r:
        assert r.status_code == 200
        lines = (line for line in r.iter_lines() if line.startswith("data: "))
        events = [json.loads(next(lines)[len("data: "):]) for _ in range(chunks)]
        during = http.get("/metrics").text
        assert metric(during, "slinfer_kv_blocks_used") > 0
        assert metric(during, "slinfer_requests_running") == 1
    return events


def test_a_repeated_prompt_prefix_is_served_from_the_prefix_cache(http: httpx.Client) -> None:
    """The second request with the same 112-byte prompt finds its first 6 blocks (16 tokens
    each) cached, and answers as the first did; /metrics counts the tokens not computed again."""
    prompt = "A long shared instruction for every call of this function. " * 2  # 112 bytes
    before = metric(http.get("/metrics").text, "slinfer_prefix_cache_hit_tokens_total")
    answers = [http.post("/v1/completions", json=completion_body(prompt=prompt, max_tokens=6)).json()
               for _ in range(2)]
    assert answers[0]["choices"][0]["text"] == answers[1]["choices"][0]["text"]
    assert answers[1]["usage"]["prompt_tokens_details"]["cached_tokens"] >= 96  # as OpenAI reports it
    after = wait_for_metrics(http, lambda t: metric(t, "slinfer_prefix_cache_hit_tokens_total") > before)
    assert metric(after, "slinfer_prefix_cache_hit_tokens_total") - before >= 96


def test_client_disconnect_frees_kv_blocks(http: httpx.Client) -> None:
    events = open_stream_and_hang_up(http, chunks=2)
    assert [e["choices"][0]["finish_reason"] for e in events] == [None, None]
    after = wait_for_metrics(http, idle)
    assert metric(after, "slinfer_kv_blocks_used") == 0
    assert metric(after, "slinfer_requests_running") == 0


def test_client_disconnect_returns_blocks_to_the_pool(http: httpx.Client) -> None:
    """The abort itself frees the blocks: once a later step refreshes the gauges (a short request
    that finishes), nothing is left in use, running or waiting."""
    for _ in range(3):
        open_stream_and_hang_up(http, chunks=1)
    after = wait_for_metrics(http, idle, step_first=True)
    assert metric(after, "slinfer_kv_blocks_used") == 0
    assert metric(after, "slinfer_requests_running") == 0
    assert metric(after, "slinfer_requests_waiting") == 0


def test_concurrent_requests_match_sequential(http: httpx.Client, tiny_server: str) -> None:
    # every other one asks for logprobs: each batched row's must be its own
    bodies = [completion_body(prompt=f"request {i}: {PROMPT[: i + 1]}", max_tokens=4 + 2 * i,
                              logprobs=2 if i % 2 else None) for i in range(8)]
    alone = [complete(http, **b)["choices"][0] for b in bodies]

    async def all_at_once() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=tiny_server, timeout=60) as client:
            return await asyncio.gather(*(client.post("/v1/completions", json=b) for b in bodies))

    responses = asyncio.run(all_at_once())
    assert [r.status_code for r in responses] == [200] * 8
    together = [r.json()["choices"][0] for r in responses]
    assert [c["text"] for c in together] == [c["text"] for c in alone]
    for c, a in zip(together, alone, strict=True):
        assert (c["logprobs"] is None) == (a["logprobs"] is None)
        if a["logprobs"] is not None:
            assert c["logprobs"]["tokens"] == a["logprobs"]["tokens"]
            assert c["logprobs"]["token_logprobs"] == pytest.approx(a["logprobs"]["token_logprobs"], abs=1e-4)
    assert [r.json()["usage"]["completion_tokens"] for r in responses] == [b["max_tokens"] for b in bodies]


def test_metrics_count_requests_and_tokens(http: httpx.Client) -> None:
    before = http.get("/metrics").text
    complete(http, max_tokens=8)
    after = http.get("/metrics").text

    def delta(name: str) -> float:
        return metric(after, name) - metric(before, name)

    assert metric(after, "slinfer_time_to_first_token_seconds_count") > 0
    assert delta("slinfer_time_to_first_token_seconds_count") == 1
    assert delta("slinfer_generation_tokens_total") == 8
    assert delta("slinfer_prompt_tokens_total") == len(PROMPT)
    assert re.search(r"^slinfer_device_kv_budget_bytes 3\.3554432e\+07$", after, re.MULTILINE)
    assert 'slinfer_requests_total{finish_reason="length",model="tiny"}' in after


# -- the real model through the official client -------------------------------------------------
@pytest.mark.slow
def test_smollm2_with_openai_client() -> None:
    app = make_app([tiny_spec("smollm2", "bundled:smollm2-135m-instruct", max_context_tokens=1024)])
    with serve_app(app) as base_url:
        client = openai.OpenAI(base_url=base_url + "/v1", api_key="x")
        messages: Any = [{"role": "user", "content": "What is the capital of France?"}]
        chat = client.chat.completions.create(model="smollm2", messages=messages, temperature=0, max_tokens=40)
        content = chat.choices[0].message.content
        assert content is not None and "Paris" in content

        stream = client.chat.completions.create(model="smollm2", messages=messages, temperature=0,
                                                max_tokens=40, stream=True)
        streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        assert "Paris" in streamed
        assert streamed == content

        comp = client.completions.create(model="smollm2", prompt="The capital of France is", temperature=0,
                                         max_tokens=8)
        assert comp.object == "text_completion"
        assert comp.usage is not None and comp.usage.completion_tokens <= 8
        assert "Paris" in comp.choices[0].text

        # JSON mode, a schema, and logprobs through the client's own types
        ask = [{"role": "user", "content": "Give the capital of France as JSON."}]
        obj = client.chat.completions.create(model="smollm2", messages=ask, temperature=0, max_tokens=60,
                                             response_format={"type": "json_object"})
        assert obj.choices[0].finish_reason == "stop" and isinstance(json.loads(obj.choices[0].message.content or ""), dict)
        schema = {"type": "object", "properties": {"capital": {"type": "string"}}, "required": ["capital"],
                  "additionalProperties": False}
        fmt: Any = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}
        typed = client.chat.completions.create(model="smollm2", messages=ask, temperature=0, max_tokens=60,
                                               response_format=fmt, logprobs=True, top_logprobs=2)
        assert "Paris" in json.loads(typed.choices[0].message.content or "")["capital"]
        lp = typed.choices[0].logprobs
        assert lp is not None and lp.content is not None and len(lp.content) == typed.usage.completion_tokens  # type: ignore[union-attr]
        assert lp.content[0].token.startswith("{")


@pytest.mark.parametrize("header", ["slinfer-elapsed-s", "slinfer-first-token-age-s"])
@pytest.mark.parametrize("value", ["soon", "-1", "nan", "inf", "1e400", "86401", ""])
def test_a_bad_activator_header_is_400_and_harms_nothing(http: httpx.Client, header: str, value: str) -> None:
    r = http.post("/v1/completions", json=completion_body(), headers={header: value})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "invalid_header" and err["param"] == header and repr(value) in err["message"]
    assert complete(http)["choices"][0]["finish_reason"] == "length"


def test_the_elapsed_header_reaches_the_device_anchor(http: httpx.Client, monkeypatch: pytest.MonkeyPatch) -> None:
    from runtime.device import DeviceLoop

    seen: list[tuple[float, int, float | None]] = []
    real = DeviceLoop.anchor

    def spy(self: DeviceLoop, iid: str, prompt_tokens: int, now: float, received_s: float,
            elapsed_s: float = 0.0, resumed: int = 0, first_token_age_s: float | None = None) -> Any:
        seen.append((elapsed_s, resumed, first_token_age_s))
        return real(self, iid, prompt_tokens, now, received_s, elapsed_s, resumed, first_token_age_s)

    monkeypatch.setattr(DeviceLoop, "anchor", spy)
    plain = complete(http)
    r = http.post("/v1/completions", json=completion_body(), headers={"slinfer-elapsed-s": "0.25"})
    assert r.status_code == 200 and r.json()["choices"] == plain["choices"]  # same greedy text
    ids = byte_tokenizer().encode(PROMPT)
    r = http.post("/v1/completions", json=completion_body(prompt=ids, resumed_tokens=3),
                  headers={"slinfer-elapsed-s": "2", "slinfer-first-token-age-s": "1.5"})
    assert r.status_code == 200, r.text
    assert seen == [(0.0, 0, None), (0.25, 0, None), (2.0, 3, 1.5)]


def test_a_client_that_waits_for_100_continue_gets_the_413_without_sending_the_body() -> None:
    import socket
    from urllib.parse import urlsplit

    from conftest import ADMIN_TOKEN, TINY_MODELS, TINY_POD

    from runtime.pod import Pod
    from runtime.server.app import create_app

    app = create_app(Pod(TINY_POD), admin_token=ADMIN_TOKEN, functions=[tiny_spec("tiny", TINY_MODELS["tiny"])],
                     max_request_bytes=4096)
    with serve_app(app) as url:
        u = urlsplit(url)
        with socket.create_connection((u.hostname, u.port), timeout=10) as s:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 100000000\r\nExpect: 100-continue\r\n\r\n")
            head = s.recv(65536)
        assert head.startswith(b"HTTP/1.1 413") and b"request_too_large" in head, head[:200]


def test_the_body_limits_are_serve_options_and_reach_the_mesh_s_pods() -> None:
    from autoscaler.service.local import LocalPods, PodResources
    from runtime.cli import parse_serve

    assert parse_serve(["--no-functions", "--max-request-mb", "0.5"], env={}).max_request_bytes == 512 << 10
    assert parse_serve(["--no-functions"], env={}).max_request_bytes == 8 << 20
    with pytest.raises(SystemExit):
        parse_serve(["--no-functions", "--max-request-mb", "-1"], env={})
    pods = LocalPods(1, "t", PodResources(max_request_mb=2.0, read_timeout_s=5.0))
    cmd = pods._command(pods.children[0])
    assert cmd[cmd.index("--max-request-mb") + 1] == "2.0"
    settings = parse_serve(cmd[cmd.index("serve") + 1:], env={})
    assert settings.max_request_bytes == 2 << 20 and settings.read_timeout_s == 5.0
    assert parse_serve(["--no-functions"], env={}).read_timeout_s == 60.0
    assert "--memory-limit-mb" not in cmd  # the pods read their own cgroup and host
    limited = LocalPods(1, "t", PodResources(memory_limit_mb=1500))
    limit_cmd = limited._command(limited.children[0])
    assert parse_serve(limit_cmd[limit_cmd.index("serve") + 1:], env={}).pod.memory_limit_bytes == 1500 << 20
    with pytest.raises(SystemExit):
        parse_serve(["--no-functions", "--read-timeout-s", "-1"], env={})


def noted_stream(http: httpx.Client, path: str, body: dict[str, Any]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(note, payload) per event of a stream asked for notes (TOKEN_IDS_HEADER), [DONE] left out;
    an event without a note has {} for it."""
    from functions import STREAM_NOTE, TOKEN_IDS_HEADER

    with http.stream("POST", path, json={**body, "stream": True}, headers={TOKEN_IDS_HEADER: "1"}) as r:
        assert r.status_code == 200
        raw = r.read().decode()
    out = []
    for event in raw.split("\n\n"):
        if not event or event == "data: [DONE]":
            continue
        note: dict[str, Any] = {}
        if event.startswith(STREAM_NOTE):
            line, event = event.split("\n", 1)
            note = json.loads(line[len(STREAM_NOTE):])
        assert event.startswith("data: {") and "\n" not in event, event
        out.append((note, json.loads(event[len("data: "):])))
    return out


@pytest.mark.parametrize("stop", [None, ["\x00\x01"]])
def test_stream_notes_name_the_ids_behind_the_text_so_far(http: httpx.Client, stop: list[str] | None) -> None:
    # At every event boundary, another instance given prompt + the ids named so far (resumed_tokens
    # = their count) continues with exactly the text not yet sent, held-back bytes of a character
    # or a possible stop string included: what the activator relies on when a pod dies mid-stream.
    # Byte tokens make incomplete UTF-8 sequences common; the stop string is never matched, but
    # any of its prefixes is held back.
    n = 40
    plain = complete(http, max_tokens=n, stop=stop)
    events = noted_stream(http, "/v1/completions",
                          completion_body(max_tokens=n, stop=stop, stream_options={"include_usage": True}))
    *chunks, (usage_note, usage) = events
    assert usage_note == {} and counts(usage["usage"]) == counts(plain["usage"])
    assert all(note for note, _ in chunks), "every event but the usage carries a note"
    first = chunks[0][0]
    assert first["prompt_token_ids"] == byte_tokenizer().encode(PROMPT) and first["max_tokens"] == n
    assert all(set(note) <= {"token_ids", "finish_reason"} for note, _ in chunks[1:])
    # the last text and the finish come in one event, and only it names the finish
    assert [c["choices"][0]["finish_reason"] for _, c in chunks] == [None] * (len(chunks) - 1) + ["length"]
    assert [note.get("finish_reason") for note, _ in chunks] == [None] * (len(chunks) - 1) + ["length"]
    ids = [i for note, _ in chunks for i in note["token_ids"]]
    assert len(ids) == n
    texts = [c["choices"][0]["text"] for _, c in chunks]
    full = "".join(texts)
    assert full == plain["choices"][0]["text"]
    held = 0
    for k in range(1, len(chunks) - 1, 3):
        so_far = [i for note, _ in chunks[:k] for i in note["token_ids"]]
        sent = "".join(texts[:k])
        rest = complete(http, prompt=first["prompt_token_ids"] + so_far, resumed_tokens=len(so_far),
                        max_tokens=n - len(so_far), stop=stop)
        assert sent + rest["choices"][0]["text"] == full, f"after event {k}"
        held += len(so_far) > len(sent.encode("utf-8", "surrogatepass"))
    assert held, "no boundary held text back: the test would not see a mismatch there"


def test_a_chat_stream_s_first_note_rides_on_the_role_chunk(http: httpx.Client) -> None:
    events = noted_stream(http, "/v1/chat/completions", chat_body(max_tokens=5))
    (note, role), *rest = events
    assert role["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert note["token_ids"] == [] and len(note["prompt_token_ids"]) > len(PROMPT) and note["max_tokens"] == 5
    assert sum(len(n["token_ids"]) for n, _ in rest) == 5
    assert rest[-1][1]["choices"][0]["finish_reason"] == "length"


def test_a_stream_not_asked_for_notes_has_none(http: httpx.Client) -> None:
    lines = stream_lines(http, "/v1/completions", completion_body(stream=True))
    assert not any(line.startswith(":") for line in lines)
    assert sse_payloads(lines)[-1]["choices"][0]["finish_reason"] == "length"


def test_finished_requests_are_counted_by_how_they_did_against_the_slo() -> None:
    from functions import ELAPSED_HEADER, FIRST_TOKEN_AGE_HEADER, SLO

    tiny = "random:llama-tiny?seed=0"
    specs = [tiny_spec("easy", tiny), tiny_spec("instant", tiny, slo=SLO(ttft_base_s=1e-6, prefill_rate_tok_s=1e9)),
             tiny_spec("rushed", tiny, slo=SLO(tpot_s=1e-6))]
    with serve_app(make_app(specs)) as base:
        def ask(model: str, headers: dict[str, str] | None = None, **kw: Any) -> None:
            body = {"model": model, "prompt": PROMPT, "max_tokens": 8, "temperature": 0, **kw}
            r = httpx.post(f"{base}/v1/completions", json=body, headers=headers or {}, timeout=60)
            assert r.status_code == 200, r.text

        def counted() -> dict[tuple[str, str], float]:
            rows = re.findall(r'^slinfer_slo_requests_total\{model="([^"]+)",outcome="([^"]+)"\} (\S+)$',
                              httpx.get(f"{base}/metrics").text, re.M)
            return {(m, o): float(v) for m, o, v in rows}

        ask("easy")
        ask("easy", stream=True)
        ask("instant")  # alone on the device it is admitted, and late
        ask("rushed")
        ask("easy", {ELAPSED_HEADER: "30"})  # it waited 30 s before it came here
        # a continuation whose first token came 60 s ago and has 3 tokens out: 60 s over 10 gaps
        ids = list(PROMPT.encode()) + [65, 66, 67]
        ask("easy", {ELAPSED_HEADER: "60.5", FIRST_TOKEN_AGE_HEADER: "60"}, prompt=ids, resumed_tokens=3)
        assert counted() == {("easy", "met"): 2, ("easy", "ttft_missed"): 1, ("easy", "tpot_missed"): 1,
                             ("instant", "ttft_missed"): 1, ("rushed", "tpot_missed"): 1}


def test_the_memory_limit_is_a_serve_option() -> None:
    from runtime.cli import parse_serve

    assert parse_serve(["--no-functions"], env={}).pod.memory_limit_bytes is None  # the cgroup's and the host's
    assert parse_serve(["--no-functions", "--memory-limit-mb", "2048"], env={}).pod.memory_limit_bytes == 2 << 30
    with pytest.raises(SystemExit):
        parse_serve(["--no-functions", "--memory-limit-mb", "-1"], env={})


def test_a_pod_does_not_start_with_a_kv_budget_past_its_memory() -> None:
    import subprocess
    import sys

    from runtime.cli import kv_budget_refusal
    from runtime.host_memory import MemoryReading

    assert kv_budget_refusal(1 << 30, MemoryReading(4 << 30, 2 << 30, "cgroup v2")) is None
    why = kv_budget_refusal(3 << 30, MemoryReading(4 << 30, 2 << 30, "cgroup v2"))
    assert why == "--kv-budget-mb 3072 is more than the 2048 MiB this pod has free (cgroup v2); lower it, " \
                  "or give the pod more memory"
    r = subprocess.run([sys.executable, "-m", "runtime.cli", "serve", "--no-functions", "--memory-limit-mb", "100",
                        "--kv-budget-mb", "1024", "--port", "1"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "--kv-budget-mb 1024 is more than the" in r.stderr, r.stderr[-2000:]
