"""What the project's simulators (CloudStack, VMA) share: serving until SIGINT or SIGTERM, and their
unsigned /sim/ control endpoint (loopback only, JSON bodies)."""
from __future__ import annotations

import asyncio
import ipaddress
import signal
from collections.abc import Callable
from typing import Any, Self

from aiohttp import web


class Served:
    """A simulator's lifecycle: `start(host, port)` sets `_runner` up, `stop()` ends with
    `_close()`; `async with sim:` starts it on a free loopback port and stops it."""

    _runner: web.AppRunner | None = None

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        raise NotImplementedError

    async def stop(self) -> None:
        raise NotImplementedError

    async def _close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


async def serve_until_signalled(sim: Any, host: str, port: int) -> None:
    """Start `sim`, print its URL (the ready signal for scripts), stop it on SIGINT/SIGTERM."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(await sim.start(host, port), flush=True)
    try:
        await stop.wait()
    finally:
        await sim.stop()


async def json_body(request: web.Request, *required: str) -> dict[str, Any]:
    """A control request's JSON object, or 400 naming what is missing."""
    try:
        spec = await request.json()
    except ValueError:
        raise web.HTTPBadRequest(text="expected a JSON object") from None
    missing = [k for k in required if not isinstance(spec, dict) or k not in spec]
    if missing:
        raise web.HTTPBadRequest(text=f"missing field(s): {', '.join(missing)}")
    return spec


@web.middleware
async def loopback_only_control(request: web.Request, handler: Callable[..., Any]) -> web.StreamResponse:
    """The control endpoint is unsigned, so only the local machine may use it."""
    if request.path.startswith("/sim/"):
        remote = request.remote or ""
        try:
            local = ipaddress.ip_address(remote).is_loopback
        except ValueError:
            local = False
        if not local:
            raise web.HTTPForbidden(text="the /sim/ control endpoint answers loopback clients only")
    return await handler(request)
