"""Export manager logic: one NBD export per (VM, disk unit), reused across jobs.

The mapping row is written before the exporter acts (a crash in between is repaired by
`reconcile`), and a failed exporter call puts the row back as it was. Ensures of one disk are
serialized in-process by a lock per (vm_id, unit); across processes the table's unique keys
decide, and the loser reads the winner's row back. Concurrent ensures of different disks reach
the exporter together (`BatchGate`), so nbd-server applies a whole burst in one reload.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily
from pydantic import BaseModel, ConfigDict, Field, model_validator
from sqlalchemy import delete, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from oma.services.export_manager.models import ACTIVE, INACTIVE, VmExportMapping
from oma.shared import errors
from oma.shared.contracts import validate_device_path
from oma.shared.db import iso
from oma.shared.disk_slot import SlotNumber
from oma.shared.locks import KeyedLocks
from oma.shared.schemas import VM_KEY_MAX, VM_KEY_PATTERN

EXPORT_PREFIX = "migration-vm-"
EXPORT_NAME_RE = re.compile(r"migration-vm-(?P<vm_id>.+)-disk(?P<unit>\d+)")
OUTCOMES = ("created", "reused", "repointed", "reactivated", "failed")

EXPORTS_ACTIVE = Gauge("oma_exports_active", "Export mappings with status active")
ENSURES = Counter("oma_export_ensures_total", "Export ensure requests by outcome", ["outcome"])
for _outcome in OUTCOMES:
    ENSURES.labels(outcome=_outcome)
RELOAD_DURATION = Histogram("oma_nbd_reload_duration_seconds",
                            "NBD server reloads, until the server accepted connections again", ["backend"],
                            buckets=(.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30))
MISSING_DEVICE = Gauge("oma_exports_missing_device", "Active mappings whose device is absent (last reconcile)")

_EXPORTERS: weakref.WeakSet[Any] = weakref.WeakSet()


class _ExporterCounters:
    """oma_nbd_server_{reloads,restarts}_total, read from the live exporters' own counters."""

    def collect(self):
        reloads = CounterMetricFamily("oma_nbd_server_reloads", "NBD server configuration reloads",
                                      labels=["backend"])
        restarts = CounterMetricFamily("oma_nbd_server_restarts", "NBD server restarts by the watchdog",
                                       labels=["backend"])
        totals: dict[str, list[int]] = {}
        for exp in list(_EXPORTERS):
            t = totals.setdefault(exp.name, [0, 0])
            t[0] += exp.reloads
            t[1] += exp.restarts
        for backend, (r, s) in sorted(totals.items()):
            reloads.add_metric([backend], r)
            restarts.add_metric([backend], s)
        yield reloads
        yield restarts


REGISTRY.register(_ExporterCounters())


# ----- wire models

class EnsureRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    vm_id: str = Field(min_length=1, max_length=VM_KEY_MAX, pattern=VM_KEY_PATTERN)  # safe in an export name
    disk_unit_number: SlotNumber
    vm_name: str = Field(min_length=1, max_length=255)
    device_path: str = Field(min_length=2, max_length=255, pattern=r"^/[^\n]*$")


class Selector(BaseModel):
    """One mapping, by export name or by (vm_id, disk_unit_number)."""
    model_config = ConfigDict(extra="ignore")
    export_name: str | None = Field(None, min_length=1, max_length=255)
    vm_id: str | None = Field(None, min_length=1, max_length=36)
    disk_unit_number: SlotNumber | None = None
    check: bool = False

    @model_validator(mode="after")
    def _one_way(self) -> Selector:
        if self.export_name is None and (self.vm_id is None or self.disk_unit_number is None):
            raise ValueError("give export_name, or vm_id and disk_unit_number")
        return self


class ListRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    vm_id: str | None = Field(None, max_length=36)
    status: Literal["active", "inactive"] | None = None


def export_name_for(vm_id: str, unit: int) -> str:
    return f"{EXPORT_PREFIX}{vm_id}-disk{unit}"


# ----- concurrency helpers

class BatchGate:
    """Lets concurrent exporter changes start together. An ensure is `busy` while it writes its
    mapping; its exporter call then waits until no ensure is busy (at most `max_wait`), so every
    change of a burst lands in the exporter's debounce window and costs one reload."""

    def __init__(self, max_wait: float = 0.5):
        self.max_wait = max_wait
        self.busy = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @contextlib.asynccontextmanager
    async def busy_stage(self) -> AsyncIterator[None]:
        self.busy += 1
        self._idle.clear()
        try:
            yield
        finally:
            self.busy -= 1
            if self.busy == 0:
                self._idle.set()

    async def wait_idle(self) -> None:
        try:
            await asyncio.wait_for(self._idle.wait(), self.max_wait)
        except TimeoutError:
            pass                                 # a steady stream of ensures: go anyway


