"""What the activator's and the pods' HTTP servers share: limits on the request body's size and pace.

Neither uvicorn nor Starlette bounds a request body, and a prompt is tokenised whole: one 200 MB
prompt grew a pod to 23 GB and the kernel killed it, with every request of every function on it.
``BodyLimit`` answers 413 before the app sees a body over the limit: at once when Content-Length
says so, and while reading the body (kept in memory up to the limit, then handed on). The rest of
a refused body is read and dropped (not kept) so the client, still sending, gets the answer. The
default is far above any real prompt (128k tokens of text is ~0.5 MB; as token ids, ~1 MB).

Nor does either time a slow client out: one that sends part of its headers, or its headers and
then part of a body, and stalls (or trickles) held its connection and a task forever, and enough
of them exhaust the server's file descriptors (slowloris). Both are answered 408 after
``READ_TIMEOUT_S`` (nginx's ``client_header_timeout`` and ``client_body_timeout``, 60 s by default,
here too): ``BodyLimit`` when no part of the body arrives for that long, and the uvicorn protocol
from ``http_protocol`` when a request's headers are not complete that long after the connection
opened (its first request) or after their first byte (later ones on a kept-alive connection).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

MAX_REQUEST_BYTES = 8 << 20
READ_TIMEOUT_S = 60.0  # the longest a request's headers, or the next part of its body, may take
# A refused body up to this many times the limit is read and dropped before the 413, so that the
# client reads the answer; a larger one gets the 413 at once, and the connection closes under it.
DISCARD_FACTOR = 4


class BodyLimit:
    """ASGI middleware: 413 (OpenAI's error shape, code ``request_too_large``) for a body over
    ``max_bytes``, 408 (``request_timeout``) when the body stops arriving for ``timeout_s``; 0
    turns either off. The app gets the body whole, as one message."""

    def __init__(self, app: ASGIApp, max_bytes: int = MAX_REQUEST_BYTES, timeout_s: float = READ_TIMEOUT_S) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s

    async def _next(self, receive: Receive) -> Message:
        """The next message, within ``timeout_s`` (TimeoutError past it)."""
        if self.timeout_s <= 0:
            return await receive()
        async with asyncio.timeout(self.timeout_s):
            return await receive()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or (self.max_bytes <= 0 and self.timeout_s <= 0):
            await self.app(scope, receive, send)
            return
        length = _content_length(scope)
        if self.max_bytes > 0 and length is not None and length > self.max_bytes:  # decided up front
            if not _expects_continue(scope):  # (one that waits for "100 Continue" has sent nothing)
                await self._discard(receive, length)
            await self._reject(send, 413, f"request body is {length} bytes; {self._limit()}", "request_too_large")
            return
        chunks, size = [], 0  # read it here, up to the limit, in time
        while True:
            try:
                msg = await self._next(receive)
            except TimeoutError:
                await self._reject(send, 408, f"the request body stopped arriving: nothing for {self.timeout_s:g} s "
                                              f"after {size} bytes", "request_timeout")
                return
            if msg["type"] != "http.request":  # the client left mid-body
                return
            chunks.append(msg.get("body", b""))
            size += len(chunks[-1])
            if self.max_bytes > 0 and size > self.max_bytes:
                if msg.get("more_body", False):
                    await self._discard(receive, size)
                await self._reject(send, 413, f"request body is over {self.max_bytes} bytes; {self._limit()}",
                                   "request_too_large")
                return
            if not msg.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: the disconnect, when it comes

        await self.app(scope, replay, send)

    async def _discard(self, receive: Receive, size: int) -> None:
        """Read the rest of a refused body (``size``: declared, or read so far) and drop it, up to
        DISCARD_FACTOR x the limit: a client still sending when the connection closes never reads
        the 413 (it sees a reset)."""
        if size > DISCARD_FACTOR * self.max_bytes:
            return
        got = 0
        while got < DISCARD_FACTOR * self.max_bytes:
            try:
                msg = await self._next(receive)
            except TimeoutError:
                return
            if msg["type"] != "http.request":
                return
            got += len(msg.get("body", b""))
            if not msg.get("more_body", False):
                return

    def _limit(self) -> str:
        return f"the limit is {self.max_bytes} bytes ({self.max_bytes / (1 << 20):g} MiB)"

    async def _reject(self, send: Send, status: int, message: str, code: str) -> None:
        payload = json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                        "code": code}}).encode()
        # Connection: close, since the unread body is still on the wire.
        await send({"type": "http.response.start", "status": status, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
            (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": payload})


def _expects_continue(scope: Scope) -> bool:
    return any(name == b"expect" and value.lower() == b"100-continue" for name, value in scope.get("headers", ()))


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # the server refuses a malformed one before the app runs
    return None


_TIMEOUT_408 = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
                b"content-length: %d\r\n\r\n%s")


class _HeaderTimeout(HttpToolsProtocol):
    """uvicorn's httptools protocol, with a deadline on each request's headers: armed when the
    connection opens and when a request begins on a kept-alive one, disarmed once the headers are
    complete. (uvicorn times only the idle gap between requests, and not even that once a byte of
    the next request has come.)"""

    read_timeout_s = READ_TIMEOUT_S
    _header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm()

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.read_timeout_s, self._headers_too_slow)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or (self.cycle is not None and not self.cycle.response_complete):
            return  # (never into a response under way)
        body = json.dumps({"error": {
            "message": f"the request headers did not arrive within {self.read_timeout_s:g} s",
            "type": "invalid_request_error", "param": None, "code": "request_timeout"}}).encode()
        self.transport.write(_TIMEOUT_408 % (len(body), body))
        self.transport.close()


def http_protocol(read_timeout_s: float = READ_TIMEOUT_S) -> type[Any] | str:
    """The ``http`` setting for ``uvicorn.Config``: httptools with ``_HeaderTimeout``'s deadline on
    request headers; 0 leaves uvicorn's choice (no deadline)."""
    if read_timeout_s <= 0:
        return "auto"
    return type("HeaderTimeoutProtocol", (_HeaderTimeout,), {"read_timeout_s": read_timeout_s})
