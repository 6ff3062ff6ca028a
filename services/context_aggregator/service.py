"""The read model's logic: applying events idempotently, and the two queries the GUI asks.

Rules (docs/vm-contexts.md):
- a job event is applied only when its `seq` is above the job's `last_seq`: a redelivered, duplicate
  or older event changes nothing;
- a job is counted in `total_jobs_run` when first seen, in `successful_jobs`/`failed_jobs` when it
  reaches completed/failed (moved, never counted twice, if a later event changes the outcome);
- the VM's status, metadata and disks follow its latest job (greatest `created_at`, then `job_id`);
- inventory events are applied when newer than the last one applied, and set the status only of
  VMs that have no job yet.
"""
from __future__ import annotations

import math
import time
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, delete, func, inspect, select
from sqlalchemy.ext.asyncio import AsyncSession

from oma.services.context_aggregator.events import FailoverEvent, InventoryEvent, JobEvent, Malformed
from oma.services.context_aggregator.models import (
    CbtRecord,
    ContextDisk,
    ContextJob,
    ReadModelState,
    VmContext,
)
from oma.shared import errors
from oma.shared.db import iso
from oma.shared.schemas import COMPLETED, FAILED

HISTORY_JOBS = 10
HISTORY_CBT = 20
OUTCOMES = {COMPLETED: "successful_jobs", FAILED: "failed_jobs"}
SCHEDULE_FIELDS = ("schedule_execution_id", "vm_group_id", "scheduled_by", "existing_context_id")


def context_id(vm_name: str, first_event_at: datetime) -> str:
    return f"ctx-{vm_name}-{first_event_at:%Y%m%d-%H%M%S}"


class Batch:
    """The rows one transaction touches, loaded up front with a few IN queries, so a batch of
    events costs a handful of round trips and events of one job in one batch see each other."""

    def __init__(self, db: AsyncSession):
        self.db = db
        self.contexts: dict[str, VmContext] = {}
        self.jobs: dict[str, ContextJob] = {}
        self.disks: dict[tuple[str, int], ContextDisk] = {}
        self.cbt: set[tuple[str, int]] = set()
        self.changed: set[str] = set()  # VM names whose context changed
        self.new_contexts = 0

    async def preload(self, events: list[JobEvent | InventoryEvent]) -> None:
        names = {e.vm.name for e in events}
        job_ids = {e.job_id for e in events if isinstance(e, JobEvent)}
        db = self.db
        if names:
            for c in await db.scalars(select(VmContext).where(VmContext.vm_name.in_(names))):
                self.contexts[c.vm_name] = c
            job_ids |= {c.current_job_id for c in self.contexts.values() if c.current_job_id}
            for d in await db.scalars(select(ContextDisk).where(ContextDisk.vm_name.in_(names))):
                self.disks[(d.vm_name, d.unit_number)] = d
        if job_ids:
            for j in await db.scalars(select(ContextJob).where(ContextJob.job_id.in_(job_ids))):
                self.jobs[j.job_id] = j
            done = {e.job_id for e in events if isinstance(e, JobEvent) and e.status == COMPLETED}
            if done:
                rows = await db.execute(select(CbtRecord.job_id, CbtRecord.unit_number)
                                        .where(CbtRecord.job_id.in_(done)))
                self.cbt = {(r[0], r[1]) for r in rows}

    def context(self, vm_name: str, at: datetime, status: str) -> VmContext:
        ctx = self.contexts.get(vm_name)
        if ctx is None:
            ctx = VmContext(context_id=context_id(vm_name, at), vm_name=vm_name, current_status=status,
                            total_jobs_run=0, successful_jobs=0, failed_jobs=0, created_at=at, updated_at=at)
            self.db.add(ctx)
            self.contexts[vm_name] = ctx
            self.new_contexts += 1
        return ctx

    def touch(self, ctx: VmContext, at: datetime, *, job: bool = False) -> None:
        ctx.updated_at = at
        if job and (ctx.last_job_at is None or at > ctx.last_job_at):
            ctx.last_job_at = at
        self.changed.add(ctx.vm_name)

    def set_disk(self, vm_name: str, unit: int, **values: Any) -> None:
        row = self.disks.get((vm_name, unit))
        if row is None:
            row = ContextDisk(vm_name=vm_name, unit_number=unit)
            self.db.add(row)
            self.disks[(vm_name, unit)] = row
        for key, value in values.items():
            setattr(row, key, value)

    async def drop_other_disks(self, vm_name: str, keep: set[int]) -> None:
        for (name, unit), row in list(self.disks.items()):
            if name == vm_name and unit not in keep:
                if inspect(row).pending:  # added earlier in this batch
                    self.db.expunge(row)
                else:
                    await self.db.delete(row)
                del self.disks[(name, unit)]


