from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson
from fastapi import APIRouter, Request, Response

from oma.services.gateway import responses as r
from oma.services.gateway.proxy import JSON
from oma.shared import errors
from oma.shared.schemas import VERSION
from oma.shared.settings import SERVICES
from oma.shared.subjects import health

router = APIRouter(tags=["health"])


async def _ping_all(nc: Any, timeout: float) -> dict[str, int]:
    """Count the instances of each service answering `$SRV.PING.<name>`."""
    counts = {name: 0 for name in SERVICES}
    inbox = nc.new_inbox()
    done = asyncio.Event()

    async def on_pong(msg: Any) -> None:
        name = orjson.loads(msg.data).get("name")
        if name in counts:
            counts[name] += 1
            if all(counts.values()):
                done.set()

    sub = await nc.subscribe(inbox, cb=on_pong)
    try:
        for name in SERVICES:
            await nc.publish(f"$SRV.PING.{name}", b"", reply=inbox)
        try:
            await asyncio.wait_for(done.wait(), timeout)
            await asyncio.sleep(0.01)  # let a second instance's pong arrive too
        except asyncio.TimeoutError:
            pass
    finally:
        await sub.unsubscribe()
    return counts


# What /health tells anyone about a service: no pids, paths or addresses, and never a secret,
# whatever a service puts in its health reply.
PUBLIC_FIELDS = ("status", "database", "reason", "warning", "vmas")  # vmas: replication's VMA reachability
PUBLIC_EXPORTER = ("backend", "running", "exports")


def _public(result: dict[str, Any], instances: int) -> dict[str, Any]:
    out = {k: result[k] for k in PUBLIC_FIELDS if k in result}
    if isinstance(result.get("exporter"), dict):
        out["exporter"] = {k: result["exporter"][k] for k in PUBLIC_EXPORTER if k in result["exporter"]}
    out["instances"] = instances
    return out


async def check_services(bus: Any) -> tuple[int, dict[str, Any]]:
    """One fan-out: `$SRV.PING` plus each service's health check; the status and the seed's body."""
    # The seed's stamp (shared.db.iso), made here: the gateway loads no database code.
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    body: dict[str, Any] = {"status": "healthy", "timestamp": now, "database": "connected", "version": VERSION}
    if not bus.nc.is_connected:
        body.update(status="degraded", database="unknown", bus="disconnected",
                    services={n: {"status": "unknown"} for n in SERVICES}, reasons=["bus: disconnected"])
        return 503, body

    async def check(name: str) -> dict[str, Any]:
        try:
            return await bus.call(health(name), timeout=2.0)
        except errors.OmaError as exc:
            return {"status": "down", "reason": exc.details or exc.error}

    t0 = time.perf_counter()
    pings, *checks = await asyncio.gather(_ping_all(bus.nc, 2.0), *(check(n) for n in SERVICES))
    services = {name: _public(result, pings[name]) for name, result in zip(SERVICES, checks)}
    down = [n for n, s in services.items() if s["status"] != "up"]
    db_down = [n for n, s in services.items() if s.get("database") == "disconnected"]
    body.update(bus="connected", services=services, check_ms=round((time.perf_counter() - t0) * 1000, 1))
    warnings = [f"{n}: {s['warning']}" for n, s in services.items() if s.get("warning")]
    if warnings:  # the service is up but something it drives is not (e.g. the NBD server)
        body["warnings"] = warnings
    if db_down:
        body["database"] = "disconnected"
    elif down:
        body["database"] = "unknown" if len(down) == len(SERVICES) else "connected"
    if down or db_down:
        reasons = [f"{n}: {services[n].get('reason') or services[n]['status']}" for n in down]
        reasons += [f"{n}: database disconnected" for n in db_down]
        body.update(status="degraded", down=sorted(set(down + db_down)), reasons=reasons)
        return 503, body
    return 200, body


class HealthCache:
    """/health is public: concurrent callers share one fan-out (single flight) and its answer is
    reused for `ttl` seconds, so a crowd of health checkers costs the bus one check a second.

    Answers are also paced to `rate` a second: a crowd asking back to back would otherwise keep the
    event loop busy with /health and make every logged-in request wait its turn behind it. Beyond
    the rate, callers wait for their slot (a monitor polling every few seconds never notices)."""

    def __init__(self, ttl: float, rate: float):
        self.ttl = ttl
        self.interval = 1.0 / rate
        self._answer: tuple[int, bytes] | None = None
        self._until = 0.0
        self._inflight: asyncio.Future[tuple[int, bytes]] | None = None
        self._next_slot = 0.0

    async def get(self, bus: Any) -> tuple[int, bytes]:
        now = time.monotonic()
        slot = max(self._next_slot, now)
        self._next_slot = slot + self.interval
        if slot > now:
            await asyncio.sleep(slot - now)
        if self._answer is not None and time.monotonic() < self._until:
            return self._answer
        if self._inflight is None:
            self._inflight = asyncio.ensure_future(self._refresh(bus))
        # shield: a caller that goes away must not cancel the check the others wait for.
        return await asyncio.shield(self._inflight)

    async def _refresh(self, bus: Any) -> tuple[int, bytes]:
        try:
            status, body = await check_services(bus)
            self._answer = (status, orjson.dumps(body))
            self._until = time.monotonic() + self.ttl
            return self._answer
        finally:
            self._inflight = None


@router.get("/health", response_model=r.Health,
            responses={503: {"model": r.Health, "description": "degraded: a service, the bus or a database is "
                                                                "down; `reasons` says why"}})
async def get_health(request: Request):
    """The seed's health shape, plus the bus and each service (found through `$SRV.PING`)."""
    status, body = await request.app.state.health.get(request.app.state.bus)
    return Response(content=body, status_code=status, media_type=JSON)
