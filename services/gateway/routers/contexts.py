from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, Path, Query
from fastapi.sse import EventSourceResponse, ServerSentEvent

from oma.services.gateway.deps import BusDep
from oma.services.gateway.live import RESYNC, Feed
from oma.shared import errors
from oma.services.gateway.proxy import errors_doc, forward
from oma.services.gateway import responses as r
from oma.shared.schemas import OFFSET_MAX
from oma.shared.subjects import Contexts

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


EVENTS_ROUTE = "/api/v1/vm-contexts/{vm_name:path}/events"


async def context_feed(bus: BusDep, vm_name: str = VmName) -> AsyncIterator[tuple[Feed, dict[str, Any]]]:
    """The VM's updates and its context now; a 404 before the stream starts. Unsubscribes when
    the stream ends (a dependency with yield outlives the streamed response)."""
    feed = Feed(lambda update: update.get("vm_name") == vm_name, EVENTS_ROUTE)
    # Subscribe first, then read the snapshot: no update can fall between the two.
    sub = await bus.nc.subscribe(Contexts.EVT_UPDATED, cb=feed.on_message)
    try:
        yield feed, await bus.call(Contexts.GET, {"vm_name": vm_name})
    finally:
        await sub.unsubscribe()


@router.get("/{vm_name:path}/events", response_class=EventSourceResponse,
            responses={200: r.EVENT_STREAM, **errors_doc(401, 404)})
async def context_events(bus: BusDep, live: Annotated[tuple[Feed, dict[str, Any]], Depends(context_feed)],
                         vm_name: str = VmName) -> AsyncIterator[ServerSentEvent]:
    """Server-Sent Events: the VM's context now, then each change as it happens; a client too slow
    for the changes gets `resync`, the whole context again, instead of losing some."""
    feed, first = live
    yield ServerSentEvent(event="context", raw_data=orjson.dumps(first).decode())
    while True:
        update = await feed.next()
        if update is RESYNC:
            try:
                state = await bus.call(Contexts.GET, {"vm_name": vm_name})
            except errors.OmaError:  # the aggregator is away: end; EventSource reconnects to `context`
                return
            yield ServerSentEvent(event="resync", raw_data=orjson.dumps(state).decode())
        else:
            yield ServerSentEvent(event="update", raw_data=update.decode())


@router.get("/{vm_name:path}", response_model=r.VmContextDetail, responses=errors_doc(400, 401, 404))
async def get_context(bus: BusDep, vm_name: str = VmName):
    """Everything about one VM: context, current job, last 10 jobs, disks, last 20 CBT records."""
    return await forward(bus, Contexts.GET, {"vm_name": vm_name})