def _set_vm(ctx: VmContext, vm: Any, vcenter_host: str | None) -> None:
    """The events' VM fields (source_vm's names) under the original's names. Guest OS and power state
    come from inventory events only: a job's VM lacks them and leaves them as they are."""
    ctx.vmware_vm_id, ctx.vm_uuid, ctx.path = vm.id, vm.uuid or ctx.vm_uuid, vm.path
    ctx.datacenter, ctx.cpu_count, ctx.memory_mb = vm.datacenter, vm.cpus, vm.memory_mb
    ctx.vcenter_host = vcenter_host or ctx.vcenter_host
    ctx.os_type = vm.guest_os or ctx.os_type
    ctx.power_state = vm.power_state or ctx.power_state


async def apply_job(b: Batch, ev: JobEvent) -> bool:
    """Apply one replication event; False when it is a duplicate or older than what we hold."""
    at, name = ev.occurred_at, ev.vm.name
    job = b.jobs.get(ev.job_id)
    if job is not None and ev.seq <= job.last_seq:
        return False
    if job is not None and job.vm_name != name:
        raise Malformed(f"job {ev.job_id} belongs to VM {job.vm_name}, the event names {name}")
    ctx = b.context(name, at, ev.status)
    if job is None:
        job = ContextJob(job_id=ev.job_id, vm_name=name, created_at=ev.created_at or at, last_seq=0)
        b.db.add(job)
        b.jobs[ev.job_id] = job
        ctx.total_jobs_run += 1
    job.status, job.replication_type = ev.status, ev.replication_type
    job.progress_percent, job.current_operation = ev.progress_percent, ev.current_operation
    job.vma_throughput_mbps, job.vma_eta_seconds = ev.vma_throughput_mbps, ev.vma_eta_seconds
    job.bytes_transferred, job.total_bytes, job.error = ev.bytes_transferred, ev.total_bytes, ev.error
    job.started_at, job.completed_at = ev.started_at, ev.completed_at
    for field in (*SCHEDULE_FIELDS, "vma_sync_type"):
        setattr(job, field, getattr(ev, field))
    if ev.created_at is not None:
        job.created_at = ev.created_at
    job.updated_at, job.last_seq = at, ev.seq

    # Each job sits in at most one outcome counter.
    if ev.status in OUTCOMES and job.counted_outcome != ev.status:
        if job.counted_outcome in OUTCOMES:
            attr = OUTCOMES[job.counted_outcome]
            setattr(ctx, attr, getattr(ctx, attr) - 1)
        setattr(ctx, OUTCOMES[ev.status], getattr(ctx, OUTCOMES[ev.status]) + 1)
        job.counted_outcome = ev.status

    if ev.status == COMPLETED:
        for d in ev.disks:
            if d.change_id and (ev.job_id, d.unit_number) not in b.cbt:
                b.db.add(CbtRecord(vm_name=name, job_id=ev.job_id, unit_number=d.unit_number,
                                   change_id=d.change_id, previous_change_id=d.previous_change_id,
                                   recorded_at=at))
                b.cbt.add((ev.job_id, d.unit_number))

    current = b.jobs.get(ctx.current_job_id) if ctx.current_job_id else None
    if current is None or current is job or (job.created_at, job.job_id) >= (current.created_at, current.job_id):
        ctx.current_job_id, ctx.current_status = job.job_id, job.status
        _set_vm(ctx, ev.vm, ev.vcenter_host)
        if ev.disks:
            for d in ev.disks:
                values = dict(disk_id=d.disk_id or d.id, path=d.path, size_gb=d.size_gb,
                              capacity_bytes=d.capacity_bytes, datastore=d.datastore, volume_id=d.volume_id,
                              device_path=d.device_path, export_name=d.export_name)
                if ev.status == COMPLETED and d.change_id:
                    values["change_id"] = d.change_id
                b.set_disk(name, d.unit_number, **values)
            await b.drop_other_disks(name, {d.unit_number for d in ev.disks})
    b.touch(ctx, at, job=True)
    return True


