"""The bus: NATS connection, request/reply with the one error envelope, events on JetStream.

Errors travel as nats.micro error headers (`Nats-Service-Error-Code` = the HTTP status of the seed's
error table) with the seed's body `{"success": false, "error", "details"}` as payload, so a caller
never waits for a timeout to learn of an error, and the gateway passes the body through as it is.
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

import nats
import orjson
from nats.aio.client import Client as NATS
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout
from nats.js.api import StreamConfig
from nats.js.errors import BadRequestError, NotFoundError
from nats.micro.request import ERROR_CODE_HEADER, ERROR_HEADER

from oma.shared import errors, metrics
from oma.shared.logging import correlation_id
from oma.shared.retry import backoff_delay
from oma.shared.subjects import EVENTS_STREAM, EVENTS_WILDCARD

log = logging.getLogger("oma.bus")

CORRELATION_HEADER = "Oma-Correlation-Id"
STATUS_HEADER = "Oma-Status"  # a success status other than 200 (201, 202)
HEADER_PREFIX = "Oma-Http-"    # HTTP headers an error asks for (Retry-After...)


def dumps(obj: Any) -> bytes:
    if hasattr(obj, "model_dump"):
        obj = obj.model_dump(mode="json")
    return orjson.dumps(obj, option=orjson.OPT_NON_STR_KEYS)


def event_envelope(event_id: str | None = None) -> dict[str, Any]:
    """The common fields of every event (docs/events.md): a unique id and the time, in ms."""
    from oma.shared.db import iso_ms, utcnow
    return {"event_id": event_id or uuid.uuid4().hex, "occurred_at": iso_ms(utcnow())}


@dataclass
class Reply:
    """A handler's success reply; `status` 201/202 travel in a header."""
    body: Any
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)


async def connect(url: str, name: str, *, user: str = "", password: str = "",
                  timeout: float = 60.0) -> NATS:
    """Connect with bounded retries, logging what we wait for."""
    deadline = time.monotonic() + timeout
    attempt = 0
    refused: list[str] = []  # an authorization violation: retrying cannot help

    async def on_error(exc: Exception) -> None:
        if "authorization violation" in str(exc).lower():
            refused.append(str(exc))
        await _log_error(exc)

    while True:
        attempt += 1
        try:
            # A private reply inbox per user, so the NATS config can keep clients from reading
            # each other's replies (credentials travel in some).
            opts: dict[str, Any] = dict(servers=[url], name=name, connect_timeout=2,
                                        inbox_prefix=f"_INBOX_{user or name}",
                                        max_reconnect_attempts=-1, reconnect_time_wait=0.5,
                                        allow_reconnect=True)
            if user:
                opts.update(user=user, password=password)
            # nats-py retries a first connect forever when reconnects are unlimited: bound it here.
            async with asyncio.timeout(max(0.5, min(2.0, deadline - time.monotonic()))):
                return await nats.connect(**opts, error_cb=on_error, disconnected_cb=_disc(name),
                                          reconnected_cb=_reco(name))
        except Exception as exc:  # noqa: BLE001 - every connect failure means "wait and retry"
            if refused:
                raise errors.Unavailable("NATS refused the credentials",
                                         f"{url}: authorization violation for user {user or '(anonymous)'}") from None
            if isinstance(exc, TimeoutError):
                exc = TimeoutError("no answer")
            if time.monotonic() >= deadline:
                raise errors.Unavailable("NATS unreachable",
                                         f"could not connect to NATS at {url} after {attempt} attempts: {exc}") from None
            log.warning("waiting for NATS", extra={"url": url, "attempt": attempt, "reason": str(exc)})
            await asyncio.sleep(backoff_delay(attempt, 0.2, 2.0))


async def _log_error(exc: Exception) -> None:
    log.warning("nats error: %s", exc)


def _disc(name: str) -> Callable[[], Awaitable[None]]:
    async def cb() -> None:
        log.info("disconnected from NATS", extra={"client": name})
    return cb


def _reco(name: str) -> Callable[[], Awaitable[None]]:
    async def cb() -> None:
        log.info("reconnected to NATS", extra={"client": name})
    return cb


class Bus:
    """A service's (or the gateway's) view of the bus."""

    def __init__(self, nc: NATS, *, timeout: float = 30.0):
        self.nc = nc
        self.timeout = timeout
        self.js = nc.jetstream()

    async def request(self, subject: str, payload: Any = None, *, timeout: float | None = None,
                      headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        """Send a request; return (status, body bytes) or raise the OmaError the service raised."""
        hdrs = {CORRELATION_HEADER: correlation_id.get() or uuid.uuid4().hex}
        if headers:
            hdrs.update(headers)
        data = payload if isinstance(payload, bytes) else dumps(payload if payload is not None else {})
        try:
            msg = await self.nc.request(subject, data, timeout=timeout or self.timeout, headers=hdrs)
        except NoRespondersError:
            raise errors.NoResponders("Service unavailable", f"no service answers {subject}") from None
        except NatsTimeout:
            raise errors.BusTimeout("Service timeout", f"no reply on {subject} within "
                                         f"{timeout or self.timeout:g}s") from None
        h = msg.headers or {}
        if ERROR_CODE_HEADER in h:
            status = int(h[ERROR_CODE_HEADER]) if h[ERROR_CODE_HEADER].isdigit() else 500
            try:
                body = orjson.loads(msg.data) if msg.data else {}
            except orjson.JSONDecodeError:
                body = {}
            exc = errors.from_status(status, body.get("error") or h.get(ERROR_HEADER, "error"),
                                     body.get("details"))
            exc.headers = {k[len(HEADER_PREFIX):]: v for k, v in h.items() if k.startswith(HEADER_PREFIX)}
            raise exc
        return int(h.get(STATUS_HEADER, 200)), msg.data

    async def call(self, subject: str, payload: Any = None, **kw: Any) -> Any:
        """Request and decode the JSON reply."""
        _, data = await self.request(subject, payload, **kw)
        return orjson.loads(data) if data else None

    async def ensure_stream(self) -> None:
        """The events stream, created when missing. An existing stream is left as it is: an operator
        may have set limits (max_age, max_bytes) that a restart must not undo."""
        try:
            await self.js.stream_info(EVENTS_STREAM)
            return
        except NotFoundError:
            pass
        try:
            await self.js.add_stream(StreamConfig(name=EVENTS_STREAM, subjects=[EVENTS_WILDCARD],
                                                  duplicate_window=120.0))
        except BadRequestError:  # another service created it in the meantime
            await self.js.stream_info(EVENTS_STREAM)

    async def publish_event(self, subject: str, payload: Any, *, msg_id: str | None = None) -> None:
        """Publish an event to the stream; `msg_id` makes redelivery of one fact harmless."""
        hdrs = {CORRELATION_HEADER: correlation_id.get() or ""}
        if msg_id:
            hdrs["Nats-Msg-Id"] = msg_id
        await self.js.publish(subject, dumps(payload), headers=hdrs)
        metrics.EVENTS_PUBLISHED.labels(subject=subject).inc()
