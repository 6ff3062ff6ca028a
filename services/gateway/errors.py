"""One exception handler family: every error leaves the gateway in the seed's shape."""
from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from oma.services.gateway.proxy import json_response
from oma.shared import errors

log = logging.getLogger("oma.gateway")

HTTP_TEXT = {404: "Not found", 405: "Method not allowed", 413: "Request too large"}


def error_response(exc: errors.OmaError) -> Response:
    headers = dict(exc.headers)
    if exc.status == 401:
        headers.setdefault("WWW-Authenticate", "Bearer")
    return json_response(exc.body(), exc.status, headers)


def install(app: FastAPI) -> None:
    @app.exception_handler(errors.OmaError)
    async def oma_error(request: Request, exc: errors.OmaError):
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        errs = exc.errors()
        if any(e.get("type") == "json_invalid" or tuple(e.get("loc", ())) == ("body",) for e in errs):
            return error_response(errors.BadRequest("Invalid JSON", "the request body must be a JSON object"))
        return error_response(errors.BadRequest("Validation failed", errors.validation_details(errs)))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        text = HTTP_TEXT.get(exc.status_code, "Request failed")
        details = (f"no route {request.method} {request.url.path}" if exc.status_code in (404, 405)
                   else exc.detail)
        return error_response(errors.OmaError(text, details, status=exc.status_code,
                                              headers=dict(exc.headers or {})))

    @app.exception_handler(Exception)
    async def crash(request: Request, exc: Exception):
        log.exception("unhandled error", extra={"path": request.url.path})
        return error_response(errors.OmaError("Internal server error", type(exc).__name__))
