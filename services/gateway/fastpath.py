"""The dashboard's two reads past FastAPI's routing, dependencies and parameter validation.

`GET /api/v1/vm-contexts` and `GET /api/v1/vm-contexts/{vm_name}` are what a GUI polls. For them
FastAPI's per-request machinery costs more CPU than the bus round trip (docs/deployment.md,
"Performance"). This middleware sits inside RequestGuard (the session is already checked) and
answers them when their parameters are plainly valid: the same bus request as the routes in
routers/contexts.py, the same reply bytes, the same error bodies; a reply the aggregator announced
no change for since is answered from this process's copy (shared/replies.py). Any other request,
or a query FastAPI would coerce or refuse (a duplicate or unknown key, an empty or out-of-range
value), takes the normal way, so FastAPI stays the one place that phrases validation errors.
"""
from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import parse_qsl

import orjson
from fastapi import Response

from oma.services.gateway.errors import error_response
from oma.services.gateway.proxy import JSON
from oma.services.gateway.routers import contexts
from oma.shared import errors
from oma.shared.replies import Replies
from oma.shared.subjects import Contexts

PREFIX = contexts.router.prefix  # /api/v1/vm-contexts
DETAIL = PREFIX + "/"
ROUTES = {route.path: route for route in contexts.router.routes}  # for the metrics' route label
LIST_ROUTE, DETAIL_ROUTE = ROUTES[PREFIX], ROUTES[PREFIX + "/{vm_name:path}"]
NAME_MAX = 255  # as routers/contexts.py VmName


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


class ContextReplies(Replies):
    """This gateway process's copy of the aggregator's replies (shared/replies.py): dropped on
    `Contexts.EVT_CHANGED`, and wholly after a reconnect (notifications may have been missed)."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__(max_bytes=max_bytes)
        self.nc: Any = None
        self._reconnects = 0
        self.tasks: set[asyncio.Task] = set()  # refreshes of due replies under way

    async def subscribe(self, nc: Any) -> None:
        self.nc = nc
        await nc.subscribe(Contexts.EVT_CHANGED, cb=self.on_changed)

    async def on_changed(self, msg: Any) -> None:
        try:
            names = orjson.loads(msg.data).get("vm_names")
        except (orjson.JSONDecodeError, AttributeError):
            names = None
        self.changed(names)

    def current(self) -> "ContextReplies":
        reconnects = self.nc.stats["reconnects"] if self.nc is not None else 0
        if reconnects != self._reconnects:
            self._reconnects = reconnects
            self.changed()
        return self


class FastReads:
    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] == "GET" and not scope.get("root_path"):
            path = scope["path"]
            if path == PREFIX:
                payload = list_query(scope["query_string"])
                if payload is not None:
                    return await self._answer(scope, receive, send, LIST_ROUTE, Contexts.LIST, payload)
            # A name with `/` (or `/events`) takes the routed way: routers/contexts.py tells them apart.
            elif path.startswith(DETAIL) and "/" not in path[len(DETAIL):] and 0 < len(path) - len(DETAIL) <= NAME_MAX:
                return await self._answer(scope, receive, send, DETAIL_ROUTE, Contexts.GET,
                                          {"vm_name": path[len(DETAIL):]})
        await self.app(scope, receive, send)

    @staticmethod
    async def _answer(scope, receive, send, route: Any, subject: str, payload: dict[str, Any]) -> None:
        scope["route"] = route
        try:
            body = await context_read(scope["app"].state, subject, payload)
        except errors.OmaError as exc:  # as the gateway's OmaError handler answers it
            return await error_response(exc)(scope, receive, send)
        await Response(content=body, media_type=JSON)(scope, receive, send)


async def context_read(state: Any, subject: str, payload: dict[str, Any]) -> bytes:
    """A context list page or one VM's context: this process's copy when the aggregator announced
    no change since, else the bus request (both answer 200 or raise). The GUI reads through it too."""
    cache: ContextReplies = state.context_replies.current()
    vm_name = payload.get("vm_name")
    key = vm_name or tuple(payload.values())  # (status,) limit, offset: build the payload in that order
    body = cache.get_vm(vm_name) if vm_name else cache.get_list(key)
    if body is None:
        return await _ask(state, cache, subject, payload)
    # Near its end: served, and asked again beside (the aggregator's copy is refreshed by that ask).
    if cache.due_vm(vm_name) if vm_name else cache.due_list(key):
        task = asyncio.ensure_future(cache.refresh("vm" if vm_name else "list", key,
                                                   _ask(state, cache, subject, payload)))
        cache.tasks.add(task)
        task.add_done_callback(cache.tasks.discard)
    return body


async def _ask(state: Any, cache: ContextReplies, subject: str, payload: dict[str, Any]) -> bytes:
    generation = cache.generation
    _, body = await state.bus.request(subject, payload)
    if vm_name := payload.get("vm_name"):
        cache.put_vm(vm_name, generation, body, orjson.loads(body)["context"]["vm_name"])
    else:
        cache.put_list(tuple(payload.values()), generation, body)
    return body