async def apply_inventory(b: Batch, ev: InventoryEvent) -> bool:
    """A discovered VM: metadata always (when newer); status and disks only while it has no job."""
    at, name = ev.occurred_at, ev.vm.name
    ctx = b.contexts.get(name)
    if ctx is None and ev.change == "gone":
        return False
    if ctx is not None and ctx.inventory_at is not None and at <= ctx.inventory_at:
        return False
    status = "gone" if ev.change == "gone" else "discovered"
    ctx = b.context(name, at, status)
    ctx.inventory_at = at
    _set_vm(ctx, ev.vm, ev.vcenter)
    if ctx.current_job_id is None:
        ctx.current_status = status
        units = set()
        for i, d in enumerate(ev.disks):
            unit = d.slot(i)
            units.add(unit)
            b.set_disk(name, unit, disk_id=d.disk_id or d.id, path=d.path, size_gb=d.size_gb,
                       capacity_bytes=d.capacity_bytes, datastore=d.datastore)
        await b.drop_other_disks(name, units)
    b.touch(ctx, at)
    return True


async def apply_failover(b: Batch, ev: FailoverEvent) -> bool:
    """A failover moves the VM's status (failing_over, failed_over_test, ...) when it is the newest news."""
    ctx = b.contexts.get(ev.vm_name)
    if ev.context_status is None or (ctx is not None and ev.occurred_at < ctx.updated_at):
        return False
    ctx = b.context(ev.vm_name, ev.occurred_at, ev.context_status)
    ctx.current_status = ev.context_status
    b.touch(ctx, ev.occurred_at)
    return True


async def apply(b: Batch, ev: JobEvent | InventoryEvent | FailoverEvent) -> bool:
    if isinstance(ev, FailoverEvent):
        return await apply_failover(b, ev)
    return await (apply_job(b, ev) if isinstance(ev, JobEvent) else apply_inventory(b, ev))


async def record_position(db: AsyncSession, stream_seq: int) -> None:
    row = await db.get(ReadModelState, 1)
    if row is None:
        db.add(ReadModelState(id=1, last_stream_seq=stream_seq))
    elif stream_seq > row.last_stream_seq:
        row.last_stream_seq = stream_seq


async def position(db: AsyncSession) -> int:
    row = await db.get(ReadModelState, 1)
    return row.last_stream_seq if row else 0


async def wipe(db: AsyncSession) -> None:
    for model in (CbtRecord, ContextDisk, ContextJob, VmContext, ReadModelState):
        await db.execute(delete(model))


async def count(db: AsyncSession) -> int:
    return await db.scalar(select(func.count()).select_from(VmContext)) or 0


# --- queries ---------------------------------------------------------------------------------
def context_dict(c: Any) -> dict[str, Any]:
    """From a VmContext or a row of its table."""
    return {"context_id": c.context_id, "vm_name": c.vm_name, "current_status": c.current_status,
            "total_jobs_run": c.total_jobs_run, "successful_jobs": c.successful_jobs,
            "failed_jobs": c.failed_jobs, "current_job_id": c.current_job_id, "vmware_vm_id": c.vmware_vm_id,
            "vm_uuid": c.vm_uuid, "vcenter_host": c.vcenter_host, "vm_path": c.path, "datacenter": c.datacenter,
            "cpu_count": c.cpu_count, "memory_mb": c.memory_mb, "os_type": c.os_type, "power_state": c.power_state,
            "last_job_at": iso(c.last_job_at), "created_at": iso(c.created_at), "updated_at": iso(c.updated_at)}


