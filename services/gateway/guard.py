"""The request guard: the first thing every HTTP request meets, before routing.

FastAPI reads and parses a route's body before it runs the route's dependencies, so a bearer check
written as a dependency comes after the upload. Here the token is checked, and a declared oversize
body refused, before a byte of the body is read; then the body is counted as it streams in.
"""
from __future__ import annotations

from typing import Any

from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request

from oma.services.gateway.deps import require_session
from oma.services.gateway.errors import HTTP_TEXT, error_response
from oma.shared import errors

API_PREFIX = "/api/v1/"
PUBLIC_API = frozenset({"/api/v1/auth/login"})


def is_protected(path: str) -> bool:
    return path.startswith(API_PREFIX) and path not in PUBLIC_API


class BodyTooLarge(StarletteHTTPException):
    """Raised from `receive`: FastAPI re-raises an HTTPException met while reading a body (any other
    error becomes a 400), and the gateway's handler answers it in the seed's shape."""

    def __init__(self, limit: int):
        super().__init__(413, f"the request body is larger than the limit of {limit} bytes")


def _content_length(scope: dict[str, Any]) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


class RequestGuard:
    def __init__(self, app: Any, max_body: int):
        self.app = app
        self.max_body = max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        try:
            declared = _content_length(scope)
            if declared is not None and declared > self.max_body:
                raise errors.OmaError(HTTP_TEXT[413], BodyTooLarge(self.max_body).detail, status=413)
            if is_protected(scope["path"]):
                await require_session(Request(scope))  # the session lands in request.state
        except errors.OmaError as exc:
            # The unread body is left to the server, which discards it after the response.
            return await error_response(exc)(scope, receive, send)

        limit, seen = self.max_body, 0

        async def counted_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge(limit)
            return message

        await self.app(scope, counted_receive, send)
