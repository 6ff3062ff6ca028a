from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson
from fastapi import APIRouter, Request

from services.gateway import responses as r
from services.gateway.proxy import json_response
from shared import db, errors
from shared.settings import SERVICES
from shared.subjects import health

router = APIRouter(tags=["health"])
VERSION = "1.0.0"


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


@router.get("/health", response_model=r.Health,
            responses={503: {"model": r.Health, "description": "degraded: a service, the bus or a database is down"}})
async def get_health(request: Request):
    """The seed's health shape, plus the bus and each service (found through `$SRV.PING`)."""
    bus = request.app.state.bus
    body: dict[str, Any] = {"status": "healthy", "timestamp": db.iso(db.utcnow()), "database": "connected",
                            "version": VERSION}
    if not bus.nc.is_connected:
        body.update(status="degraded", database="unknown", bus="disconnected",
                    services={n: {"status": "unknown"} for n in SERVICES})
        return json_response(body, 503)

    async def check(name: str) -> dict[str, Any]:
        try:
            return await bus.call(health(name), timeout=2.0)
        except errors.OmaError as exc:
            return {"status": "down", "reason": exc.details or exc.error}

    t0 = time.perf_counter()
    pings, *checks = await asyncio.gather(_ping_all(bus.nc, 2.0), *(check(n) for n in SERVICES))
    services = {}
    for name, result in zip(SERVICES, checks):
        result.pop("service", None)
        services[name] = {**result, "instances": pings[name]}
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
        body.update(status="degraded", down=sorted(set(down + db_down)))
        return json_response(body, 503)
    return json_response(body)
