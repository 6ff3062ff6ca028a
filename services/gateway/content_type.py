"""Request bodies are JSON whatever `curl -d` says: no route of the API takes a form.

`curl -d '{...}'` sends `Content-Type: application/x-www-form-urlencoded`; FastAPI would then
refuse a valid JSON body. A body sent without a Content-Type or as a form is read as JSON (and is
a 400 "Invalid JSON" when it is not JSON); any other non-JSON media type is a 415 that names the
header (README, "The services").
"""
from __future__ import annotations

from typing import Any

from oma.services.gateway.proxy import json_response
from oma.shared import errors

JSON = b"application/json"
READ_AS_JSON = (b"", b"application/x-www-form-urlencoded")


def _has_body(headers: list[tuple[bytes, bytes]]) -> bool:
    h = dict(headers)
    return b"transfer-encoding" in h or h.get(b"content-length", b"0").strip() not in (b"0", b"")


class JsonBodies:
    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope, receive, send):
        # The API only: the web GUI's forms under /ui/ are real forms.
        if (scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH")
                or not scope["path"].startswith("/api/")):
            return await self.app(scope, receive, send)
        headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
        given = next((v for k, v in scope["headers"] if k == b"content-type"), b"")
        media = given.split(b";", 1)[0].strip().lower()
        if media in READ_AS_JSON:
            scope = {**scope, "headers": headers + [(b"content-type", JSON)]}
        elif media != JSON and not media.endswith(b"+json") and _has_body(scope["headers"]):
            exc = errors.OmaError("Unsupported media type",
                                  f"Content-Type: {given.decode('latin-1')[:100]}; send application/json",
                                  status=415)
            return await json_response(exc.body(), exc.status)(scope, receive, send)
        return await self.app(scope, receive, send)
