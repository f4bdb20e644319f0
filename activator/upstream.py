"""The activator's HTTP/1.1 client to runtime pods: keep-alive connections over asyncio streams,
responses parsed with httptools (the C parser uvicorn uses).

Why not httpx here: on the request path httpx (httpcore over anyio) cost ~1.5-2.5 ms per hop on
our 2-core host, and h11 (pure Python) ~0.6 ms, against ~0.3 ms for a plain asyncio connection;
the activator's overhead budget is 2 ms. httpx stays everywhere else (autoscaler, admin API, route
table, tests).

Scope: POST with a body, to our own runtime pods. The response body is read with ``aread()`` or
streamed raw with ``aiter_raw()`` (chunked encoding removed); ``aclose()`` returns a fully read
keep-alive connection to the pool and closes one read only in part (so the runtime sees the
client leave and aborts the request). Connection failures raise ``UpstreamError`` (the
dispatcher's signal to try another instance).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import httptools

READ_BYTES = 65536


class UpstreamError(Exception):
    """The upstream could not be reached, or the connection broke."""


class _Conn:
    """One keep-alive connection; parses one response at a time."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.cut = False  # closed by ``UpstreamClient.cut``: its pod is gone, so not worth a retry
        self.reset()

    def reset(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.headers: dict[str, str] = {}
        self.chunks: deque[bytes] = deque()
        self.head_done = False
        self.done = False
        self.keep_alive = False

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self.head_done = True

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)

    def on_message_complete(self) -> None:
        # Asked here: llhttp answers should_keep_alive() only inside the callback (afterwards it
        # says False, and every request would open a new connection).
        self.keep_alive = self.parser.should_keep_alive()
        self.done = True

    async def feed(self) -> None:
        """Read once and parse; raise ``UpstreamError`` when the connection ended or broke."""
        try:
            data = await self.reader.read(READ_BYTES)
        except OSError as e:
            raise UpstreamError(f"connection broke: {e!r}") from e
        if not data:
            raise UpstreamError("the upstream closed the connection")
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:
            raise UpstreamError(f"bad response: {e}") from e

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()


class UpstreamResponse:
    def __init__(self, client: UpstreamClient, key: tuple[str, int], conn: _Conn) -> None:
        self._client = client
        self._key = key
        self._conn: _Conn | None = conn
        self.status_code: int = conn.parser.get_status_code()
        self.headers = conn.headers

    async def aiter_raw(self) -> AsyncIterator[bytes]:
        conn = self._conn
        if conn is None:
            return
        while True:
            while conn.chunks:
                yield conn.chunks.popleft()
            if conn.done:
                return
            await conn.feed()

    async def aread(self) -> bytes:
        return b"".join([chunk async for chunk in self.aiter_raw()])

    async def aclose(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if conn.done and not conn.chunks and conn.keep_alive:
            conn.reset()
            self._client.release(self._key, conn)
        else:
            self._client._done(self._key, conn)
            conn.close()


class UpstreamClient:
    def __init__(self, max_idle_per_host: int = 64, connect_timeout_s: float = 5.0) -> None:
        self._idle: dict[tuple[str, int], list[_Conn]] = {}
        self._busy: dict[tuple[str, int], set[_Conn]] = {}  # carrying a request or its response
        self.max_idle_per_host = max_idle_per_host
        self.connect_timeout_s = connect_timeout_s

    def cut(self, base_url: str) -> int:
        """Close every connection to the pod at ``base_url`` (one taken as gone: a frozen pod
        would hold its requests until the kernel gave up): each request reading from one fails
        with ``UpstreamError`` at once, which moves it elsewhere. Returns how many carried one."""
        parts = urlsplit(base_url)
        key = (parts.hostname or "127.0.0.1", parts.port or 80)
        for conn in self._idle.pop(key, []):
            conn.close()
        busy = self._busy.pop(key, set())
        for conn in busy:
            conn.cut = True
            conn.close()
        return len(busy)

    def _done(self, key: tuple[str, int], conn: _Conn) -> None:
        busy = self._busy.get(key)
        if busy is not None:
            busy.discard(conn)

    def release(self, key: tuple[str, int], conn: _Conn) -> None:
        self._done(key, conn)
        idle = self._idle.setdefault(key, [])
        if len(idle) < self.max_idle_per_host:
            idle.append(conn)
        else:
            conn.close()

    async def _connect(self, key: tuple[str, int]) -> _Conn:
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(*key), self.connect_timeout_s)
        except (OSError, TimeoutError) as e:
            raise UpstreamError(f"cannot connect to {key[0]}:{key[1]}: {e!r}") from e
        return _Conn(reader, writer)

    async def post(self, url: str, content: bytes, headers: dict[str, str]) -> UpstreamResponse:
        """Send the request and read the response head; the body is read from the response."""
        parts = urlsplit(url)
        key = (parts.hostname or "127.0.0.1", parts.port or 80)
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        head = [f"POST {target} HTTP/1.1", f"host: {key[0]}:{key[1]}", f"content-length: {len(content)}",
                *(f"{k}: {v}" for k, v in headers.items())]
        request = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + content
        idle = self._idle.get(key)
        reused = bool(idle)
        conn = idle.pop() if idle else await self._connect(key)
        try:
            return await self._exchange(key, conn, request)
        except UpstreamError:
            self._done(key, conn)
            conn.close()
            if not reused or conn.cut:  # (a cut pod would only take the request again and hold it)
                raise
        except BaseException:  # cancelled mid-exchange: the server sees the request end
            self._done(key, conn)
            conn.close()
            raise
        # A pooled connection the server had closed meanwhile: once more on a fresh one.
        conn = await self._connect(key)
        try:
            return await self._exchange(key, conn, request)
        except BaseException:
            self._done(key, conn)
            conn.close()
            raise

    async def _exchange(self, key: tuple[str, int], conn: _Conn, request: bytes) -> UpstreamResponse:
        self._busy.setdefault(key, set()).add(conn)
        try:
            conn.writer.write(request)
            await conn.writer.drain()
        except OSError as e:
            raise UpstreamError(f"connection broke: {e!r}") from e
        while not conn.head_done:
            await conn.feed()
        return UpstreamResponse(self, key, conn)

    async def aclose(self) -> None:
        for conns in self._idle.values():
            for c in conns:
                c.close()
        self._idle.clear()
