"""An aiohttp client of the VMA's API (implements `oma.shared.vma.VmaClient`).

Each call has a total timeout. Transient failures are retried with a short exponential backoff:
a refused connection always (nothing reached the VMA), a reset connection or a 502/503/504 only
for calls that are safe to repeat (everything but `replicate`, which could start a copy twice).
A 4xx is never retried, nor is a timeout (the caller's next poll is the retry). Only redacted
URLs are logged: the original's cbt-status takes the vCenter credentials in the query string,
and bodies (which carry them too) are never logged.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, TypeVar
from urllib.parse import quote

import aiohttp
import orjson
from pydantic import BaseModel, ValidationError
from yarl import URL

from oma.shared.settings import Settings
from oma.shared.vma import (API_PREFIX, SECRET_FIELDS, CbtStatusResponse, CleanupRequest, CleanupResponse,
                        DiscoverRequest, DiscoverResponse, HealthResponse, PowerRequest, PowerResponse,
                        PowerStateResponse, ProgressResponse, ReplicateRequest, ReplicateResponse,
                        StatusResponse, VCenterCredentials, VmaError, VmaNotFound, VmaRejected,
                        VmaRemoteError, VmaTimeout, VmaUnreachable)

log = logging.getLogger("oma.vma.client")

M = TypeVar("M", bound=BaseModel)

DEFAULT_URL = "http://127.0.0.1:9081"  # the reverse SSH tunnel to the VMA's port 8081
RETRY_STATUSES = frozenset({502, 503, 504})


def redact_url(url: URL | str) -> str:
    """The URL with the values of credential query parameters replaced by ***."""
    url = URL(str(url))
    if not url.query:
        return str(url)
    query = [(k, "***" if k.lower() in SECRET_FIELDS else v) for k, v in url.query.items()]
    return str(url.with_query(query))


class HttpVmaClient:
    """Talks to one VMA at `base_url` (e.g. http://127.0.0.1:9081)."""

    def __init__(self, base_url: str = DEFAULT_URL, *, timeout: float = 30.0, connect_timeout: float = 5.0,
                 retries: int = 3, backoff: float = 0.2, session: aiohttp.ClientSession | None = None):
        self.base_url = base_url.rstrip("/")
        self.timeout = aiohttp.ClientTimeout(total=timeout, sock_connect=connect_timeout)
        self.retries = retries
        self.backoff = backoff
        self._session = session
        self._own_session = session is None

    def __repr__(self) -> str:
        return f"HttpVmaClient({self.base_url!r})"

    async def __aenter__(self) -> HttpVmaClient:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None and self._own_session:
            await self._session.close()
        self._session = None

    # -- the contract ---------------------------------------------------------------------

    async def discover(self, request: DiscoverRequest) -> DiscoverResponse:
        return await self._call("POST", "/discover", DiscoverResponse, body=request)

    async def replicate(self, request: ReplicateRequest) -> ReplicateResponse:
        return await self._call("POST", "/replicate", ReplicateResponse, body=request, idempotent=False)

    async def progress(self, job_id: str) -> ProgressResponse:
        return await self._call("GET", f"/progress/{_segment(job_id)}", ProgressResponse)

    async def status(self, job_id: str) -> StatusResponse:
        return await self._call("GET", f"/status/{_segment(job_id)}", StatusResponse)

    async def cleanup(self, request: CleanupRequest) -> CleanupResponse:
        return await self._call("POST", "/cleanup", CleanupResponse, body=request)

    async def cbt_status(self, vm_path: str, credentials: VCenterCredentials) -> CbtStatusResponse:
        # vm_path keeps its slashes: the VMA's route is /vms/{vm_path...}/cbt-status.
        return await self._call("GET", f"/vms/{quote(vm_path.lstrip('/'), safe='/')}/cbt-status",
                                CbtStatusResponse, query=credentials.query())

    async def power_off(self, request: PowerRequest) -> PowerResponse:
        return await self._call("POST", f"/vm/{_segment(request.vm_id)}/power-off", PowerResponse, body=request)

    async def power_on(self, request: PowerRequest) -> PowerResponse:
        return await self._call("POST", f"/vm/{_segment(request.vm_id)}/power-on", PowerResponse, body=request)

    async def power_state(self, vm_id: str, credentials: VCenterCredentials | None = None) -> PowerStateResponse:
        # The original sends no credentials (the VMA reuses its last session); give them to be sure.
        query = credentials.query() if credentials else None
        return await self._call("GET", f"/vm/{_segment(vm_id)}/power-state", PowerStateResponse, query=query)

    async def health(self) -> HealthResponse:
        return await self._call("GET", "/health", HealthResponse)

    # -- plumbing -------------------------------------------------------------------------

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self.timeout)
            self._own_session = True
        return self._session

    async def _call(self, method: str, path: str, model: type[M], *, body: BaseModel | None = None,
                    query: dict[str, str] | None = None, idempotent: bool = True) -> M:
        url = URL(f"{self.base_url}{API_PREFIX}{path}", encoded=True)
        if query:
            url = url.with_query(query)
        shown = Shown(method, url)
        payload = body.wire() if body is not None else None
        attempt = 0
        while True:
            attempt += 1
            started = time.monotonic()
            try:
                status, raw = await self._send(method, url, payload, shown)
            except VmaError as exc:
                if not self._may_retry(exc, attempt, idempotent):
                    raise
                log.warning("%s: %s (attempt %d of %d), retrying", shown, exc.details, attempt, self.retries + 1)
            else:
                log.debug("%s -> %d in %.3f s", shown, status, time.monotonic() - started)
                if status < 400:
                    try:  # pydantic parses the bytes itself: no dict of the whole answer first
                        return model.model_validate_json(raw or b"null")
                    except ValidationError as exc:
                        raise VmaRemoteError(details=f"{shown}: unexpected answer: "
                                                     f"{exc.error_count()} invalid field(s)") from None
                error = _status_error(status, _json(raw), shown)
                if status not in RETRY_STATUSES or not self._may_retry(error, attempt, idempotent):
                    raise error
                log.warning("%s answered %d (attempt %d of %d), retrying", shown, status, attempt,
                            self.retries + 1)
            await asyncio.sleep(self.backoff * 2 ** (attempt - 1))

    def _may_retry(self, exc: VmaError, attempt: int, idempotent: bool) -> bool:
        # A timeout is not retried here: the VMA may be busy, and waiting retries x timeout helps
        # no one; the caller's next poll is the retry.
        if attempt > self.retries or not exc.retryable or isinstance(exc, VmaTimeout):
            return False
        # A refused connection never reached the VMA; anything else may have started the work.
        return idempotent or getattr(exc, "before_send", False)

    async def _send(self, method: str, url: URL, payload: dict[str, Any] | None, shown: Shown) -> tuple[int, bytes]:
        """One HTTP exchange: the status and the body; transport failures become VmaUnreachable/VmaTimeout
        without the raw URL (aiohttp's messages include it, query and all), so nothing is chained."""
        try:
            async with self._http().request(method, url, json=payload) as resp:
                return resp.status, await resp.read()
        except asyncio.TimeoutError:
            raise VmaTimeout(details=f"{shown}: no answer within {self.timeout.total:g} s") from None
        except aiohttp.ClientConnectorError as exc:
            error = VmaUnreachable(details=f"{shown}: cannot connect to the VMA at {self.base_url} "
                                           f"({exc.os_error.strerror or type(exc.os_error).__name__})")
            error.before_send = True  # type: ignore[attr-defined]
            raise error from None
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError, aiohttp.ClientPayloadError) as exc:
            raise VmaUnreachable(details=f"{shown}: the VMA dropped the connection "
                                         f"({type(exc).__name__})") from None
        except aiohttp.ClientError as exc:
            raise VmaUnreachable(details=f"{shown}: {type(exc).__name__}") from None


