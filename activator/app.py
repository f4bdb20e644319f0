"""The activator's ASGI app: probes, routing to a function, waiting for capacity, relaying answers.

    probes (middleware)   Knative's K-Network-Probe headers, before anything else
    routing               model = function name (OpenAI API), /functions/{name}, Knative's
                          Knative-Serving-Revision header or Host <name>.<ns>...
    dispatch              the instance that admits, or wait (queue, demand, 503/504)
    relay                 stream or answer back, continuing preempted requests elsewhere
    events                CloudEvents in (binary/structured) and the reply event out

Errors answer in OpenAI's shape ``{"error": {message, type, param, code}}`` with the right status.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from activator import events
from activator.dispatch import (
    DEFAULT_RETRY_SLOTS,
    Dispatcher,
    DispatchTimeout,
    Elapsed,
    FunctionDeleted,
    FunctionUnavailable,
    Upstream,
)
from activator.metrics import ActivatorMetrics
from activator.relay import EventStreamResponse, StreamRelay, complete_moving, until_disconnect
from activator.routes import HTTPRouteSource, RouteSource, RouteView
from activator.upstream import UpstreamClient, UpstreamError
from activator.waiting import DemandReporter, QueueFull, WaitingRoom
from functions import TOKEN_IDS_HEADER, FunctionSpec
from functions.http import MAX_REQUEST_BYTES, READ_TIMEOUT_S, BodyLimit

log = logging.getLogger("slinfer.activator")
_REVISION_SUFFIX = re.compile(r"-\d{5}$")  # Knative revision names: <service>-00001


@dataclass(frozen=True)
class ActivatorSettings:
    autoscaler_url: str = "http://127.0.0.1:8081"
    token: str = ""
    queue_limit: int = 10_000  # per function, like Knative's stock activator
    demand_interval_s: float = 0.5
    first_routes_timeout_s: float = 5.0
    queue_full_retry_after_s: int = 1
    # Held requests of a function retrying at once (activator.dispatch.RetryGate); 0: no gate.
    retry_slots: int = DEFAULT_RETRY_SLOTS
    max_request_bytes: int = MAX_REQUEST_BYTES  # 413 above it (functions.http.BodyLimit); 0: none
    # 408 when a body stops arriving this long (slow headers: the server's protocol, functions.http); 0: never
    read_timeout_s: float = READ_TIMEOUT_S


class APIError(Exception):
    def __init__(self, status: int, message: str, code: str, type_: str = "invalid_request_error",
                 headers: dict[str, str] | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.type = status, message, code, type_
        self.headers = headers or {}
        self.param = param

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


class ProbeMiddleware:
    """Knative's probes: ``K-Network-Probe: probe`` -> 200 echoing ``K-Network-Hash`` (ingress
    readiness); ``K-Network-Probe: activator`` -> body ``activator``."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            probe = None
            hash_ = b""
            for k, v in scope["headers"]:
                if k == b"k-network-probe":
                    probe = v
                elif k == b"k-network-hash":
                    hash_ = v
            if probe is not None:
                if probe == b"activator":
                    resp: Response = PlainTextResponse("activator")
                else:
                    resp = PlainTextResponse("", headers={"K-Network-Hash": hash_.decode("latin-1")})
                await resp(scope, receive, send)
                return
        await self.app(scope, receive, send)


