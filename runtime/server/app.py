"""The runtime's public HTTP API: OpenAI-compatible completions and chat, models, health, metrics."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from runtime.core.request import SamplingParams
from runtime.engine.async_engine import AsyncEngine, EngineDeadError
from runtime.engine.engine import RequestOutput
from runtime.server.metrics import ServerMetrics
from runtime.server.protocol import ChatCompletionRequest, CompletionRequest, error_body


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param


@dataclass
class ServedModel:
    name: str
    engine: AsyncEngine
    system_prompt: str | None = None
    created: int = 0

    @property
    def max_model_len(self) -> int:
        return self.engine.engine.max_model_len


def create_app(models: list[ServedModel], metrics: ServerMetrics | None = None) -> FastAPI:
    by_name = {m.name: m for m in models}
    met = metrics or ServerMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        for m in models:
            if not m.engine.alive:
                m.engine._on_step = lambda eng, dt, name=m.name: met.observe_engine(name, eng, dt)
                m.engine.start(loop)
            met.observe_engine(m.name, m.engine.engine)
        yield
        for m in models:
            m.engine.stop()

    app = FastAPI(title="slinfer runtime", lifespan=lifespan)
    app.state.models = by_name
    app.state.metrics = met

    # -- errors in OpenAI's shape -----------------------------------------------------------
    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError) -> JSONResponse:
        met.errors.labels(str(e.status)).inc()
        return JSONResponse(error_body(e.message, e.type, e.code, e.param), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, e: RequestValidationError) -> JSONResponse:
        errs = e.errors()
        if any(err.get("type") == "json_invalid" for err in errs):
            met.errors.labels("400").inc()
            return JSONResponse(error_body("request body is not valid JSON", "invalid_request_error",
                                           "invalid_json"), status_code=400)
        first = errs[0] if errs else {}
        loc = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        msg = "; ".join(f"{'.'.join(str(p) for p in er.get('loc', ()) if p != 'body')}: {er.get('msg')}"
                        for er in errs[:5])
        met.errors.labels("422").inc()
        return JSONResponse(error_body(msg, "invalid_request_error", "invalid_value", loc or None),
                            status_code=422)

    def lookup(name: str) -> ServedModel:
        m = by_name.get(name)
        if m is None:
            raise APIError(404, f"model '{name}' not found; available: {', '.join(sorted(by_name))}",
                           code="model_not_found", param="model")
        return m

    # -- plain endpoints --------------------------------------------------------------------
    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        dead = [m.name for m in models if not m.engine.alive]
        if dead:
            return JSONResponse({"status": "unhealthy", "dead_engines": dead}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics_endpoint() -> Response:
        return Response(generate_latest(met.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [
            {"id": m.name, "object": "model", "created": m.created, "owned_by": "slinfer",
             "max_model_len": m.max_model_len} for m in models
        ]}

    # -- generation -------------------------------------------------------------------------
    def check_prompt(m: ServedModel, ids: list[int], param: str) -> None:
        if not ids:
            raise APIError(400, "the prompt is empty", param=param)
        if len(ids) >= m.max_model_len:
            raise APIError(
                400,
                f"this model's maximum context length is {m.max_model_len} tokens; your prompt has "
                f"{len(ids)} tokens (at least 1 must be left for the output)",
                code="context_length_exceeded", param=param,
            )

    def prompt_ids(eng: Any, prompt: str | list[str] | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return list(eng.encode_prompt(prompt))
        if prompt and all(isinstance(x, int) for x in prompt):
            ids = [int(x) for x in prompt]
            vocab = eng.loaded.config.vocab_size
            if any(i < 0 or i >= vocab for i in ids):
                raise APIError(400, f"token ids must be in [0, {vocab})", param="prompt")
            return ids
        if len(prompt) != 1 or not isinstance(prompt[0], str):
            raise APIError(400, "exactly one prompt per request is supported", param="prompt")
        return list(eng.encode_prompt(prompt[0]))

    def params_of(req: CompletionRequest | ChatCompletionRequest, max_tokens: int) -> SamplingParams:
        return SamplingParams(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
                              seed=req.seed, stop=req.stop_list())

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        m = lookup(body.model)
        eng = m.engine.engine
        ids = prompt_ids(eng, body.prompt)
        check_prompt(m, ids, "prompt")
        params = params_of(body, body.max_tokens or 16)
        return await run(m, request, ids, params, body.stream, chat=False,
                         include_usage=bool(body.stream_options and body.stream_options.include_usage))

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, request: Request) -> Response:
        m = lookup(body.model)
        eng = m.engine.engine
        msgs = [{"role": "system" if x.role == "developer" else x.role, "content": x.text()} for x in body.messages]
        ids = eng.encode_prompt(eng.render_chat(msgs, m.system_prompt))
        check_prompt(m, ids, "messages")
        max_tokens = body.max_completion_tokens or body.max_tokens or (m.max_model_len - len(ids))
        params = params_of(body, max_tokens)
        return await run(m, request, ids, params, body.stream, chat=True,
                         include_usage=bool(body.stream_options and body.stream_options.include_usage))

    async def run(m: ServedModel, request: Request, ids: list[int], params: SamplingParams,
                  stream: bool, chat: bool, include_usage: bool) -> Response:
        rid = m.engine.new_id("chatcmpl" if chat else "cmpl")
        public_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        met.prompt_tokens.labels(m.name).inc(len(ids))
        gen = timed(m.name, m.engine.generate(rid, ids, params))
        if stream:
            return StreamingResponse(
                sse(m.name, gen, public_id, created, chat, include_usage, len(ids)),
                media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        text: list[str] = []
        last: RequestOutput | None = None
        try:
            async for out in gen:
                text.append(out.text)
                last = out
                if await request.is_disconnected():
                    break  # leaving the loop closes gen, which aborts the request
        except EngineDeadError as e:
            raise APIError(503, str(e), type_="server_error", code="engine_unavailable") from e
        except ValueError as e:
            raise APIError(400, str(e)) from e
        finally:
            await gen.aclose()
        if last is None or last.finish_reason is None:
            raise APIError(499, "client closed the request", code="client_closed")
        reason = last.finish_reason.value
        usage = {"prompt_tokens": len(ids), "completion_tokens": last.completion_tokens,
                 "total_tokens": len(ids) + last.completion_tokens}
        content = "".join(text)
        if chat:
            return JSONResponse({
                "id": public_id, "object": "chat.completion", "created": created, "model": m.name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                             "finish_reason": reason, "logprobs": None}],
                "usage": usage,
            })
        return JSONResponse({
            "id": public_id, "object": "text_completion", "created": created, "model": m.name,
            "choices": [{"index": 0, "text": content, "finish_reason": reason, "logprobs": None}],
            "usage": usage,
        })

    async def timed(name: str, gen: AsyncGenerator[RequestOutput, None]) -> AsyncGenerator[RequestOutput, None]:
        t0 = time.monotonic()
        prev: float | None = None
        try:
            async for out in gen:
                now = time.monotonic()
                if prev is None:
                    met.ttft.labels(name).observe(now - t0)
                else:
                    met.itl.labels(name).observe(now - prev)
                prev = now
                met.output_tokens.labels(name).inc(len(out.new_token_ids))
                if out.finish_reason is not None:
                    met.requests.labels(name, out.finish_reason.value).inc()
                yield out
        finally:
            await gen.aclose()

    async def sse(name: str, gen: AsyncGenerator[RequestOutput, None], public_id: str, created: int,
                  chat: bool, include_usage: bool, prompt_n: int) -> AsyncIterator[bytes]:
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(delta_text: str | None, reason: str | None, first: bool = False) -> bytes:
            if chat:
                delta: dict[str, Any] = {}
                if first:
                    delta["role"] = "assistant"
                if delta_text is not None:
                    delta["content"] = delta_text
                choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": reason, "logprobs": None}
            else:
                choice = {"index": 0, "text": delta_text or "", "finish_reason": reason, "logprobs": None}
            payload = {"id": public_id, "object": obj, "created": created, "model": name, "choices": [choice]}
            return b"data: " + json.dumps(payload).encode() + b"\n\n"

        try:
            if chat:
                yield chunk("", None, first=True)
            last: RequestOutput | None = None
            async for out in gen:
                last = out
                if out.text:
                    yield chunk(out.text, None)
                if out.finish_reason is not None:
                    yield chunk(None if chat else "", out.finish_reason.value)
            if include_usage and last is not None:
                usage = {"prompt_tokens": prompt_n, "completion_tokens": last.completion_tokens,
                         "total_tokens": prompt_n + last.completion_tokens}
                payload = {"id": public_id, "object": obj, "created": created, "model": name,
                           "choices": [], "usage": usage}
                yield b"data: " + json.dumps(payload).encode() + b"\n\n"
        except (EngineDeadError, ValueError) as e:
            err = error_body(str(e), "server_error" if isinstance(e, EngineDeadError) else "invalid_request_error")
            yield b"data: " + json.dumps(err).encode() + b"\n\n"
        finally:
            await gen.aclose()
        yield b"data: [DONE]\n\n"

    return app
