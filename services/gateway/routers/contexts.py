from __future__ import annotations

import asyncio

import orjson
from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import StreamingResponse

from services.gateway.deps import BusDep
from services.gateway.proxy import errors_doc, forward
from services.gateway import responses as r
from shared.schemas import OFFSET_MAX
from shared.subjects import Contexts

router = APIRouter(prefix="/api/v1/vm-contexts", tags=["vm-contexts"])


@router.get("", response_model=r.VmContextList, responses=errors_doc(400, 401))
async def list_contexts(bus: BusDep, status: str | None = Query(None, max_length=32),
                        limit: int = Query(100, ge=1, le=1000), offset: int = Query(0, ge=0, le=OFFSET_MAX)):
    """Dashboard overview: every VM with its status, job statistics and current operation."""
    q = {k: v for k, v in dict(status=status, limit=limit, offset=offset).items() if v is not None}
    return await forward(bus, Contexts.LIST, q)


# vCenter allows `/` in VM names, and the server decodes %2F before routing: the name is a `path`
# parameter. The `/events` route is declared first so that `a/b/events` is the stream of VM `a/b`.
VmName = Path(min_length=1, max_length=255, description="the VM's name; `/` in it may be sent as is or as %2F")


@router.get("/{vm_name:path}/events", response_class=StreamingResponse,
            responses={200: r.EVENT_STREAM, **errors_doc(401, 404)})
async def context_events(request: Request, bus: BusDep, vm_name: str = VmName):
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


@router.get("/{vm_name:path}", response_model=r.VmContextDetail, responses=errors_doc(400, 401, 404))
async def get_context(bus: BusDep, vm_name: str = VmName):
    """Everything about one VM: context, current job, last 10 jobs, disks, last 20 CBT records."""
    return await forward(bus, Contexts.GET, {"vm_name": vm_name})