class Activator:
    """The state of one activator: the route view, the waiting room, the dispatcher, metrics."""

    def __init__(self, settings: ActivatorSettings, source: RouteSource | None = None) -> None:
        self.settings = settings
        self.metrics = ActivatorMetrics()
        self.routes = RouteView()
        self.room = WaitingRoom(settings.queue_limit)
        self._source = source
        self.client: httpx.AsyncClient | None = None
        self.dispatcher: Dispatcher | None = None

    @asynccontextmanager
    async def lifespan(self, _: Starlette) -> AsyncIterator[None]:
        upstream = UpstreamClient()

        def cut(url: str) -> None:
            if n := upstream.cut(url):
                log.warning("pod %s is gone: moving the %d requests in flight there", url, n)

        self.routes.on_gone = cut
        async with httpx.AsyncClient(timeout=httpx.Timeout(None, connect=5.0)) as client:
            self.client = client
            source = self._source or HTTPRouteSource(self.settings.autoscaler_url, self.settings.token, client)
            self.dispatcher = Dispatcher(self.routes, self.room, upstream, self.metrics, self.settings.retry_slots)
            tasks = [asyncio.create_task(self.routes.follow(source), name="routes"),
                     asyncio.create_task(DemandReporter(self.room, source, self.routes, self.settings.demand_interval_s).run(),
                                         name="demand")]
            await self.routes.changed(self.settings.first_routes_timeout_s)
            try:
                yield
            finally:
                for t in tasks:
                    t.cancel()
                for t in tasks:
                    with contextlib.suppress(asyncio.CancelledError):
                        await t
                await upstream.aclose()

    # -- routing ------------------------------------------------------------------------------
    def function(self, name: str | None) -> FunctionSpec:
        table = self.routes.table
        spec = table.functions.get(name or "")
        if spec is None and name:
            spec = table.functions.get(_REVISION_SUFFIX.sub("", name))
        if spec is None:
            deployed = ", ".join(sorted(table.functions)) or "none"
            what = f"function '{name}' not found" if name else "no function named (set 'model')"
            raise APIError(404, f"{what}; deployed: {deployed}", "function_not_found")
        return spec

    def knative_function(self, request: Request) -> str | None:
        """The function Knative's ingress named: the revision header, else Host <name>.<ns>..."""
        rev = request.headers.get("knative-serving-revision")
        if rev:
            return rev
        host = request.headers.get("host", "").split(":", 1)[0]
        label, _, rest = host.partition(".")
        if rest and not label.isdigit():
            table = self.routes.table.functions
            if label in table or _REVISION_SUFFIX.sub("", label) in table:
                return label
        return None

    # -- forwarding ---------------------------------------------------------------------------
    async def open(self, spec: FunctionSpec, path: str, body: dict[str, Any], raw: bytes | None = None,
                   elapsed: Elapsed | None = None, headers: dict[str, str] | None = None) -> Upstream:
        assert self.dispatcher is not None
        try:
            return await self.dispatcher.open(spec, path, body, raw, elapsed=elapsed, headers=headers)
        except QueueFull as e:
            retry = str(self.settings.queue_full_retry_after_s)
            raise APIError(503, str(e), "queue_full", "server_error", {"Retry-After": retry}) from e
        except FunctionUnavailable as e:
            raise APIError(503, str(e), "function_unavailable", "server_error") from e
        except FunctionDeleted as e:
            raise APIError(404, str(e), "function_not_found") from e
        except DispatchTimeout as e:
            raise APIError(504, str(e), "timeout", "server_error") from e

    async def forward(self, spec: FunctionSpec, path: str, body: dict[str, Any], chat: bool,
                      raw: bytes | None = None) -> Response:
        t0 = time.monotonic()
        self.room.arrivals[spec.name] += 1  # once per client request (reopen is a continuation)
        elapsed = Elapsed(t0)  # its deadlines keep running across the instances it visits
        # a stream's events name their token ids, so it can go on elsewhere if its pod dies
        notes = {TOKEN_IDS_HEADER: "1"} if body.get("stream") else None
        up = await self.open(spec, path, body, raw, elapsed, notes)

        async def reopen(p: str, b: dict[str, Any], first_token_at: float | None) -> Upstream:
            if elapsed.first_token_at is None:
                elapsed.first_token_at = first_token_at
            return await self.open(spec, p, b, elapsed=elapsed, headers=notes)

        status = up.response.status_code
        self.metrics.requests.labels(spec.name, str(status)).inc()
        try:
            if status != 200:  # about the request itself (400, 422): the runtime's answer as it is
                raw = await up.response.aread()
                await up.close()
                self.metrics.errors.labels(spec.name, _error_code(raw, status)).inc()
                return Response(raw, status_code=status, media_type="application/json")
            if body.get("stream"):
                relay = StreamRelay(up, reopen, body, chat, self.metrics, spec.name, t0)
                return EventStreamResponse(relay.__aiter__(), {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            code, payload = await complete_moving(up, reopen, body, chat, spec.name, self.metrics, path)
        except UpstreamError as e:  # its pods died while answering, one after another
            await up.close()
            raise APIError(502, f"function '{spec.name}' failed while answering: {e}", "upstream_failed",
                           "server_error") from e
        self.metrics.ttft.labels(spec.name).observe(time.monotonic() - t0)
        if isinstance(payload, bytes):
            return Response(payload, status_code=code, media_type="application/json")
        return JSONResponse(payload, status_code=code)


def _function_label(request: Request) -> str:
    """The function a request named, once resolved (its metrics label); "-" before that, never a
    name the client made up (each one would be a new time series, kept forever)."""
    spec = getattr(request.state, "function", None)
    return spec.name if isinstance(spec, FunctionSpec) else "-"


class ClientLeft(Exception):
    """The client disconnected before its answer was ready."""


async def _unless_client_leaves(request: Request, work: Coroutine[Any, Any, Response]) -> Response:
    """Run a handler, cancelled if the client disconnects first (a timeout on its side): a request
    held for capacity leaves the queue, and a non-streaming answer being computed is dropped,
    which closes the upstream connection, so the pod stops generating it instead of finishing
    work nobody will read. (A stream's response watches for itself once it is under way.)
    The body must have been read: after it, the server's receive() only reports a disconnect."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(until_disconnect(request.receive))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:  # also when this request is cancelled (shutdown): neither task outlives it
        gone.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
    if task.cancelled():
        raise ClientLeft
    return task.result()


def _error_code(raw: bytes, status: int) -> str:
    with contextlib.suppress(ValueError, AttributeError, TypeError):
        code = json.loads(raw)["error"]["code"]
        if isinstance(code, str):
            return code
    return str(status)


async def _json_body(request: Request) -> tuple[dict[str, Any], bytes]:
    raw = await request.body()
    try:
        body = json.loads(raw)
    except ValueError:
        raise APIError(400, "request body is not valid JSON", "invalid_json") from None
    except RecursionError:
        raise APIError(400, "request body is nested too deeply", "invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, "request body must be a JSON object", "invalid_request")
    return body, raw


def create_app(settings: ActivatorSettings, source: RouteSource | None = None) -> ASGIApp:
    act = Activator(settings, source)

    def guarded(handler: Any) -> Any:
        async def endpoint(request: Request) -> Response:
            try:
                await request.body()  # read (and kept for the handler) before watching for a disconnect
                resp: Response = await _unless_client_leaves(request, handler(request))
                return resp
            except APIError as e:
                act.metrics.errors.labels(_function_label(request), e.code).inc()
                return e.response()
            except (ClientLeft, ClientDisconnect):
                act.metrics.errors.labels(_function_label(request), "client_closed").inc()
                return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
            except Exception:  # a bug of ours: logged, and the client still gets an answer in shape
                log.exception("unexpected error answering %s %s", request.method, request.url.path)
                act.metrics.errors.labels(_function_label(request), "internal_error").inc()
                return APIError(500, "internal error in the activator (logged)", "internal_error",
                                "server_error").response()
        return endpoint

    async def openai(request: Request, path: str, chat: bool) -> Response:
        body, raw = await _json_body(request)
        model = body.get("model")
        if model is not None and not isinstance(model, str):
            raise APIError(400, "'model' must be a string: the function's name", "invalid_value", param="model")
        spec = request.state.function = act.function(model or act.knative_function(request))
        if model == spec.name:  # as the runtime wants it: forward the client's bytes
            return await act.forward(spec, path, body, chat, raw)
        body["model"] = spec.name
        return await act.forward(spec, path, body, chat)

    async def chat(request: Request) -> Response:
        return await openai(request, "/v1/chat/completions", chat=True)

    async def completions(request: Request) -> Response:
        return await openai(request, "/v1/completions", chat=False)

    async def invoke_named(request: Request) -> Response:
        return await invoke(request, act.function(request.path_params["name"]))

    async def invoke_knative(request: Request) -> Response:
        name = act.knative_function(request)
        if name is None:
            raise APIError(404, f"no route for {request.url.path}; call /v1/chat/completions, "
                                f"/v1/completions or /functions/<name>", "not_found")
        return await invoke(request, act.function(name))

    async def invoke(request: Request, spec: FunctionSpec) -> Response:
        """The function's default invocation: a CloudEvent, an OpenAI chat body, or a prompt."""
        request.state.function = spec
        try:
            mode = events.event_mode(request.headers)
        except events.BadEvent as e:
            raise APIError(400, str(e), "invalid_cloudevent") from e
        if mode is not None:
            return await invoke_event(request, spec, mode)
        ctype = request.headers.get("content-type", "")
        if ctype.startswith("application/json"):
            body, _ = await _json_body(request)
            if "messages" not in body:
                prompt = body.pop("prompt", None)
                if not isinstance(prompt, str) or not prompt:
                    raise APIError(400, "send {'prompt': '...'} or an OpenAI chat body with 'messages'",
                                   "invalid_request")
                body["messages"] = [{"role": "user", "content": prompt}]
        else:
            text = (await request.body()).decode("utf-8", errors="replace")
            if not text.strip():
                raise APIError(400, "the request body is empty; send the prompt as text or JSON", "invalid_request")
            body = {"messages": [{"role": "user", "content": text}]}
        body["model"] = spec.name
        return await act.forward(spec, "/v1/chat/completions", body, chat=True)

    async def invoke_event(request: Request, spec: FunctionSpec, mode: events.Mode) -> Response:
        raw = await request.body()
        try:
            event = events.parse_event(request.headers, raw)
            prompt = spec.event_prompt(events.event_text(event))
        except events.BadEvent as e:
            raise APIError(400, str(e), "invalid_cloudevent") from e
        body = {"model": spec.name, "temperature": 0, "messages": [{"role": "user", "content": prompt}]}
        resp = await act.forward(spec, "/v1/chat/completions", body, chat=True)
        if resp.status_code != 200:
            return resp
        answer = json.loads(bytes(resp.body))
        text = answer["choices"][0]["message"]["content"] or ""
        try:
            reply = events.reply_event(spec, text, event)
        except ValueError as e:  # a function's JSON cut at max_output_tokens: no reply to forward
            raise APIError(502, f"function '{spec.name}' answered with incomplete JSON (finish_reason "
                           f"{answer['choices'][0].get('finish_reason')!r}; max_output_tokens is "
                           f"{spec.max_output_tokens}): {e}", "incomplete_output", "server_error") from e
        msg = events.encode(reply, mode)
        return Response(msg.body, status_code=200, headers=msg.headers)

    async def models(_: Request) -> Response:
        table = act.routes.table
        data = [{"id": name, "object": "model", "created": 0, "owned_by": "slinfer",
                 "ready_instances": len(table.endpoints_of(name)), "max_model_len": spec.max_context_tokens,
                 # a typed function's promise, for clients to read before they call
                 **({"output_schema": json.loads(spec.output_schema)} if spec.output_schema is not None else {})}
                for name, spec in sorted(table.functions.items())]
        return JSONResponse({"object": "list", "data": data})

    async def healthz(_: Request) -> Response:
        return JSONResponse({"status": "ok", "routes_version": act.routes.table.version})

    async def metrics(_: Request) -> Response:
        return Response(generate_latest(act.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    app = Starlette(routes=[
        Route("/healthz", healthz, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/chat/completions", guarded(chat), methods=["POST"]),
        Route("/v1/completions", guarded(completions), methods=["POST"]),
        Route("/functions/{name}", guarded(invoke_named), methods=["POST"]),
        Route("/{path:path}", guarded(invoke_knative), methods=["POST"]),
    ], lifespan=act.lifespan)
    app.state.activator = act
    return ProbeMiddleware(BodyLimit(app, settings.max_request_bytes, settings.read_timeout_s))