def dirty_rate(j: Any, disk_bytes: int | None) -> float | None:
    """The share of the VM's disks a completed CBT delta copied (bytes_transferred / disk size)."""
    if j.status != "completed" or j.vma_sync_type != "incremental" or not disk_bytes or j.bytes_transferred is None:
        return None
    return round(j.bytes_transferred / disk_bytes, 6)


def cycles(jobs: list[Any], disk_bytes: int | None, synced: int) -> dict[str, Any]:
    """The warm-migration figures of the last completed incremental (jobs newest first): changed bytes
    and dirty rate, change per second since the sync before it started, and its duration, which
    estimates the cutover's final sync."""
    done = [j for j in jobs if j.status == "completed" and j.started_at and j.completed_at]
    last = next((j for j in done if j.vma_sync_type == "incremental"), None)
    out = {"sync_count": synced, "last_changed_bytes": None, "dirty_rate": None,
           "dirty_bytes_per_second": None, "estimated_cutover_seconds": None}
    if last is None:
        return out
    before = next((j for j in done if j.started_at < last.started_at), None)
    span = (last.started_at - before.started_at).total_seconds() if before else 0
    out.update(last_changed_bytes=last.bytes_transferred, dirty_rate=dirty_rate(last, disk_bytes),
               dirty_bytes_per_second=round(last.bytes_transferred / span, 1) if span > 0 else None,
               estimated_cutover_seconds=round((last.completed_at - last.started_at).total_seconds(), 3))
    return out


def job_dict(j: ContextJob, disk_bytes: int | None = None) -> dict[str, Any]:
    return {"id": j.job_id, "dirty_rate": dirty_rate(j, disk_bytes), "status": j.status,
            "replication_type": j.replication_type,
            "progress_percent": j.progress_percent, "current_operation": j.current_operation,
            "vma_throughput_mbps": j.vma_throughput_mbps, "vma_eta_seconds": j.vma_eta_seconds,
            "bytes_transferred": j.bytes_transferred, "total_bytes": j.total_bytes, "error": j.error,
            "vma_sync_type": j.vma_sync_type, **{f: getattr(j, f) for f in SCHEDULE_FIELDS},
            "created_at": iso(j.created_at), "started_at": iso(j.started_at),
            "completed_at": iso(j.completed_at), "updated_at": iso(j.updated_at)}


def disk_dict(d: ContextDisk) -> dict[str, Any]:
    size_gb = math.ceil(d.size_gb) if d.size_gb is not None else None  # whole GiB, as the job shows it
    return {"unit_number": d.unit_number, "disk_id": d.disk_id, "path": d.path, "size_gb": size_gb,
            "capacity_bytes": d.capacity_bytes, "datastore": d.datastore, "volume_id": d.volume_id,
            "device_path": d.device_path, "export_name": d.export_name, "change_id": d.change_id}


class Totals:
    """`total` of the list per status filter, cached for a moment: dashboards poll the list and
    COUNT(*) walks an index of every VM. Dropped after each batch this instance applies."""

    def __init__(self, ttl: float = 2.0):
        self.ttl = ttl
        self._cache: dict[str | None, tuple[float, int]] = {}

    async def get(self, db: Any, status: str | None) -> int:
        hit = self._cache.get(status)
        if hit and hit[0] > time.monotonic():
            return hit[1]
        where = [VmContext.current_status == status] if status else []
        total = await db.scalar(select(func.count()).select_from(VmContext).where(*where)) or 0
        if len(self._cache) > 100:  # status is free text: bound the cache
            self._cache.clear()
        self._cache[status] = (time.monotonic() + self.ttl, total)
        return total

    def clear(self) -> None:
        self._cache.clear()


