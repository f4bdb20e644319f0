"""The activator's HTTP/1.1 client to runtime pods, against a real uvicorn server on loopback:
keep-alive reuse (one connection for many requests), chunked streaming, a server that closes its
connections, and a pooled connection that died meanwhile."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from conftest import serve_app
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from activator.upstream import UpstreamClient, UpstreamError


def echo_app() -> Starlette:
    """/echo answers the client's (host, port) — one port per TCP connection — and the body;
    /close does the same and closes the connection; /stream sends three chunks."""

    async def echo(request: Request) -> Response:
        client = request.client
        return JSONResponse({"port": client.port if client else None, "body": (await request.body()).decode()})

    async def close(request: Request) -> Response:
        client = request.client
        return JSONResponse({"port": client.port if client else None}, headers={"Connection": "close"})

    async def stream(_: Request) -> Response:
        async def parts() -> Any:
            for i in range(3):
                yield f"data: {i}\n\n".encode()
                await asyncio.sleep(0.01)
        return StreamingResponse(parts(), media_type="text/event-stream")

    return Starlette(routes=[Route("/echo", echo, methods=["POST"]), Route("/close", close, methods=["POST"]),
                             Route("/stream", stream, methods=["POST"])])


async def _post_json(client: UpstreamClient, url: str, body: bytes = b"{}") -> dict[str, Any]:
    r = await client.post(url, body, {"content-type": "application/json"})
    assert r.status_code == 200
    data: dict[str, Any] = json.loads(await r.aread())
    await r.aclose()
    return data


def test_keep_alive_reuses_one_connection_for_sequential_requests() -> None:
    # Without reuse every request pays a TCP connect and the pod's accept (the activator's
    # overhead budget is 2 ms a request).
    async def run(url: str) -> list[Any]:
        client = UpstreamClient()
        try:
            return [await _post_json(client, url + "/echo", f'{{"i": {i}}}'.encode()) for i in range(5)]
        finally:
            await client.aclose()

    with serve_app(echo_app()) as url:
        answers = asyncio.run(run(url))
    assert [a["body"] for a in answers] == [f'{{"i": {i}}}' for i in range(5)]
    assert len({a["port"] for a in answers}) == 1


def test_server_closing_its_connections_gets_a_new_one_each_time() -> None:
    async def run(url: str) -> list[Any]:
        client = UpstreamClient()
        try:
            return [await _post_json(client, url + "/close") for _ in range(3)]
        finally:
            await client.aclose()

    with serve_app(echo_app()) as url:
        answers = asyncio.run(run(url))
    assert len({a["port"] for a in answers}) == 3


def test_chunked_stream_arrives_piece_by_piece_and_the_connection_is_reused() -> None:
    async def run(url: str) -> tuple[bytes, Any]:
        client = UpstreamClient()
        try:
            first = await _post_json(client, url + "/echo")
            r = await client.post(url + "/stream", b"{}", {"content-type": "application/json"})
            data = b"".join([piece async for piece in r.aiter_raw()])
            await r.aclose()
            return data, (first, await _post_json(client, url + "/echo"))
        finally:
            await client.aclose()

    with serve_app(echo_app()) as url:
        data, (before, after) = asyncio.run(run(url))
    assert data == b"data: 0\n\ndata: 1\n\ndata: 2\n\n"
    assert before["port"] == after["port"]


def test_a_pooled_connection_that_died_is_replaced_and_a_dead_server_raises() -> None:
    async def run(url: str) -> tuple[Any, Any]:
        client = UpstreamClient()
        try:
            first = await _post_json(client, url + "/echo")
            for conns in client._idle.values():  # the server side went away meanwhile
                for c in conns:
                    c.writer.transport.abort()
            return first, await _post_json(client, url + "/echo")
        finally:
            await client.aclose()

    with serve_app(echo_app()) as url:
        first, second = asyncio.run(run(url))
    assert first["port"] != second["port"]

    async def dead() -> None:
        client = UpstreamClient(connect_timeout_s=1.0)
        try:
            await client.post(url + "/echo", b"{}", {})
        finally:
            await client.aclose()

    try:
        asyncio.run(dead())
    except UpstreamError:
        pass
    else:
        raise AssertionError("posting to a stopped server must raise UpstreamError")


def test_cutting_a_pod_fails_the_requests_waiting_on_it_at_once() -> None:
    # A frozen pod: the kernel accepts the connection, nothing ever answers. Its requests wait
    # until cut, then fail as a broken connection does (the activator moves them elsewhere);
    # requests to other pods are untouched.
    async def go() -> None:
        async def frozen(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await asyncio.sleep(3600)

        server = await asyncio.start_server(frozen, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        client = UpstreamClient()
        with serve_app(echo_app()) as other:
            pending = [asyncio.create_task(client.post(f"http://127.0.0.1:{port}/v1/x", b"{}", {})) for _ in range(3)]
            await asyncio.sleep(0.3)
            assert not any(t.done() for t in pending)  # nothing answers
            t0 = asyncio.get_running_loop().time()
            assert client.cut(f"http://127.0.0.1:{port}") == 3
            for t in pending:
                try:
                    await asyncio.wait_for(t, 2)
                    raise AssertionError("a request to a cut pod did not fail")
                except UpstreamError:
                    pass
            assert asyncio.get_running_loop().time() - t0 < 1.0
            assert (await _post_json(client, f"{other}/echo", b"still"))["body"] == "still"
            assert client.cut(other) == 0  # (its connection is back in the pool, idle: closed, not counted)
        await client.aclose()
        server.close()

    asyncio.run(go())


def test_a_request_on_a_pooled_connection_to_a_cut_pod_is_not_sent_there_again() -> None:
    # A pooled connection that breaks is normally retried once on a fresh one (the server may
    # have closed it idle); one broken by a cut must not be: the pod would hold it again.
    async def go() -> None:
        answered = 0

        async def first_then_frozen(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nonlocal answered
            while await reader.readuntil(b"\r\n\r\n"):
                await reader.readexactly(2)  # the body: {}
                if answered:
                    await asyncio.sleep(3600)  # frozen from now on, on every connection
                answered += 1
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-type: application/json\r\n\r\n{}")
                await writer.drain()

        server = await asyncio.start_server(first_then_frozen, "127.0.0.1", 0)
        base = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        client = UpstreamClient()
        r = await client.post(f"{base}/x", b"{}", {})
        await r.aread()
        await r.aclose()  # back in the pool
        pending = asyncio.create_task(client.post(f"{base}/x", b"{}", {}))  # on the pooled connection
        await asyncio.sleep(0.3)
        assert client.cut(base) == 1
        try:
            await asyncio.wait_for(pending, 2)
            raise AssertionError("answered by a frozen server?")
        except UpstreamError:
            pass
        await client.aclose()
        server.close()

    asyncio.run(go())
