"""The gateway's HTTP server: uvicorn, with the guards it lacks against slow and excess clients.

uvicorn has no deadline for a request head: its keep-alive timer only covers the idle time between
requests and is reset by every byte, so a client that trickles (or stops half-way through) a header
holds its connection and file descriptor forever (uvicorn issue #157 lists "timeout-request-start"
as never done). Its `limit_concurrency` answers 503 only once a head is complete, so it caps
nothing while such clients pile up. Both guards therefore live in the protocol, per connection.
"""
from __future__ import annotations

import asyncio
import functools
import logging
import resource
import time
from typing import Any

import orjson
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from oma.shared.settings import Settings

log = logging.getLogger("oma.gateway")

# File descriptors kept for everything but client connections: NATS, databases, logs, children's pipes.
FD_RESERVE = 256
# How long a refused connection may linger so that the client reads the 503 instead of a reset.
REFUSE_LINGER = 1.0


def _busy_response() -> bytes:
    body = orjson.dumps({"success": False, "error": "Service unavailable",
                         "details": "too many open connections; retry shortly"})
    head = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\n"
            b"connection: close\r\ncontent-length: %d\r\n\r\n" % len(body))
    return head + body


BUSY = _busy_response()


class GuardedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a request-head deadline and an open-connection cap.

    The deadline starts when the connection is accepted (a client that connects and sends nothing is
    the cheapest attack) and again at the first byte of each later request; it ends when the head is
    complete, so slow bodies and long responses (SSE) are not affected. A body refused before it was
    read (401, 413) gets the same time to end. A connection beyond the cap gets a 503 in the seed's
    shape at once and is closed."""

    _last_cap_warning = 0.0

    def __init__(self, *args: Any, header_timeout: float, max_connections: int, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.header_timeout = header_timeout
        self.max_connections = max_connections
        self._timer: asyncio.TimerHandle | None = None  # the head deadline, or a refused body's
        self._refused = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if len(self.connections) >= self.max_connections:
            self._refuse(transport)
            return
        super().connection_made(transport)
        self._arm()

    def _refuse(self, transport: asyncio.Transport) -> None:
        self._refused = True
        self.transport = transport
        now = time.monotonic()
        if now - GuardedHttpProtocol._last_cap_warning > 10:
            GuardedHttpProtocol._last_cap_warning = now
            log.warning("connection limit reached: new connections get 503",
                        extra={"max_connections": self.max_connections})
        transport.write(BUSY)
        # Half-close and read on until the client closes (or REFUSE_LINGER): closing with its
        # request unread would reset the connection and could destroy the 503 before it is read.
        if transport.can_write_eof():
            transport.write_eof()
        self._timer = self.loop.call_later(REFUSE_LINGER, transport.close)

    def data_received(self, data: bytes) -> None:
        if not self._refused:
            super().data_received(data)

    def eof_received(self) -> bool | None:
        if self._refused:
            self.transport.close()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_timer()
        if self._refused:
            return
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._timer is None:
            self._arm()

    def on_headers_complete(self) -> None:
        self._stop_timer()
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.cycle is not None and self.cycle.more_body and not self.transport.is_closing():
            # Answered before its body was read (401, 413): uvicorn reads on and discards the rest,
            # for header_timeout at most, so a refused upload cannot keep streaming forever.
            self._stop_timer()
            self._timer = self.loop.call_later(self.header_timeout, self._time_out, "refused body not ended")

    def on_message_complete(self) -> None:
        if self.cycle is not None and self.cycle.response_complete:
            self._stop_timer()  # the refused body has ended: the connection may serve the next request
        super().on_message_complete()

    def _arm(self) -> None:
        self._timer = self.loop.call_later(self.header_timeout, self._time_out, "request head not complete")

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _time_out(self, why: str) -> None:
        self._timer = None
        if not self.transport.is_closing():
            log.debug("%s in time: connection closed", why, extra={"client": self.client[0] if self.client else None})
            self.transport.close()


def raise_file_limit() -> int:
    """Soft RLIMIT_NOFILE up to the hard limit where allowed; returns the soft limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("could not raise the file limit", extra={"soft": soft, "hard": hard, "error": str(exc)})
    return soft


def connection_cap(settings: Settings, file_limit: int) -> int:
    """The configured cap, lowered to what the file limit can hold."""
    fits = max(file_limit - FD_RESERVE, 16)
    if settings.max_connections > fits:
        log.warning("max_connections lowered to fit the file limit",
                    extra={"max_connections": settings.max_connections, "file_limit": file_limit, "used": fits})
        return fits
    return settings.max_connections


def uvicorn_config(app: Any, settings: Settings) -> uvicorn.Config:
    trusted = settings.trusted_proxies.strip()
    protocol = functools.partial(GuardedHttpProtocol, header_timeout=settings.header_timeout,
                                 max_connections=connection_cap(settings, raise_file_limit()))
    # Proxy headers only from proxies the operator names: otherwise X-Forwarded-For from any local
    # process (uvicorn trusts 127.0.0.1 by default) would choose the client address we log and throttle.
    return uvicorn.Config(app, host=settings.host, port=settings.port, http=protocol,  # type: ignore[arg-type]
                          proxy_headers=bool(trusted), forwarded_allow_ips=trusted or None,
                          log_config=None, access_log=False, lifespan="on", timeout_graceful_shutdown=10)
