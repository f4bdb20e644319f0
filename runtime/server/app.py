"""The runtime's public HTTP API: OpenAI-compatible completions and chat, models, health, metrics."""

from __future__ import annotations

import asyncio
import json
import math
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from functions import (
    ELAPSED_HEADER,
    FIRST_TOKEN_AGE_HEADER,
    SLO,
    STREAM_NOTE,
    TOKEN_IDS_HEADER,
    FunctionSpec,
    SloOutcome,
)
from functions.http import MAX_REQUEST_BYTES, READ_TIMEOUT_S, BodyLimit
from runtime.core.lifecycle import InstanceState
from runtime.core.request import FinishReason, SamplingParams
from runtime.device_thread import AdmissionRefused, EngineDeadError, InstanceUnavailable
from runtime.engine.engine import RequestOutput
from runtime.engine.logprobs import LogprobsFormat, TokenLogprob
from runtime.pod import Pod, PodError, Served
from runtime.server.admin import admin_router
from runtime.server.metrics import ServerMetrics
from runtime.server.protocol import ChatCompletionRequest, CompletionRequest, error_body


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param
        self.headers: dict[str, str] = {}


# Prompts longer than this (characters) are tokenised in a worker thread; shorter ones, the usual
# case, inline (a thread hop costs more than tokenising a few thousand characters).
ASYNC_TOKENIZE_CHARS = 16_384
# A prompt longer than the context x this many characters is first tokenised from its head: real
# text runs 3-5 characters a token, so a head this long that is already over the context (by more
# than the margin a cut word can add) means the whole prompt is.
HEAD_CHARS_PER_TOKEN = 16
HEAD_MARGIN_TOKENS = 16
# A chat of more messages than this (or that much text) is rendered through its template in a
# worker thread too (~4 us a message).
ASYNC_RENDER_MESSAGES = 1_000


