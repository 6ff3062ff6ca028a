"""One error family for the whole appliance.

Every error carries the HTTP status of the seed's error table and renders as
`{"success": false, "error": ..., "details": ...}`, both over the bus and over HTTP.
"""
from __future__ import annotations

from typing import Any


def validation_details(errs: list[dict[str, Any]]) -> str:
    """`field.sub: message; ...` — names the fields, never echoes the (possibly secret) input."""
    parts = []
    for err in errs:
        loc = ".".join(str(p) for p in err["loc"] if p != "body") or "body"
        parts.append(f"{loc}: {err['msg']}")
    return "; ".join(parts)


def error_text(exc: BaseException) -> str:
    """What an operator reads on a job and a disk: an OmaError's details (the cloud's or the
    exporter's own text), else the exception's type and message."""
    if isinstance(exc, OmaError):
        return str(exc.details) if exc.details else exc.error
    return f"{type(exc).__name__}: {exc}"


class OmaError(Exception):
    status: int = 500
    error: str = "Internal server error"

    def __init__(self, error: str | None = None, details: Any = None, *, status: int | None = None,
                 headers: dict[str, str] | None = None):
        self.error = error or self.error
        self.details = details
        if status is not None:
            self.status = status
        self.headers = headers or {}
        super().__init__(f"{self.error}: {details}" if details else self.error)

    def body(self) -> dict[str, Any]:
        return {"success": False, "error": self.error, "details": self.details}


class BadRequest(OmaError):
    status, error = 400, "Bad request"


class Unauthorized(OmaError):
    status, error = 401, "Unauthorized"


class Forbidden(OmaError):
    status, error = 403, "Forbidden"


class NotFound(OmaError):
    status, error = 404, "Not found"


class Conflict(OmaError):
    status, error = 409, "Conflict"


class TooManyRequests(OmaError):
    status, error = 429, "Too many requests"


class BadGateway(OmaError):
    """An upstream system (CloudStack, vCenter, NBD server) failed or refused."""
    status, error = 502, "Upstream error"


class Unavailable(OmaError):
    status, error = 503, "Service unavailable"


class UpstreamTimeout(OmaError):
    status, error = 504, "Upstream timeout"


class NoResponders(Unavailable):
    """No instance of the service answers on the bus (not started yet, or restarting): worth a retry."""


class BusTimeout(UpstreamTimeout):
    """A bus request got no reply in time (the service may have died while handling it)."""


_BY_STATUS = {cls.status: cls for cls in
              (BadRequest, Unauthorized, Forbidden, NotFound, Conflict, TooManyRequests,
               BadGateway, Unavailable, UpstreamTimeout)}


def from_status(status: int, error: str, details: Any = None) -> OmaError:
    """Rebuild an error received over the bus as the matching class."""
    cls = _BY_STATUS.get(status, OmaError)
    return cls(error, details, status=status)
