"""One SSE client's share of the live context updates (core NATS `Contexts.EVT_UPDATED`).

Updates wait in a bounded queue. A client too slow to take them (the queue is full) does not lose
some silently: the queued ones are dropped, updates stop being queued, and the client's next read
is RESYNC, which the route answers with the VM's full state, read after the drop. Updates are
queued again from that moment, so none is missing after the resync: it carries every change until
then, and each later one is sent.
"""
from __future__ import annotations

import asyncio
from typing import Any, Callable, Final

import orjson

from oma.shared import metrics

QUEUE_SIZE = 100
RESYNC: Final = object()


class Feed:
    def __init__(self, wanted: Callable[[dict[str, Any]], bool], route: str, size: int = QUEUE_SIZE):
        self.wanted = wanted
        self.route = route
        self.queue: asyncio.Queue[bytes | object] = asyncio.Queue(maxsize=size)
        self.behind = False

    async def on_message(self, msg: Any) -> None:
        """The NATS callback: queue the update, or fall behind."""
        if self.behind or not self.wanted(orjson.loads(msg.data)):
            return
        if self.queue.full():
            self.behind = True
            while not self.queue.empty():  # the resync replaces them
                self.queue.get_nowait()
            self.queue.put_nowait(RESYNC)
            metrics.SSE_RESYNCS.labels(route=self.route).inc()
            return
        self.queue.put_nowait(msg.data)

    async def next(self) -> bytes | object:
        """The next update (raw `{"vm_name", "context"}`), or RESYNC after falling behind; from
        then on updates are queued again (the caller reads the full state next)."""
        item = await self.queue.get()
        if item is RESYNC:
            self.behind = False
        return item
