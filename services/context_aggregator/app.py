from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from oma.services.context_aggregator import service
from oma.services.context_aggregator.consumer import (
    VM_CONTEXTS,
    Applier,
    DurableConsumer,
    replay,
)
from oma.shared import db as dbmod
from oma.shared.bus import dumps
from oma.shared.replies import Replies
from oma.shared.service import BusRequest, ServiceApp, endpoint
from oma.shared.subjects import Contexts


class ListQuery(BaseModel):
    model_config = ConfigDict(extra="ignore")
    status: str | None = Field(None, max_length=32)
    limit: int = Field(100, ge=1, le=1000)
    offset: int = Field(0, ge=0)


class GetQuery(BaseModel):
    model_config = ConfigDict(extra="ignore")
    vm_name: str = Field(min_length=1, max_length=255)


class ContextAggregatorService(ServiceApp):
    name = "context_aggregator"
    description = "Per-VM read model built from events"
    consumer: DurableConsumer | None = None

    async def setup(self) -> None:
        s = self.settings
        self.lock = asyncio.Lock()  # the live consumer and REBUILD never write at once
        self.applier = Applier(self.sessions, self.log)
        self.totals = service.Totals()
        self.replies = Replies(max_bytes=s.contexts_cache_mib << 20)
        self.reads = dbmod.read_engine(self.engine)  # the two reads' connections
        async with self.sessions() as db:
            VM_CONTEXTS.set(await service.count(db))
            position = await service.position(db)
        self.consumer = DurableConsumer(
            self.bus.js, self.applier, self.lock, name=s.contexts_consumer,
            ack_wait=s.contexts_ack_wait, max_deliver=s.contexts_max_deliver,
            nak_delay=s.contexts_nak_delay, batch=s.contexts_batch,
            deliver_policy=s.contexts_deliver_policy, on_changed=self.publish_updates,
            log=self.log)
        await self.consumer.start(position)

    async def stop(self) -> None:
        if self.consumer is not None:
            await self.consumer.stop()
        await super().stop()
        reads = getattr(self, "reads", None)
        if reads is not None and reads is not self.engine:
            await reads.dispose()

    async def changed(self, vm_names: list[str] | None) -> None:
        """Drop the cached replies a change makes stale, here and in every gateway (None: all)."""
        self.totals.clear()
        self.replies.changed(vm_names)
        await self.bus.nc.publish(Contexts.EVT_CHANGED, dumps({"vm_names": vm_names}))

    async def publish_updates(self, vm_names: set[str]) -> None:
        """Core NATS (not the stream): the gateway's SSE route forwards them to the GUI."""
        await self.changed(sorted(vm_names))
        bodies = [(name, await dbmod.read(self.reads, service.get_context, name)) for name in sorted(vm_names)]
        for name, body in bodies:
            await self.bus.nc.publish(Contexts.EVT_UPDATED, dumps({"vm_name": name, "context": body}))

    # The two reads: a cached reply when fresh, else plain rows on a read connection (no ORM session).
    # A reply near the end of its life is served and read again beside (Replies.due_*).
    @endpoint(Contexts.LIST)
    async def list_contexts(self, req: BusRequest) -> bytes:
        q = req.model(ListQuery)
        key = (q.status, q.limit, q.offset)
        body = self.replies.get_list(key)
        if body is None:
            return await self._read_list(key)
        if self.replies.due_list(key):
            self.spawn(self._refresh("list", key, self._read_list(key)))
        return body

    @endpoint(Contexts.GET)
    async def get_context(self, req: BusRequest) -> bytes:
        q = req.model(GetQuery)
        body = self.replies.get_vm(q.vm_name)
        if body is None:
            return await self._read_vm(q.vm_name)
        if self.replies.due_vm(q.vm_name):
            self.spawn(self._refresh("vm", q.vm_name, self._read_vm(q.vm_name)))
        return body

    async def _read_list(self, key: tuple[Any, int, int]) -> bytes:
        generation = self.replies.generation
        body = dumps(await dbmod.read(self.reads, service.list_contexts, *key, self.totals))
        self.replies.put_list(key, generation, body)
        return body

    async def _read_vm(self, vm_name: str) -> bytes:
        generation = self.replies.generation
        reply = await dbmod.read(self.reads, service.get_context, vm_name)
        body = dumps(reply)
        self.replies.put_vm(vm_name, generation, body, reply["context"]["vm_name"])
        return body

    async def _refresh(self, kind: str, key: Any, read: Awaitable[bytes]) -> None:
        if (exc := await self.replies.refresh(kind, key, read)) is not None:  # e.g. the VM is gone
            self.log.info("reply refresh failed", extra={"kind": kind, "reason": type(exc).__name__})

    @endpoint(Contexts.REBUILD)
    async def rebuild(self, req: BusRequest):
        started = time.perf_counter()
        async with self.lock:
            async with self.sessions.begin() as db:
                await service.wipe(db)
            VM_CONTEXTS.set(0)
            await self.changed(None)
            applied, failed = await replay(self.bus.js, self.applier)
            await self.changed(None)
        seconds = round(time.perf_counter() - started, 3)
        self.log.info("read model rebuilt", extra={"events_applied": applied, "events_failed": failed,
                                                   "seconds": seconds})
        return {"success": True, "events_applied": applied, "events_failed": failed, "seconds": seconds}
