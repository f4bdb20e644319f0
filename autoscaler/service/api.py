"""The autoscaler's HTTP API (bearer token), for the activator and the CLI.

    GET    /routes?after=V&wait_s=S   the route table once its version is > V (long-poll)
    POST   /demand                    {"waiting": {function: n}, "active": [function, ...],
                                       "routes_version": V}
    GET    /status                    functions, pods, instances, demand
    GET    /functions                 deployed FunctionSpecs
    POST   /functions                 deploy (a FunctionSpec body); 400 with the field on bad input
    DELETE /functions/{name}          undeploy; its instances unload once idle
    GET    /healthz                   no token
"""

from __future__ import annotations

import hmac
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Lifespan

from autoscaler.service.controller import Controller
from functions import SpecError, parse_function_spec


def _error(status: int, message: str, code: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "code": code}}, status_code=status)


def _count(v: object) -> int:
    """A JSON integer >= 0 (not a float, a bool or a string: a count sent wrong is a bug to report)."""
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError(f"not a count: {v!r}")
    return v


def create_api(controller: Controller, token: str, lifespan: Lifespan[Any] | None = None) -> Starlette:
    def authed(handler: Any) -> Any:
        async def endpoint(request: Request) -> Response:
            given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
            if not given or not hmac.compare_digest(given, token):
                return _error(401, "autoscaler API: missing or wrong bearer token", "unauthorized")
            resp: Response = await handler(request)
            return resp
        return endpoint

    async def get_routes(request: Request) -> Response:
        try:
            after = int(request.query_params.get("after", "0"))
            wait_s = min(60.0, max(0.0, float(request.query_params.get("wait_s", "20"))))
        except ValueError:
            return _error(400, "after must be an integer and wait_s a number", "invalid_query")
        table = await controller.next_table(after, wait_s)
        return JSONResponse(table.to_json())

    async def post_demand(request: Request) -> Response:
        try:
            body = await request.json()
            waiting = {str(k): _count(v) for k, v in dict(body.get("waiting", {})).items()}
            active = [str(x) for x in body.get("active", [])]
            arrived = {str(k): _count(v) for k, v in dict(body.get("arrived", {})).items()}
            seen_version = _count(body.get("routes_version", 0))
        except (ValueError, TypeError, AttributeError):
            return _error(400, "send {'waiting': {function: count}, 'active': [function, ...], "
                               "'arrived': {function: count}} with integer counts >= 0 and an integer routes_version", "invalid_demand")
        controller.report_demand(waiting, active, seen_version, arrived)
        return JSONResponse({"ok": True})

    async def get_status(_: Request) -> Response:
        return JSONResponse(controller.status())

    async def get_functions(_: Request) -> Response:
        return JSONResponse({"functions": [s.to_dict() for _, s in sorted(controller.functions.items())]})

    async def post_function(request: Request) -> Response:
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "request body is not valid JSON", "invalid_json")
        if not isinstance(body, dict):
            return _error(400, "the body must be a FunctionSpec object", "invalid_spec")
        try:
            spec = parse_function_spec(body)
        except SpecError as e:
            return _error(400, str(e), "invalid_spec")
        controller.deploy(spec)
        return JSONResponse(spec.to_dict(), status_code=201)

    async def delete_function(request: Request) -> Response:
        name = request.path_params["name"]
        if not controller.delete(name):
            deployed = ", ".join(sorted(controller.functions)) or "none"
            return _error(404, f"function '{name}' not found; deployed: {deployed}", "function_not_found")
        return JSONResponse({"deleted": name})

    async def healthz(_: Request) -> Response:
        return JSONResponse({"status": "ok", "rounds": controller.rounds})

    return Starlette(routes=[
        Route("/healthz", healthz, methods=["GET"]),
        Route("/routes", authed(get_routes), methods=["GET"]),
        Route("/demand", authed(post_demand), methods=["POST"]),
        Route("/status", authed(get_status), methods=["GET"]),
        Route("/functions", authed(get_functions), methods=["GET"]),
        Route("/functions", authed(post_function), methods=["POST"]),
        Route("/functions/{name}", authed(delete_function), methods=["DELETE"]),
    ], lifespan=lifespan)