# The queries read plain rows (Core): no ORM objects on the hot read path. `db` is a connection
# of the aggregator's read engine (shared/db.py read_engine).
async def list_contexts(db: Any, status: str | None, limit: int, offset: int,
                        totals: Totals | None = None) -> dict[str, Any]:
    where = [VmContext.current_status == status] if status else []
    total = await (totals or Totals(0)).get(db, status)
    # Deferred join: the offset is walked in the (status,) vm_name index alone, then only the
    # page's rows are read.
    page = (select(VmContext.id).where(*where).order_by(VmContext.vm_name)
            .limit(limit).offset(offset).subquery())
    rows = await db.execute(
        select(VmContext.__table__, ContextJob.current_operation, ContextJob.progress_percent)
        .join(page, page.c.id == VmContext.id)
        .outerjoin(ContextJob, ContextJob.job_id == VmContext.current_job_id)
        .order_by(VmContext.vm_name))
    contexts = [{**context_dict(r), "current_operation": r.current_operation, "progress_percent": r.progress_percent}
                for r in rows]
    return {"success": True, "vm_contexts": contexts, "total": total, "limit": limit, "offset": offset}


# Built once: constructing a select() costs more than running it from SQLAlchemy's cache.
_contexts, _jobs, _disks, _cbt = (m.__table__ for m in (VmContext, ContextJob, ContextDisk, CbtRecord))
_NAME = bindparam("vm_name")
CONTEXT_BY_NAME = select(_contexts).where(_contexts.c.vm_name == _NAME)
JOB_HISTORY = (select(_jobs).where(_jobs.c.vm_name == _NAME)
               .order_by(_jobs.c.created_at.desc(), _jobs.c.job_id.desc()).limit(HISTORY_JOBS))
JOB_BY_ID = select(_jobs).where(_jobs.c.job_id == bindparam("job_id"))
DISKS = select(_disks).where(_disks.c.vm_name == _NAME).order_by(_disks.c.unit_number)
CBT_HISTORY = (select(_cbt.c.job_id, _cbt.c.unit_number, _cbt.c.change_id, _cbt.c.previous_change_id,
                      _cbt.c.recorded_at)
               .where(_cbt.c.vm_name == _NAME)
               .order_by(_cbt.c.recorded_at.desc(), _cbt.c.job_id.desc(), _cbt.c.unit_number).limit(HISTORY_CBT))


async def get_context(db: Any, vm_name: str) -> dict[str, Any]:
    name = {"vm_name": vm_name}
    ctx = (await db.execute(CONTEXT_BY_NAME, name)).first()
    if ctx is None:
        raise errors.NotFound("VM context not found", f"No VM context for VM {vm_name!r}")
    jobs = (await db.execute(JOB_HISTORY, name)).all()
    current = next((j for j in jobs if j.job_id == ctx.current_job_id), None)
    if current is None and ctx.current_job_id:
        current = (await db.execute(JOB_BY_ID, {"job_id": ctx.current_job_id})).first()
    disks = (await db.execute(DISKS, name)).all()
    cbt = await db.execute(CBT_HISTORY, name)
    disk_bytes = sum(d.capacity_bytes or int((d.size_gb or 0) * 2**30) for d in disks) or None
    history = [job_dict(j, disk_bytes) for j in jobs]
    current_dict = next((d for j, d in zip(jobs, history) if j is current), None)  # built once
    # The warm-migration figures go inside `context`: the detail's top level keeps the seed's keys.
    return {"context": {**context_dict(ctx), "cycles": cycles(jobs, disk_bytes, ctx.successful_jobs)},
            "current_job": current_dict or (job_dict(current, disk_bytes) if current else None),
            "job_history": history,
            "disks": [disk_dict(d) for d in disks],
            "cbt_history": [{"job_id": r.job_id, "unit_number": r.unit_number, "change_id": r.change_id,
                             "previous_change_id": r.previous_change_id, "recorded_at": iso(r.recorded_at)}
                            for r in cbt]}
