"""Feeding the read model from OMA_EVENTS.

- `Applier` applies a batch of messages in one transaction; when the batch fails it retries them
  one by one, so one bad event never holds back the others.
- `DurableConsumer` is the live feed: a durable pull consumer with explicit acks. An event that
  cannot be applied is nak'ed (redelivered after a delay) and, at its max_deliver-th delivery,
  terminated and counted as dead-lettered.
- `replay` reads the whole stream through a throw-away consumer (REBUILD).
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.client import JetStreamContext
from nats.js.errors import NotFoundError
from prometheus_client import Counter, Gauge, Histogram
from sqlalchemy.ext.asyncio import async_sessionmaker

from oma.services.context_aggregator import service
from oma.services.context_aggregator.events import Malformed, event_type, parse
from oma.shared.subjects import EVENTS_STREAM, Failover, Inventory, Replication

# Never auth/config/export events, nor our own context.updated (also under oma.evt.).
FILTERS = [f"{Replication.EVT_PREFIX}.>", Inventory.EVT_DISCOVERED, Failover.EVT_STATUS]

EVENTS_APPLIED = Counter("oma_context_events_applied_total", "Events that changed the read model", ["type"])
EVENTS_SKIPPED = Counter("oma_context_events_skipped_total",
                         "Duplicate or older events that changed nothing", ["type"])
EVENTS_FAILED = Counter("oma_context_events_failed_total", "Event deliveries that could not be applied")
EVENTS_DEAD = Counter("oma_context_events_dead_lettered_total",
                      "Events terminated after max_deliver failed deliveries")
APPLY_DURATION = Histogram("oma_context_apply_duration_seconds", "Time to apply one batch of events",
                           buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5))
VM_CONTEXTS = Gauge("oma_vm_contexts", "VM contexts in the read model")


@dataclass
class Outcome:
    done: list[Msg] = field(default_factory=list)                    # applied or harmlessly skipped
    failed: list[tuple[Msg, str]] = field(default_factory=list)      # (message, reason)
    changed: set[str] = field(default_factory=set)                   # VM names
    applied: int = 0


class Applier:
    def __init__(self, sessions: async_sessionmaker, log: logging.Logger):
        self.sessions = sessions
        self.log = log

    async def _transaction(self, items: list[tuple[Msg, Any]]) -> tuple[list[bool], set[str], int]:
        started = time.perf_counter()
        async with self.sessions.begin() as db:
            batch = service.Batch(db)
            await batch.preload([ev for _, ev in items])
            results = [await service.apply(batch, ev) for _, ev in items]
            await service.record_position(db, max(m.metadata.sequence.stream for m, _ in items))
        APPLY_DURATION.observe(time.perf_counter() - started)
        return results, batch.changed, batch.new_contexts

    async def apply(self, msgs: list[Msg]) -> Outcome:
        out = Outcome()
        parsed: list[tuple[Msg, Any]] = []
        for m in msgs:
            try:
                parsed.append((m, parse(m.subject, m.data)))
            except Malformed as exc:
                out.failed.append((m, str(exc)))
        if not parsed:
            return out
        try:
            groups = [(parsed, await self._transaction(parsed))]
        except Exception:  # noqa: BLE001 - find the culprit: one transaction per event
            groups = []
            for item in parsed:
                try:
                    groups.append(([item], await self._transaction([item])))
                except Exception as exc:  # noqa: BLE001 - any failure: nak, then dead-letter
                    out.failed.append((item[0], f"{type(exc).__name__}: {str(exc)[:300]}"))
        for items, (results, changed, new) in groups:
            for (m, _), applied in zip(items, results):
                kind = event_type(m.subject)
                (EVENTS_APPLIED if applied else EVENTS_SKIPPED).labels(type=kind).inc()
                out.applied += applied
                out.done.append(m)
            out.changed |= changed
            VM_CONTEXTS.inc(new)
        return out


class DurableConsumer:
    def __init__(self, js: JetStreamContext, applier: Applier, lock: asyncio.Lock, *, name: str,
                 ack_wait: float, max_deliver: int, nak_delay: float, batch: int, deliver_policy: str,
                 on_changed: Callable[[set[str]], Awaitable[None]], log: logging.Logger):
        self.js, self.applier, self.lock, self.name = js, applier, lock, name
        self.ack_wait, self.max_deliver, self.nak_delay, self.batch = ack_wait, max_deliver, nak_delay, batch
        self.deliver_policy = DeliverPolicy(deliver_policy)
        self.on_changed, self.log = on_changed, log
        self._stop = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._sub: Any = None

    async def start(self, position: int) -> None:
        """Bind to the durable consumer, first recreating it when the database is behind it."""
        try:
            info = await self.js.consumer_info(EVENTS_STREAM, self.name)
        except NotFoundError:
            info = None
        if info is not None and info.ack_floor.stream_seq > position:
            # A fresh (memory) database under an old consumer: replay what the database lacks.
            self.log.warning("read model behind its consumer: replaying", extra={
                "consumer": self.name, "ack_floor": info.ack_floor.stream_seq, "position": position})
            await self.js.delete_consumer(EVENTS_STREAM, self.name)
            info = None
        cfg = ConsumerConfig(name=self.name, durable_name=self.name, filter_subjects=FILTERS,
                             ack_policy=AckPolicy.EXPLICIT, ack_wait=self.ack_wait, max_deliver=self.max_deliver,
                             max_ack_pending=1000)
        if info is not None:  # keep its starting point; update what may change
            cfg.deliver_policy, cfg.opt_start_seq = info.config.deliver_policy, info.config.opt_start_seq
        elif position:
            cfg.deliver_policy, cfg.opt_start_seq = DeliverPolicy.BY_START_SEQUENCE, position + 1
        else:
            cfg.deliver_policy = self.deliver_policy
        await self.js.add_consumer(EVENTS_STREAM, cfg)
        self._sub = await self.js.pull_subscribe_bind(durable=self.name, stream=EVENTS_STREAM)
        self._task = asyncio.create_task(self._run(), name=f"{self.name}-loop")

    async def stop(self) -> None:
        """Finish the batch in hand (a fetch ends within a second), then unsubscribe."""
        self._stop.set()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
        if self._sub is not None:
            await self._sub.unsubscribe()

    async def _run(self) -> None:
        while not self._stop.is_set():
            try:
                async with self.lock:  # REBUILD waits for the batch in hand
                    changed = await self._step()
                if changed:
                    await self.on_changed(changed)
            except Exception:  # noqa: BLE001 - keep consuming; the messages come back after ack_wait
                self.log.exception("event loop error")
                await asyncio.sleep(1)

    async def _step(self) -> set[str]:
        try:
            msgs = await self._sub.fetch(self.batch, timeout=1.0)
        except TimeoutError:
            return set()
        out = await self.applier.apply(msgs)
        for m in out.done:
            await m.ack()
        for m, reason in out.failed:
            await self._failed(m, reason)
        return out.changed

    async def _failed(self, msg: Msg, reason: str) -> None:
        EVENTS_FAILED.inc()
        meta = msg.metadata
        where = {"subject": msg.subject, "stream_seq": meta.sequence.stream, "deliveries": meta.num_delivered,
                 "reason": reason}
        if meta.num_delivered >= self.max_deliver:
            EVENTS_DEAD.inc()
            self.log.error("event dead-lettered", extra=where)
            await msg.term()
            async with self.applier.sessions.begin() as db:
                await service.record_position(db, meta.sequence.stream)
        else:
            self.log.warning("event not applied, will be redelivered", extra=where)
            await msg.nak(delay=self.nak_delay)


async def replay(js: JetStreamContext, applier: Applier, batch: int = 500) -> tuple[int, int]:
    """Apply every stored event through a throw-away consumer; (applied, failed)."""
    name = f"context_aggregator-replay-{uuid.uuid4().hex[:8]}"
    info = await js.add_consumer(EVENTS_STREAM, ConsumerConfig(
        name=name, filter_subjects=FILTERS, deliver_policy=DeliverPolicy.ALL, ack_policy=AckPolicy.ALL,
        ack_wait=60, inactive_threshold=60, mem_storage=True, max_ack_pending=batch * 2))
    sub = await js.pull_subscribe_bind(name=name, stream=EVENTS_STREAM)
    applied = failed = 0
    pending = info.num_pending
    try:
        while pending > 0:
            try:
                msgs = await sub.fetch(batch, timeout=5.0)
            except TimeoutError:
                break
            out = await applier.apply(msgs)
            applied += out.applied
            failed += len(out.failed)
            EVENTS_FAILED.inc(len(out.failed))
            await msgs[-1].ack()  # AckAll: one ack per batch
            pending = msgs[-1].metadata.num_pending
    finally:
        await sub.unsubscribe()
        try:
            await js.delete_consumer(EVENTS_STREAM, name)
        except Exception:  # noqa: BLE001 - it expires on its own (inactive_threshold)
            pass
    return applied, failed