def create_app(pod: Pod, metrics: ServerMetrics | None = None, admin_token: str | None = None,
               functions: list[FunctionSpec] | None = None, max_request_bytes: int = MAX_REQUEST_BYTES,
               read_timeout_s: float = READ_TIMEOUT_S) -> FastAPI:
    """The pod's HTTP app. `functions` are loaded at start-up; the admin API (under /admin,
    bearer-token auth) loads more, unloads, evicts and reports status. Bodies over
    `max_request_bytes` get 413, and ones that stop arriving for `read_timeout_s` 408
    (`functions.http.BodyLimit`; 0: no limit)."""
    met = metrics or ServerMetrics()
    if pod.device.on_tick is None:
        pod.device.on_tick = met.observe_device

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        pod.device.start(asyncio.get_running_loop())
        for spec in functions or ():
            await pod.load(spec)
        yield
        pod.device.stop()

    app = FastAPI(title="slinfer runtime", lifespan=lifespan)
    app.add_middleware(BodyLimit, max_bytes=max_request_bytes, timeout_s=read_timeout_s)
    app.state.pod = pod
    app.state.metrics = met
    if admin_token is not None:
        app.include_router(admin_router(pod, admin_token))

    @app.exception_handler(PodError)
    async def _pod_error(_: Request, e: PodError) -> JSONResponse:
        met.errors.labels(str(e.status)).inc()
        return JSONResponse(error_body(e.message, "invalid_request_error" if e.status < 500 else "server_error",
                                       e.code, extra=e.extra), status_code=e.status)

    # -- errors in OpenAI's shape -----------------------------------------------------------
    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError) -> JSONResponse:
        met.errors.labels(str(e.status)).inc()
        return JSONResponse(error_body(e.message, e.type, e.code, e.param), status_code=e.status,
                            headers=e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        # FastAPI's own (a body it cannot parse): in OpenAI's shape like every other error here
        met.errors.labels(str(e.status_code)).inc()
        code = "invalid_json" if e.status_code == 400 else None
        return JSONResponse(error_body(str(e.detail), "invalid_request_error" if e.status_code < 500 else "server_error",
                                       code), status_code=e.status_code, headers=e.headers)

    @app.exception_handler(Exception)
    async def _bug(request: Request, e: Exception) -> JSONResponse:
        # A bug of ours: an answer in shape (the activator passes a 500 on rather than retrying
        # it elsewhere); Starlette still logs the traceback.
        met.errors.labels("500").inc()
        return JSONResponse(error_body(f"internal error in the runtime: {type(e).__name__} (logged)", "server_error",
                                       "internal_error"), status_code=500)

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

    def lookup(name: str) -> Served:
        try:
            return pod.ready(name)
        except PodError as e:
            raise APIError(e.status, e.message, code=e.code, param="model") from e

    # -- plain endpoints --------------------------------------------------------------------
    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        if not pod.device.alive:
            return JSONResponse({"status": "unhealthy", "reason": "device thread is not running"}, status_code=503)
        stalled = pod.device.stalled_s(time.monotonic())
        if stalled > pod.config.stall_timeout_s:
            return JSONResponse({"status": "unhealthy", "reason": f"device thread has made no progress for "
                                                                  f"{stalled:.0f} s"}, status_code=503)
        if pod.terminating:
            return JSONResponse({"status": "terminating", "reason": "the pod is shutting down"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics_endpoint() -> Response:
        return Response(generate_latest(met.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [
            {"id": m.name, "object": "model", "created": m.created, "owned_by": "slinfer",
             "max_model_len": m.engine.max_model_len}
            for m in pod.served.values() if m.state is InstanceState.READY and m.engine is not None
        ]}

    # -- generation -------------------------------------------------------------------------
    def check_prompt(m: Served, ids: list[int], param: str) -> None:
        assert m.engine is not None
        limit = m.engine.max_model_len
        if not ids:
            raise APIError(400, "the prompt is empty", param=param)
        if len(ids) >= limit:
            raise APIError(
                400,
                f"this model's maximum context length is {limit} tokens; your prompt has "
                f"{len(ids)} tokens (at least 1 must be left for the output)",
                code="context_length_exceeded", param=param,
            )

    async def prompt_ids(eng: Any, prompt: str | list[str] | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return await encode(eng, prompt, "prompt")
        if prompt and all(isinstance(x, int) for x in prompt):
            ids = [int(x) for x in prompt]
            vocab = eng.loaded.config.vocab_size
            if any(i < 0 or i >= vocab for i in ids):
                raise APIError(400, f"token ids must be in [0, {vocab})", param="prompt")
            return ids
        if len(prompt) != 1 or not isinstance(prompt[0], str):
            raise APIError(400, "exactly one prompt per request is supported", param="prompt")
        return await encode(eng, prompt[0], "prompt")

    async def encode(eng: Any, text: str, param: str) -> list[int]:
        """A prompt's token ids. A long text is tokenised off the event loop (a megabyte takes
        seconds, and every stream of the pod waits on the loop), and one far over the context is
        refused from its head alone (tokenising it whole is what took the time)."""
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:  # JSON can carry a lone UTF-16 surrogate ("\ud800"); text cannot
            raise APIError(400, f"'{param}' contains text that is not valid Unicode ({e.reason})",
                           code="invalid_value", param=param) from None
        if len(text) <= ASYNC_TOKENIZE_CHARS:
            return list(eng.encode_prompt(text))
        limit = eng.max_model_len
        head_chars = limit * HEAD_CHARS_PER_TOKEN
        if len(text) > head_chars:
            head = await asyncio.to_thread(eng.encode_prompt, text[:head_chars])
            if len(head) > limit + HEAD_MARGIN_TOKENS:
                raise APIError(400, f"this model's maximum context length is {limit} tokens; your prompt is "
                               f"longer (its first {head_chars} characters alone are {len(head)} tokens)",
                               code="context_length_exceeded", param=param)
        return list(await asyncio.to_thread(eng.encode_prompt, text))

    def check_asks(m: Served, req: CompletionRequest | ChatCompletionRequest) -> None:
        """Refuse what we would otherwise answer as if it had not been asked (protocol.NEUTRAL)."""
        assert m.engine is not None
        if req.n > 1 and req.stream:
            raise APIError(400, f"n > 1 is served without stream (got n = {req.n})", code="unsupported_parameter",
                           param="n")
        name = req.unsupported()
        if name is not None:
            raise APIError(400, f"'{name}' is not supported by this server (got {json.dumps(getattr(req, name))[:80]})",
                           code="unsupported_parameter", param=name)
        vocab = m.engine.loaded.config.vocab_size
        if any(t >= vocab for t, _ in req.bias()):
            raise APIError(400, f"logit_bias keys must be token ids in [0, {vocab})", code="invalid_value",
                           param="logit_bias")

    async def grammar_of(m: Served, req: CompletionRequest | ChatCompletionRequest) -> str | None:
        """The request's response_format, else the function's output_schema (compiled at load)."""
        if req.response_format is not None:
            schema = req.response_format.output_schema()
        else:
            schema = json.loads(m.spec.output_schema) if m.spec.output_schema is not None else None
        if schema is None:
            return None
        assert m.engine is not None
        try:  # a large schema takes milliseconds: off the event loop
            return await asyncio.to_thread(m.engine.grammars.compile, schema)
        except ValueError as e:
            raise APIError(400, str(e), code="invalid_value", param="response_format") from None

    def params_of(req: CompletionRequest | ChatCompletionRequest, max_tokens: int) -> SamplingParams:
        return SamplingParams(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
                              seed=req.seed, stop=req.stop_list(), presence_penalty=req.presence_penalty,
                              frequency_penalty=req.frequency_penalty, logit_bias=req.bias(),
                              logprobs=req.logprobs_k())

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        m = lookup(body.model)
        check_asks(m, body)
        ids = await prompt_ids(m.engine, body.prompt)
        check_prompt(m, ids, "prompt")
        if body.resumed_tokens and (isinstance(body.prompt, str) or body.resumed_tokens >= len(ids)):
            raise APIError(400, "resumed_tokens needs a token-id prompt longer than it", param="resumed_tokens")
        score_only = body.max_tokens == 0  # echo with nothing generated: the prompt's logprobs
        asked = 16 if body.max_tokens is None else max(1, body.max_tokens)
        params = replace(params_of(body, min(asked, m.spec.max_output_tokens)),
                         resumed_tokens=body.resumed_tokens, grammar=await grammar_of(m, body))
        echo = None
        if body.echo:
            if body.resumed_tokens:
                raise APIError(400, "echo cannot go with resumed_tokens", param="echo")
            assert m.engine is not None
            echo = Echo(body.prompt if isinstance(body.prompt, str) else
                        body.prompt[0] if isinstance(body.prompt[0], str) else m.engine.tokenizer.decode(ids),
                        ids[0], score_only)
            params = replace(params, prompt_logprobs=params.logprobs)
        lp = None
        if params.logprobs is not None:
            assert m.engine is not None
            spell = m.engine.spelling
            # text_offset counts on from the output a continued stream's client already has
            offset = sum(len(spell.text_of(i)) for i in ids[len(ids) - body.resumed_tokens:])
            lp = LogprobsFormat(spell, chat=body.chat_logprobs, offset=0 if body.chat_logprobs else offset)
        return await run(m, request, ids, params, body.stream, chat=False,
                         include_usage=bool(body.stream_options and body.stream_options.include_usage), lp=lp,
                         echo=echo, n=body.n)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, request: Request) -> Response:
        m = lookup(body.model)
        check_asks(m, body)
        eng = m.engine
        assert eng is not None
        if len(body.messages) >= eng.max_model_len:  # each message is at least a token of the prompt
            raise APIError(400, f"this model's maximum context length is {eng.max_model_len} tokens; "
                           f"{len(body.messages)} messages cannot fit in it", code="context_length_exceeded",
                           param="messages")
        msgs = [{"role": "system" if x.role == "developer" else x.role, "content": x.text()} for x in body.messages]
        size = sum(len(x["content"]) for x in msgs)
        if size > ASYNC_TOKENIZE_CHARS or len(msgs) > ASYNC_RENDER_MESSAGES:
            text = await asyncio.to_thread(eng.render_chat, msgs, m.spec.system_prompt)
        else:
            text = eng.render_chat(msgs, m.spec.system_prompt)
        ids = await encode(eng, text, "messages")
        check_prompt(m, ids, "messages")
        asked = body.max_completion_tokens or body.max_tokens or eng.max_model_len
        max_tokens = min(asked, m.spec.max_output_tokens)  # the function's own output limit
        params = replace(params_of(body, max_tokens), grammar=await grammar_of(m, body))
        lp = LogprobsFormat(eng.spelling, chat=True) if params.logprobs is not None else None
        return await run(m, request, ids, params, body.stream, chat=True,
                         include_usage=bool(body.stream_options and body.stream_options.include_usage), lp=lp,
                         n=body.n)

    async def run(m: Served, request: Request, ids: list[int], params: SamplingParams,
                  stream: bool, chat: bool, include_usage: bool, lp: LogprobsFormat | None,
                  echo: Echo | None = None, n: int = 1) -> Response:
        rid = pod.device.new_id(m.name)
        public_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        met.prompt_tokens.labels(m.name).inc(len(ids))
        age = seconds_header(request, FIRST_TOKEN_AGE_HEADER)
        elapsed = seconds_header(request, ELAPSED_HEADER) or 0.0

        def watch() -> SloWatch | None:  # each choice is judged on its own; a prompt scored only is not
            if echo is not None and echo.score_only:
                return None
            return SloWatch.of(m.spec.slo, len(ids), params.resumed_tokens, elapsed, age)

        gen = timed(m.name, pod.device.generate(m.name, rid, ids, params, elapsed_s=elapsed, first_token_age_s=age),
                    watch())
        if stream:
            first = await first_output(m.name, gen)  # admission decides before any byte is sent
            if echo is not None and unscored(first):
                await gen.aclose()
                raise unscored_error(m.name)
            noted = request.headers.get(TOKEN_IDS_HEADER) == "1"
            note = {"prompt_token_ids": ids, "max_tokens": params.max_tokens} if noted else None
            return StreamingResponse(
                sse(m.name, gen, first, public_id, created, chat, include_usage, len(ids), note, lp, echo),
                media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        # n > 1: each choice its own request on the device (a seed, if given, + its index)
        gens = [gen] + [timed(m.name, pod.device.generate(
            m.name, pod.device.new_id(m.name), ids,
            replace(params, seed=None if params.seed is None else (params.seed + i) % 2**64),
            elapsed_s=elapsed, first_token_age_s=age), watch()) for i in range(1, n)]
        tasks = [asyncio.ensure_future(collect(g, request)) for g in gens] if n > 1 else []
        try:
            got = await asyncio.gather(*tasks) if tasks else [await collect(gen, request)]
        except (EngineDeadError, AdmissionRefused, InstanceUnavailable, ValueError) as e:
            raise fail(m.name, e) from e  # all or nothing: the other choices are aborted below
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for g in gens:
                await g.aclose()
        choices, done = [], 0
        for i, c in enumerate(got):
            if c.last is None or c.last.finish_reason is None:
                raise APIError(499, "client closed the request", code="client_closed")
            if echo is not None and unscored(c.last):
                raise unscored_error(m.name)
            if n > 1 and c.last.continuation is not None:  # choices cannot each continue elsewhere
                raise unscored_error(m.name, f"in one of the {n} choices")
            reason, extra, tokens = c.last.finish_reason.value, continuation_of(c.last), c.last.completion_tokens
            content, lps = "".join(c.text), c.lps
            if echo is not None and echo.score_only:  # the one token generated is not the answer
                reason, tokens, content, lps = FinishReason.LENGTH.value, 0, "", []
            done += tokens
            logprobs = None
            if lp is not None:  # with echo the prompt's first: text_offset runs on from its text
                f = lp.fresh()
                logprobs = f(lps) if echo is None else f.echoed(echo.first_id, c.prompt_lps, lps)
            if echo is not None:
                content = echo.text + content
            body: dict[str, Any] = {"message": {"role": "assistant", "content": content}} if chat else {"text": content}
            choices.append({"index": i, **body, "finish_reason": reason, "logprobs": logprobs, **extra})
        usage = {"prompt_tokens": len(ids), "completion_tokens": done, "total_tokens": len(ids) + done,
                 "prompt_tokens_details": {"cached_tokens": min(c.last.cached_tokens for c in got if c.last)}}
        return JSONResponse({"id": public_id, "object": "chat.completion" if chat else "text_completion",
                             "created": created, "model": m.name, "choices": choices, "usage": usage})

    async def collect(gen: AsyncGenerator[RequestOutput, None], request: Request) -> Collected:
        c = Collected()
        async for out in gen:
            c.text.append(out.text)
            c.lps.extend(out.logprobs)
            c.prompt_lps.extend(out.prompt_logprobs)
            c.last = out
            if await request.is_disconnected():
                break  # the caller closes gen, which aborts the request
        return c

    def unscored(out: RequestOutput) -> bool:
        """Preempted before its first token: an echo's prompt logprobs are not all there, and a
        continuation elsewhere would not echo."""
        return out.finish_reason is FinishReason.PREEMPTED and out.completion_tokens == 0

    def unscored_error(name: str, why: str = "before its prompt was scored") -> APIError:
        # the activator sends a 503 before any answer to another instance, as a whole new request
        return APIError(503, f"function '{name}' was preempted here {why}; send it again",
                        type_="server_error", code="instance_unavailable")

    async def timed(name: str, gen: AsyncGenerator[RequestOutput, None],
                    watch: SloWatch | None = None) -> AsyncGenerator[RequestOutput, None]:
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
                if watch is not None and watch.first_token_s is None and out.new_token_ids:
                    watch.first_token_s = now
                if out.finish_reason is not None:
                    met.requests.labels(name, out.finish_reason.value).inc()
                    if watch is not None and out.finish_reason in (FinishReason.STOP, FinishReason.LENGTH):
                        met.slo.labels(name, watch.outcome(now, out.completion_tokens).value).inc()
                yield out
        finally:
            await gen.aclose()

    def fail(name: str, e: BaseException) -> APIError:
        if isinstance(e, AdmissionRefused) and e.decision.reason is not None:
            met.refusals.labels(name, e.decision.reason.value).inc()
        return api_error(e)

    async def first_output(name: str, gen: AsyncGenerator[RequestOutput, None]) -> RequestOutput:
        try:
            return await gen.__anext__()
        except (EngineDeadError, AdmissionRefused, InstanceUnavailable, ValueError) as e:
            await gen.aclose()
            raise fail(name, e) from e

    async def sse(name: str, gen: AsyncGenerator[RequestOutput, None], first: RequestOutput, public_id: str,
                  created: int, chat: bool, include_usage: bool, prompt_n: int,
                  note: dict[str, Any] | None, lp: LogprobsFormat | None,
                  echo: Echo | None = None) -> AsyncIterator[bytes]:
        """The stream's events. With ``note`` (the activator asked, ``TOKEN_IDS_HEADER``) each event
        starts with a comment line naming the output ids behind it (``functions.STREAM_NOTE``): the
        first carries ``note`` (prompt ids, max_tokens) as well; ids whose text is held back ride on
        the next event. So the ids of the events a client has received always match its text, and
        another instance primed with them (``resumed_tokens``) continues it exactly. Logprobs
        (``lp``) ride the same way: with the event that carries their token's text."""
        obj = "chat.completion.chunk" if chat else "text_completion"
        unsent: list[int] = []  # output ids not yet named in a note
        unsent_lps: list[TokenLogprob] = []  # their logprobs, when asked for

        def logprobs() -> dict[str, Any] | None:
            if lp is None:
                return None
            out = lp(unsent_lps)
            unsent_lps.clear()
            return out

        def noted(event: bytes, finish: str | None = None) -> bytes:
            nonlocal note
            if note is None:
                return event
            head: dict[str, Any] = {**note, "token_ids": unsent}  # note: {} after the first event
            if finish is not None:
                head["finish_reason"] = finish
            line = (STREAM_NOTE + json.dumps(head, separators=(",", ":"))).encode()
            note = {}
            unsent.clear()
            return line + b"\n" + event

        def chunk(delta_text: str | None, reason: str | None, first: bool = False,
                  extra: dict[str, Any] | None = None) -> bytes:
            if chat:
                delta: dict[str, Any] = {}
                if first:
                    delta["role"] = "assistant"
                if delta_text is not None:
                    delta["content"] = delta_text
                choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": reason,
                                          "logprobs": None if first else logprobs()}
            else:
                choice = {"index": 0, "text": delta_text or "", "finish_reason": reason, "logprobs": logprobs()}
            choice.update(extra or {})
            payload = {"id": public_id, "object": obj, "created": created, "model": name, "choices": [choice]}
            return b"data: " + json.dumps(payload).encode() + b"\n\n"

        try:
            if chat:
                yield noted(chunk("", None, first=True))
            if echo is not None:  # the prompt, with its logprobs, before any answer
                head = lp.prompt(echo.first_id, list(first.prompt_logprobs)) if lp is not None else None
                yield noted(chunk(echo.text, None, extra={"logprobs": head}))
                if echo.score_only:  # and nothing else: the one token generated is not the answer
                    yield noted(chunk("", FinishReason.LENGTH.value, extra={"logprobs": lp([]) if lp else None}),
                                finish=FinishReason.LENGTH.value)
            last: RequestOutput | None = None
            outputs = prepend(first, gen) if echo is None or not echo.score_only else _nothing()
            async for out in outputs:
                last = out
                unsent_lps.extend(out.logprobs)
                if out.continuation is not None:  # preempted: the held-back tail rides on the
                    # final chunk, so a continuing client can drop it and resume exactly
                    yield chunk(out.text, out.finish_reason.value if out.finish_reason else None,
                                extra=continuation_of(out))
                    continue
                unsent.extend(out.new_token_ids)
                if out.finish_reason is not None:
                    # the last text and the finish in one event: no moment when a client has all
                    # the text but cannot tell the generation is over
                    reason = out.finish_reason.value
                    yield noted(chunk(out.text or (None if chat else ""), reason), finish=reason)
                elif out.text:
                    yield noted(chunk(out.text, None))
            if include_usage and (last is not None or (echo is not None and echo.score_only)):
                done = last.completion_tokens if last is not None else 0
                usage = {"prompt_tokens": prompt_n, "completion_tokens": done, "total_tokens": prompt_n + done,
                         "prompt_tokens_details": {"cached_tokens": last.cached_tokens if last is not None else 0}}
                payload = {"id": public_id, "object": obj, "created": created, "model": name,
                           "choices": [], "usage": usage}
                yield b"data: " + json.dumps(payload).encode() + b"\n\n"
        except (EngineDeadError, InstanceUnavailable, ValueError) as e:
            err = error_body(str(e), "server_error" if isinstance(e, EngineDeadError) else "invalid_request_error")
            yield b"data: " + json.dumps(err).encode() + b"\n\n"
        finally:
            await gen.aclose()
        yield b"data: [DONE]\n\n"

    return app


@dataclass
class Collected:
    """One choice of a non-streamed answer, as its outputs came."""

    text: list[str] = field(default_factory=list)
    lps: list[TokenLogprob] = field(default_factory=list)
    prompt_lps: list[TokenLogprob] = field(default_factory=list)
    last: RequestOutput | None = None


@dataclass(frozen=True)
class Echo:
    """A completion that starts with its prompt (``echo``)."""

    text: str
    first_id: int  # the prompt's first token, which has no logprob
    score_only: bool  # max_tokens 0: the prompt is all the answer has


def api_error(e: BaseException) -> APIError:
    if isinstance(e, AdmissionRefused):
        d = e.decision
        reason = d.reason.value if d.reason else "unknown"
        err = APIError(429, f"the instance cannot take this request now ({reason}): {d.detail}",
                       type_="rate_limit_error", code=reason)
        err.headers = {"Retry-After": str(max(1, math.ceil(d.retry_after_s)))}
        return err
    if isinstance(e, InstanceUnavailable):
        return APIError(503, f"function '{e}' is not taking requests here", type_="server_error",
                        code="instance_unavailable")
    if isinstance(e, EngineDeadError):
        return APIError(503, str(e), type_="server_error", code="engine_unavailable")
    return APIError(400, str(e))


MAX_ELAPSED_S = 86400.0


@dataclass
class SloWatch:
    """One request's clock against its function's SLO, on this pod's monotonic clock: from its
    arrival (less what it spent before it came here: ``ELAPSED_HEADER``, which leaves out waits
    for a model load) to its first token (a continuation's came earlier: ``FIRST_TOKEN_AGE_HEADER``)
    and its last."""

    slo: SLO
    arrival_s: float
    prompt_tokens: int  # the client's prompt: a continuation's resumed output left out
    resumed: int  # output tokens it had before it came here
    first_token_s: float | None = None

    @classmethod
    def of(cls, slo: SLO, prompt_ids: int, resumed: int, elapsed_s: float, age_s: float | None) -> SloWatch:
        now = time.monotonic()
        first = now - age_s if resumed and age_s is not None else None
        return cls(slo, now - elapsed_s, prompt_ids - resumed, resumed, first)

    def outcome(self, now: float, generated: int) -> SloOutcome:
        first = self.first_token_s if self.first_token_s is not None else now
        return self.slo.judge(self.prompt_tokens, first - self.arrival_s, self.resumed + generated, now - first)


def seconds_header(request: Request, name: str) -> float | None:
    """One of the activator's headers (``ELAPSED_HEADER``, ``FIRST_TOKEN_AGE_HEADER``): None when
    absent; a 400 when it is not a number of seconds in [0, 1 day]."""
    raw = request.headers.get(name)
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not 0.0 <= value <= MAX_ELAPSED_S:  # also refuses nan and inf
        raise APIError(400, f"header {name} must be a number of seconds in [0, {MAX_ELAPSED_S:g}], "
                            f"got {raw[:40]!r}", code="invalid_header", param=name)
    return value


def continuation_of(out: RequestOutput) -> dict[str, Any]:
    """For a preempted request: what another instance needs to continue it by recompute."""
    c = out.continuation
    if c is None:
        return {}
    age = {} if c.first_token_s is None else {"first_token_age_s": round(max(0.0, time.monotonic() - c.first_token_s), 4)}
    return {"continuation": {"prompt_token_ids": list(c.prompt_token_ids),
                             "output_token_ids": list(c.output_token_ids),
                             "max_tokens": c.params.max_tokens,
                             **age,  # how long ago the stream's first token came (the pod's clock)
                             # text held back until eviction flushed it (an incomplete character
                             # or a possible stop-string prefix): a client continuing with
                             # resumed_tokens drops it, the next instance emits it exactly
                             "tail_text": out.text}}


async def _nothing() -> AsyncGenerator[RequestOutput, None]:
    return
    yield  # an async generator that yields nothing


async def prepend(first: RequestOutput, gen: AsyncGenerator[RequestOutput, None]) -> AsyncGenerator[RequestOutput, None]:
    yield first
    if not first.finished:
        async for out in gen:
            yield out