# ----- repository

async def get_by_key(db: AsyncSession, vm_id: str, unit: int) -> VmExportMapping | None:
    return await db.scalar(select(VmExportMapping).where(VmExportMapping.vm_id == vm_id,
                                                         VmExportMapping.disk_unit_number == unit))


async def get_by_name(db: AsyncSession, export_name: str) -> VmExportMapping | None:
    return await db.scalar(select(VmExportMapping).where(VmExportMapping.export_name == export_name))


async def find(db: AsyncSession, sel: Selector) -> VmExportMapping:
    if sel.export_name is not None:
        row = await get_by_name(db, sel.export_name)
        what = f"export {sel.export_name}"
    else:
        row = await get_by_key(db, sel.vm_id, sel.disk_unit_number)  # type: ignore[arg-type]
        what = f"VM {sel.vm_id} disk {sel.disk_unit_number}"
    if row is None:
        raise errors.NotFound("Export not found", f"No export mapping for {what}")
    return row


async def count_active(db: AsyncSession) -> int:
    return int(await db.scalar(select(func.count()).select_from(VmExportMapping)
                               .where(VmExportMapping.status == ACTIVE)) or 0)


@dataclass(frozen=True)
class Snapshot:
    """A row's values, safe to use after its session closed."""
    id: int
    vm_id: str
    disk_unit_number: int
    vm_name: str
    export_name: str
    device_path: str
    status: str
    created_at: Any
    updated_at: Any

    @classmethod
    def of(cls, row: VmExportMapping) -> Snapshot:
        return cls(row.id, row.vm_id, row.disk_unit_number, row.vm_name, row.export_name, row.device_path,
                   row.status or ACTIVE, row.created_at, row.updated_at)

    @property
    def key(self) -> tuple[str, int]:
        return (self.vm_id, self.disk_unit_number)


# ----- the logic

Publisher = Callable[[str, Snapshot], Awaitable[None]]


