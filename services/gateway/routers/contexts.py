from __future__ import annotations

import asyncio

import orjson
from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse

from services.gateway.deps import BusDep
from services.gateway.proxy import errors_doc, forward
from services.gateway import responses as r
from shared.subjects import Contexts

router = APIRouter(prefix="/api/v1/vm-contexts", tags=["vm-contexts"])


@router.get("", response_model=r.VmContextList, responses=errors_doc(400, 401))
async def list_contexts(bus: BusDep, status: str | None = Query(None, max_length=32),
                        limit: int = Query(100, ge=1, le=1000), offset: int = Query(0, ge=0)):
    """Dashboard overview: every VM with its status, job statistics and current operation."""
    q = {k: v for k, v in dict(status=status, limit=limit, offset=offset).items() if v is not None}
    return await forward(bus, Contexts.LIST, q)


@router.get("/{vm_name}", response_model=r.VmContextDetail, responses=errors_doc(401, 404))
async def get_context(vm_name: str, bus: BusDep):
    """Everything about one VM: context, current job, last 10 jobs, disks, last 20 CBT records."""
    return await forward(bus, Contexts.GET, {"vm_name": vm_name})


@router.get("/{vm_name}/events", response_class=StreamingResponse,
            responses={200: r.EVENT_STREAM, **errors_doc(401, 404)})
async def context_events(vm_name: str, request: Request, bus: BusDep):
    """Server-Sent Events: the VM's context now, then each change as it happens."""
    queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=100)

    async def on_update(msg) -> None:
        if orjson.loads(msg.data).get("vm_name") == vm_name and not queue.full():
            queue.put_nowait(msg.data)

    # Subscribe first, then read the snapshot: no update can fall between the two.
    sub = await bus.nc.subscribe(Contexts.EVT_UPDATED, cb=on_update)
    try:
        first = await bus.call(Contexts.GET, {"vm_name": vm_name})  # 404 before the stream starts
    except BaseException:
        await sub.unsubscribe()
        raise

    async def stream():
        try:
            yield b"event: context\ndata: " + orjson.dumps(first) + b"\n\n"
            while not await request.is_disconnected():
                try:
                    data = await asyncio.wait_for(queue.get(), timeout=15)
                except asyncio.TimeoutError:
                    yield b": keep-alive\n\n"
                    continue
                yield b"event: update\ndata: " + data + b"\n\n"
        finally:
            await sub.unsubscribe()

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
