"""The dashboard's two reads past FastAPI's routing, dependencies and parameter validation.

`GET /api/v1/vm-contexts` and `GET /api/v1/vm-contexts/{vm_name}` are what a GUI polls. For them
FastAPI's per-request machinery costs more CPU than the bus round trip (docs/deployment.md,
"Performance"). This middleware sits inside RequestGuard (the session is already checked) and
answers them when their parameters are plainly valid: the same bus request as the routes in
routers/contexts.py, the same reply bytes, the same error bodies. Any other request, or a query
FastAPI would coerce or refuse (a duplicate or unknown key, an empty or out-of-range value), takes
the normal way, so FastAPI stays the one place that phrases validation errors.
"""
from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl

from fastapi import Response

from services.gateway.errors import error_response
from services.gateway.proxy import JSON
from services.gateway.routers import contexts
from shared import errors
from shared.subjects import Contexts

PREFIX = contexts.router.prefix  # /api/v1/vm-contexts
DETAIL = PREFIX + "/"
ROUTES = {route.path: route for route in contexts.router.routes}  # for the metrics' route label
LIST_ROUTE, DETAIL_ROUTE = ROUTES[PREFIX], ROUTES[PREFIX + "/{vm_name}"]


def plain_int(text: str, digits: int) -> bool:
    """ASCII digits without a sign, spaces or leading zero: int() and FastAPI read them alike."""
    return text.isascii() and text.isdigit() and len(text) <= digits and (text == "0" or text[0] != "0")


def list_query(query_string: bytes) -> dict[str, Any] | None:
    """The list's bus payload, as routers/contexts.py builds it; None when FastAPI should judge."""
    try:
        pairs = parse_qsl(query_string.decode("latin-1"), keep_blank_values=True, strict_parsing=False)
    except ValueError:
        return None
    given = dict(pairs)
    if len(given) != len(pairs) or not given.keys() <= {"status", "limit", "offset"}:
        return None
    status, limit, offset = given.get("status"), given.get("limit", "100"), given.get("offset", "0")
    if status is not None and not 0 < len(status) <= 32:
        return None
    if not (plain_int(limit, 4) and 1 <= int(limit) <= 1000 and plain_int(offset, 15)):
        return None
    q: dict[str, Any] = {"status": status} if status is not None else {}
    q.update(limit=int(limit), offset=int(offset))
    return q


class FastReads:
    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] == "GET" and not scope.get("root_path"):
            path = scope["path"]
            if path == PREFIX:
                payload = list_query(scope["query_string"])
                if payload is not None:
                    return await self._forward(scope, receive, send, LIST_ROUTE, Contexts.LIST, payload)
            elif path.startswith(DETAIL) and "/" not in path[len(DETAIL):] and len(path) > len(DETAIL):
                return await self._forward(scope, receive, send, DETAIL_ROUTE, Contexts.GET,
                                           {"vm_name": path[len(DETAIL):]})
        await self.app(scope, receive, send)

    @staticmethod
    async def _forward(scope, receive, send, route: Any, subject: str, payload: dict[str, Any]) -> None:
        scope["route"] = route
        try:
            status, body = await scope["app"].state.bus.request(subject, payload)
            response = Response(content=body, status_code=status, media_type=JSON)
        except errors.OmaError as exc:  # as the gateway's OmaError handler answers it
            response = error_response(exc)
        await response(scope, receive, send)
