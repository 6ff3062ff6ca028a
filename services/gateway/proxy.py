"""Forwarding: the body of a service's reply is passed through as bytes (no re-serialising)."""
from __future__ import annotations

from typing import Any

import orjson
from fastapi import Response

from oma.shared.bus import Bus
from oma.shared.schemas import ErrorBody

JSON = "application/json"


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(content=orjson.dumps(body), status_code=status, media_type=JSON, headers=headers)


async def forward(bus: Bus, subject: str, payload: Any = None, *, timeout: float | None = None) -> Response:
    status, body = await bus.request(subject, payload, timeout=timeout)
    return Response(content=body, status_code=status, media_type=JSON)


def errors_doc(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for the error statuses a route can answer."""
    text = {400: "Bad request", 401: "Unauthorized (missing, invalid, expired or revoked session)",
            404: "Not found", 409: "Conflict", 429: "Too many failed attempts", 502: "Upstream failure",
            503: "Service unavailable", 504: "Upstream timeout"}
    return {c: {"model": ErrorBody, "description": text.get(c, "Error")} for c in codes}