class ExportManager:
    def __init__(self, sessions: async_sessionmaker, exporter: Any, publish: Publisher,
                 log: logging.Logger | None = None, batch_wait: float = 0.5):
        self.sessions = sessions
        self.exporter = exporter
        self.publish = publish
        self.log = log or logging.getLogger("oma.export_manager")
        self.locks = KeyedLocks()
        self.gate = BatchGate(batch_wait)
        self._reconciling = asyncio.Lock()
        self._seen_reloads = exporter.reloads
        self.insert_races = 0                   # inserts lost to another process (unique key)
        _EXPORTERS.add(exporter)

    def close(self) -> None:
        _EXPORTERS.discard(self.exporter)

    def describe(self, m: Snapshot, **extra: Any) -> dict[str, Any]:
        return {"id": m.id, "vm_id": m.vm_id, "disk_unit_number": m.disk_unit_number, "vm_name": m.vm_name,
                "export_name": m.export_name, "device_path": m.device_path, "status": m.status,
                "port": self.exporter.port, "uri": self.exporter.uri(m.export_name, client=True),
                "created_at": iso(m.created_at), "updated_at": iso(m.updated_at), **extra}

    def note_reloads(self) -> None:
        """Observe the reload duration once per reload seen since the last look."""
        if self.exporter.reloads != self._seen_reloads:
            self._seen_reloads = self.exporter.reloads
            RELOAD_DURATION.labels(backend=self.exporter.name).observe(self.exporter.last_reload_seconds)

    async def refresh_active_gauge(self) -> None:
        async with self.sessions() as db:
            EXPORTS_ACTIVE.set(await count_active(db))

    # ----- ensure
    async def ensure(self, req: EnsureRequest) -> dict[str, Any]:
        name = export_name_for(req.vm_id, req.disk_unit_number)
        try:
            device = validate_device_path(req.device_path)
            async with self.locks.hold((req.vm_id, req.disk_unit_number)):
                action, m, old_device, readded = await self._ensure_locked(req, name, device)
        except Exception:
            ENSURES.labels(outcome="failed").inc()
            raise
        finally:
            self.note_reloads()
        ENSURES.labels(outcome=action).inc()
        if action != "reused":  # together: one wait less before the caller's reply
            await asyncio.gather(self.refresh_active_gauge(), self.publish(action, m))
        messages = {
            "created": "NBD export created",
            "reused": "Existing NBD export reused (no server reload)" if not readded else
                      "Existing mapping reused; the export was missing on the server and was added again",
            "repointed": f"NBD export re-pointed from {old_device} to {device}",
            "reactivated": "Inactive NBD export reactivated",
        }
        self.log.info("export ensured", extra={"export_name": name, "action": action, "device_path": device})
        return {"export_name": name, "device_path": device, "port": self.exporter.port,
                "uri": self.exporter.uri(name, client=True), "reused": action == "reused", "vm_id": req.vm_id, "disk_unit_number": req.disk_unit_number,
                "action": action, "message": messages[action]}

    async def _ensure_locked(self, req: EnsureRequest, name: str, device: str):
        async with self.gate.busy_stage():
            action, m, before = await self._claim(req, name, device)
        if action == "reused":
            # A no-op for a served export; adds one deleted behind our back.
            readded = await self.exporter.add_export(name, device)
            return action, m, device, readded
        await self.gate.wait_idle()
        try:
            await self.exporter.add_export(name, device)
        except BaseException:
            await self._undo(m, before)
            raise
        return action, m, (before.device_path if before else None), False

    async def _claim(self, req: EnsureRequest, name: str, device: str):
        """Record the mapping as it must be; returns (action, new state, previous state)."""
        for attempt in range(2):
            try:
                async with self.sessions.begin() as db:
                    row = await get_by_key(db, req.vm_id, req.disk_unit_number)
                    if row is None:
                        row = VmExportMapping(vm_id=req.vm_id, disk_unit_number=req.disk_unit_number,
                                              vm_name=req.vm_name, export_name=name, device_path=device,
                                              status=ACTIVE)
                        db.add(row)
                        await db.flush()  # the id and the ORM's defaults are on the row now: no refresh
                        return "created", Snapshot.of(row), None
                    before = Snapshot.of(row)
                    if row.status != ACTIVE:
                        action = "reactivated"
                    elif row.device_path != device:
                        action = "repointed"
                    else:
                        action = "reused"
                    if action != "reused" or row.vm_name != req.vm_name:
                        row.status, row.device_path, row.vm_name = ACTIVE, device, req.vm_name
                        await db.flush()
                    return action, Snapshot.of(row), before
            except IntegrityError as exc:
                # Another process inserted this disk's mapping first: read it back and reuse it.
                self.insert_races += 1
                if attempt:
                    raise errors.Conflict("Export name in use",
                                          f"{name} is mapped to another disk: {exc.orig}") from None
        raise AssertionError("unreachable")

    async def _undo(self, m: Snapshot, before: Snapshot | None) -> None:
        """Put the mapping back as it was before a failed exporter call."""
        try:
            async with self.sessions.begin() as db:
                if before is None:
                    await db.execute(delete(VmExportMapping).where(VmExportMapping.id == m.id))
                else:
                    row = await db.get(VmExportMapping, m.id)
                    if row is not None:
                        row.status, row.device_path, row.vm_name = before.status, before.device_path, before.vm_name
        except Exception:
            self.log.exception("could not restore mapping after a failed export", extra={"export_name": m.export_name})

    # ----- read
    async def list(self, req: ListRequest) -> dict[str, Any]:
        q = select(VmExportMapping).order_by(VmExportMapping.vm_id, VmExportMapping.disk_unit_number)
        if req.vm_id is not None:
            q = q.where(VmExportMapping.vm_id == req.vm_id)
        if req.status is not None:
            q = q.where(VmExportMapping.status == req.status)
        async with self.sessions() as db:
            rows = [Snapshot.of(r) for r in (await db.scalars(q)).all()]
        return {"success": True, "count": len(rows), "exports": [self.describe(m) for m in rows]}

    async def get(self, sel: Selector) -> dict[str, Any]:
        async with self.sessions() as db:
            m = Snapshot.of(await find(db, sel))
        out = self.describe(m, served=m.export_name in self.exporter.list_exports())
        if sel.check:
            # Only a real NBD_OPT_GO proves the export opens; a listing does not.
            try:
                out.update(connectable=True, size=await self.exporter.check_export(m.export_name))
            except errors.OmaError as exc:
                out.update(connectable=False, size=None, check_error=exc.details or exc.error)
        return out

    # ----- deactivate / remove
    @contextlib.asynccontextmanager
    async def _held(self, sel: Selector) -> AsyncIterator[Selector]:
        """Hold the lock of the export `sel` names; yields the selector of its key (the row is
        read again under the lock)."""
        async with self.sessions() as db:
            key = Snapshot.of(await find(db, sel)).key
        async with self.locks.hold(key):
            yield Selector(vm_id=key[0], disk_unit_number=key[1])

    async def deactivate(self, sel: Selector) -> dict[str, Any]:
        async with self._held(sel) as held:
            async with self.sessions.begin() as db:
                row = await find(db, held)
                changed = row.status != INACTIVE
                row.status = INACTIVE
                await db.flush()
                await db.refresh(row)
                m = Snapshot.of(row)
            removed = await self.exporter.remove_export(m.export_name)
            self.note_reloads()
        if changed:
            await self.refresh_active_gauge()
            await self.publish("deactivated", m)
        return {"success": True, **self.describe(m), "removed_from_server": removed,
                "message": "Export deactivated" if changed else "Export was already inactive"}

    async def remove(self, sel: Selector) -> dict[str, Any]:
        async with self._held(sel) as held:
            async with self.sessions.begin() as db:
                row = await find(db, held)
                m = Snapshot.of(row)
                await db.delete(row)
            removed = await self.exporter.remove_export(m.export_name)
            self.note_reloads()
        await self.refresh_active_gauge()
        await self.publish("removed", m)
        return {"success": True, "export_name": m.export_name, "vm_id": m.vm_id,
                "disk_unit_number": m.disk_unit_number, "removed_from_server": removed,
                "message": "Export removed"}

    # ----- reconcile
    async def reconcile(self) -> dict[str, Any]:
        """Make the server serve exactly the active mappings. Active mappings missing on the
        server (or served from another device) are added again; server exports without an active
        mapping are removed; mappings whose device vanished are reported and kept."""
        async with self._reconciling:
            started = time.monotonic()
            async with self.sessions() as db:
                rows = [Snapshot.of(r) for r in (await db.scalars(select(VmExportMapping))).all()]
            served = self.exporter.list_exports()
            active = {m.export_name: m for m in rows if m.status == ACTIVE}
            report: dict[str, list] = {"readded": [], "repointed": [], "removed": [], "missing_devices": [],
                                       "failed": []}

            async def fix(m: Snapshot) -> None:
                async with self.locks.hold(m.key):
                    async with self.gate.busy_stage(), self.sessions() as db:
                        row = await get_by_key(db, *m.key)
                        now = Snapshot.of(row) if row is not None else None
                    if now is None or now.status != ACTIVE:
                        return                  # changed meanwhile; the change handled the server
                    await self.gate.wait_idle()
                    current = self.exporter.list_exports().get(now.export_name)
                    try:
                        if not await self.exporter.add_export(now.export_name, now.device_path):
                            return              # an ensure served it meanwhile
                    except errors.OmaError as exc:
                        report["failed"].append({"export_name": now.export_name, "error": exc.error,
                                                 "details": exc.details})
                        return
                    action = "readded" if current is None else "repointed"
                    report[action].append(now.export_name)
                    await self.publish(action, now)

            async def drop(name: str) -> None:
                parsed = EXPORT_NAME_RE.fullmatch(name)
                key = (parsed["vm_id"], int(parsed["unit"])) if parsed else ("", -1)
                async with self.locks.hold(key):
                    async with self.sessions() as db:
                        row = await get_by_name(db, name)
                    if row is not None and row.status == ACTIVE:
                        return                  # ensured meanwhile
                    try:
                        if await self.exporter.remove_export(name):
                            report["removed"].append(name)
                    except errors.OmaError as exc:
                        report["failed"].append({"export_name": name, "error": exc.error, "details": exc.details})

            todo = []
            for name, m in active.items():
                if not os.path.exists(m.device_path):
                    report["missing_devices"].append({"export_name": name, "vm_id": m.vm_id,
                                                      "disk_unit_number": m.disk_unit_number,
                                                      "device_path": m.device_path})
                    self.log.warning("device of an active export is missing",
                                     extra={"export_name": name, "device_path": m.device_path})
                elif served.get(name) != m.device_path:
                    todo.append(fix(m))
            todo += [drop(name) for name in served if name not in active]
            await asyncio.gather(*todo)
            self.note_reloads()
            MISSING_DEVICE.set(len(report["missing_devices"]))
            EXPORTS_ACTIVE.set(len(active))
            duration = time.monotonic() - started
            if any(report[k] for k in ("readded", "repointed", "removed", "failed")):
                self.log.info("exports reconciled", extra={k: len(v) for k, v in report.items()})
            return {"success": True, "mappings": len(rows), "active": len(active), "served": len(served),
                    **report, "duration_seconds": round(duration, 3)}
