"""What the activator's and the pods' HTTP servers share: the request size limit.

Neither uvicorn nor Starlette bounds a request body, and a prompt is tokenised whole: one 200 MB
prompt grew a pod to 23 GB and the kernel killed it, with every request of every function on it.
``BodyLimit`` answers 413 before the app sees a body over the limit: at once when Content-Length
says so, and while reading a chunked body (kept in memory up to the limit, then handed on). The
rest of a refused body is read and dropped (not kept) so the client, still sending, gets the answer.
The default is far above any real prompt (128k tokens of text is ~0.5 MB; as token ids, ~1 MB).
"""

from __future__ import annotations

import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

MAX_REQUEST_BYTES = 8 << 20
# A refused body up to this many times the limit is read and dropped before the 413, so that the
# client reads the answer; a larger one gets the 413 at once, and the connection closes under it.
DISCARD_FACTOR = 4


class BodyLimit:
    """ASGI middleware: 413 (OpenAI's error shape, code ``request_too_large``) for a body over
    ``max_bytes``; 0 turns the limit off."""

    def __init__(self, app: ASGIApp, max_bytes: int = MAX_REQUEST_BYTES) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.max_bytes <= 0:
            await self.app(scope, receive, send)
            return
        length = _content_length(scope)
        if length is not None:  # the server reads exactly that many bytes: decided up front
            if length > self.max_bytes:
                if not _expects_continue(scope):  # (one that waits for "100 Continue" has sent nothing)
                    await self._discard(receive, length)
                await self._reject(send, f"{length} bytes")
                return
            await self.app(scope, receive, send)
            return
        chunks, size = [], 0  # chunked: read it here, up to the limit
        while True:
            msg = await receive()
            if msg["type"] != "http.request":  # the client left mid-body
                return
            chunks.append(msg.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                if msg.get("more_body", False):
                    await self._discard(receive, size)
                await self._reject(send, f"over {self.max_bytes} bytes")
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
            msg = await receive()
            if msg["type"] != "http.request":
                return
            got += len(msg.get("body", b""))
            if not msg.get("more_body", False):
                return

    async def _reject(self, send: Send, what: str) -> None:
        limit_mb = self.max_bytes / (1 << 20)
        payload = json.dumps({"error": {
            "message": f"request body is {what}; the limit is {self.max_bytes} bytes ({limit_mb:g} MiB)",
            "type": "invalid_request_error", "param": None, "code": "request_too_large"}}).encode()
        # Connection: close, since the unread body is still on the wire.
        await send({"type": "http.response.start", "status": 413, "headers": [
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