def factory(api_url: str | None = None, settings: Settings | None = None) -> HttpVmaClient:
    """Build a client of the VMA at `api_url` (default the reverse tunnel, http://127.0.0.1:9081),
    with the timeout and retries of `settings.vma` (OMA_VMA_TIMEOUT, OMA_VMA_RETRIES)."""
    vma = (settings or Settings()).vma
    return HttpVmaClient(api_url or DEFAULT_URL, timeout=vma.timeout, retries=vma.retries)


class Shown:
    """`METHOD redacted-url` for logs and errors, made only when one needs it (not on every poll)."""
    __slots__ = ("method", "url")

    def __init__(self, method: str, url: URL):
        self.method, self.url = method, url

    def __str__(self) -> str:
        return f"{self.method} {redact_url(self.url)}"


def _json(raw: bytes) -> Any:
    try:
        return orjson.loads(raw) if raw else None
    except orjson.JSONDecodeError:
        return None


def _segment(value: str) -> str:
    return quote(value, safe="")


def _status_error(status: int, data: Any, shown: Shown) -> VmaError:
    """The VMA's own error text (`error`/`details`/`message`) with the call it answered."""
    text = None
    if isinstance(data, dict):
        parts = [str(data[k]) for k in ("error", "details", "message") if data.get(k)]
        text = ": ".join(parts) or None
    details = f"{shown} answered {status}" + (f": {text}" if text else "")
    if status == 404:
        return VmaNotFound(details=details)
    if 400 <= status < 500:
        return VmaRejected(details=details)
    error = VmaRemoteError(details=details)
    error.retryable = status in RETRY_STATUSES
    return error
