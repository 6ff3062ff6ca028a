"""Admission: which queued jobs may provision now, decided in the database.

Every decision runs in one transaction that first locks the appliance VM's `appliance_slots` row
(SELECT ... FOR UPDATE), so replication processes sharing a database take turns: the disks admitted
to one appliance VM never exceed its capacity, however many processes run. (SQLite ignores FOR UPDATE;
it is single-process, and the caller's in-process lock serialises it on the same code path.)

Capacity = `max_attached_disks`, lowered to what the cloud showed it allows (`learn`): a refusal
"maximum number of data disks (N) attached" gives N minus the VM's disks that are not OMA's; a refusal
without a number (device ids or PCI slots used up) gives the OMA disks attached at that moment.
"""
from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

from prometheus_client import Counter, Gauge
from sqlalchemy import func, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from oma.services.replication import original
from oma.services.replication.models import (
    D_PENDING,
    PROVISIONING,
    QUEUED,
    ApplianceSlots,
    JobVolume,
    ReplicationJob,
)
from oma.services.replication.naming import volume_name
from oma.shared.db import utcnow

log = logging.getLogger("oma.replication.admission")

CAPACITY = Gauge("oma_appliance_disk_capacity", "Data disks replication may hold on an appliance VM "
                 "(max_attached_disks, or less when the cloud refused more)", ["oma_vm_id"])
REFUSALS = Counter("oma_appliance_capacity_refusals_total", "Attaches the cloud refused for want of a "
                   "disk slot on the appliance VM (the job was queued again)", ["oma_vm_id"])


def on_appliance(oma_vm_id: str) -> Any:
    """Jobs of this appliance VM (rows from before the column existed count for every VM)."""
    return or_(ReplicationJob.oma_vm_id == oma_vm_id, ReplicationJob.oma_vm_id.is_(None))


async def ensure_row(sessions: Any, oma_vm_id: str) -> None:
    """The appliance VM's slot row, created once in a transaction of its own: two processes that
    both find it missing must not both wait on the gap inside the admission transaction."""
    async with sessions() as db:
        if await db.get(ApplianceSlots, oma_vm_id) is not None:
            return
        db.add(ApplianceSlots(oma_vm_id=oma_vm_id))
        try:
            await db.commit()
        except IntegrityError:  # another process made it first
            await db.rollback()


async def lock(db: AsyncSession, oma_vm_id: str) -> ApplianceSlots:
    """Lock the VM's slot row until the transaction ends (`ensure_row` first)."""
    return (await db.scalars(select(ApplianceSlots).where(ApplianceSlots.oma_vm_id == oma_vm_id)
                             .with_for_update().execution_options(populate_existing=True))).one()


def capacity(settings: Any, slots: ApplianceSlots | None) -> int:
    learned = slots.learned_capacity if slots is not None else None
    return settings.max_attached_disks if learned is None else min(settings.max_attached_disks, learned)


async def holdings(db: AsyncSession, vm_key: str) -> list[JobVolume]:
    """The source VM's live volumes (the rows that hold them). Whatever the holding row's state: a
    failed or cancelled incremental job keeps the volumes it took over, and the next job takes them
    back instead of stranding them on the appliance VM."""
    q = (select(JobVolume).join(ReplicationJob, ReplicationJob.job_id == JobVolume.job_id)
         .where(ReplicationJob.vm_key == vm_key, JobVolume.holds_volume.is_(True),
                JobVolume.volume_id.is_not(None)))
    return list((await db.scalars(q)).all())


def pair(rows: list[JobVolume], held: list[JobVolume]) -> dict[int, JobVolume]:
    """Each new row's live volume, by unit number: the same vSphere disk (disk_id) first, else the
    same slot number. Disk ids outlive numbering changes (jobs from before shared/disk_slot.py
    numbered SATA and second-controller disks differently), so a volume is never stranded."""
    out: dict[int, JobVolume] = {r.unit_number: r for r in rows if r in held}  # holds already
    free = [h for h in held if h not in rows]
    for key in ("disk_id", "unit_number"):
        for r in rows:
            if r.unit_number in out or getattr(r, key) is None:
                continue
            old = next((h for h in free if getattr(h, key) == getattr(r, key)), None)
            if old is not None:
                out[r.unit_number] = old
                free.remove(old)
    return out


async def used(db: AsyncSession, oma_vm_id: str) -> int:
    """Disks the appliance VM holds for replication, or is about to (rows holding a volume)."""
    return await db.scalar(select(func.count()).select_from(JobVolume)
                           .join(ReplicationJob, ReplicationJob.job_id == JobVolume.job_id)
                           .where(JobVolume.holds_volume.is_(True), on_appliance(oma_vm_id))) or 0


async def try_admit(db: AsyncSession, job: ReplicationJob, rows: list[JobVolume], cap: int, lease: float,
                    held: dict[int, JobVolume] | None = None) -> bool:
    """FIFO per appliance VM: admitted when no older job of it waits and the new disks fit;
    reserves the slots (holding rows) at once. The caller holds the slot row's lock. A job not yet
    inserted (no id) comes after every queued one; `held`: its pairing, when the caller has it."""
    older = [ReplicationJob.id < job.id] if job.id is not None else []
    earlier = await db.scalar(select(func.count()).select_from(ReplicationJob).where(
        ReplicationJob.status == QUEUED, *older, on_appliance(job.oma_vm_id or "")))
    if earlier:
        return False
    if held is None:
        held = pair(rows, await holdings(db, job.vm_key))
    new = sum(r.unit_number not in held for r in rows)
    if await used(db, job.oma_vm_id or "") + new > cap:
        return False
    carry = job.replication_type == "incremental"
    for r in rows:
        old = held.get(r.unit_number)
        if old is not None and old is not r:  # the VM's volume: taken over, export reused, change id carried
            r.volume_id, r.volume_name, r.device_id = old.volume_id, old.volume_name, old.device_id
            r.device_path, r.export_name, r.export_port = old.device_path, old.export_name, old.export_port
            r.previous_change_id = ((old.change_id or old.previous_change_id or original.seed_change_id(job))
                                    if carry else None)
            old.holds_volume = False
        elif old is None:
            r.volume_name, r.created_by_job = volume_name(job.vm_name, r.unit_number, job.job_id), True
        r.holds_volume, r.status = True, D_PENDING
    job.status, job.started_at = PROVISIONING, utcnow()
    job.current_operation, job.message = "Provisioning volumes", None
    job.lease_until = job.started_at + timedelta(seconds=lease)  # the admitting process provisions it
    return True


async def admit_queued(db: AsyncSession, oma_vm_id: str, cap: int, lease: float) -> list[str]:
    """Admit this appliance VM's queued jobs, oldest first, while their disks fit."""
    queued = (await db.scalars(select(ReplicationJob).where(
        ReplicationJob.status == QUEUED, on_appliance(oma_vm_id)).order_by(ReplicationJob.id))).all()
    started = []
    for job in queued:
        rows = list((await db.scalars(select(JobVolume).where(JobVolume.job_id == job.job_id)
                                      .order_by(JobVolume.unit_number))).all())
        if not await try_admit(db, job, rows, cap, lease):
            break
        started.append(job.job_id)
    return started


async def appliances_waiting(db: AsyncSession) -> list[str]:
    """Appliance VMs with queued jobs."""
    return [v for v in (await db.scalars(select(ReplicationJob.oma_vm_id).where(
        ReplicationJob.status == QUEUED).distinct())).all() if v]


def learned_from(limit: int | None, attached: list[dict[str, Any]], ours: set[str]) -> int:
    """What the appliance VM can hold for OMA, from a refusal and the volumes attached to it now."""
    foreign = sum(v["id"] not in ours for v in attached)
    total = limit if limit is not None else len(attached)
    return max(0, total - foreign)


async def learn(db: AsyncSession, settings: Any, oma_vm_id: str, learned: int, reason: str) -> int:
    """Lower the VM's capacity to `learned` (never raise it: a refusal is the cloud's word). The
    caller holds the slot row's lock. Returns the capacity now in force."""
    slots = await lock(db, oma_vm_id)
    REFUSALS.labels(oma_vm_id=oma_vm_id).inc()
    if slots.learned_capacity is None or learned < slots.learned_capacity:
        before = capacity(settings, slots)
        slots.learned_capacity, slots.learned_reason, slots.learned_at = learned, reason[:255], utcnow()
        log.warning("appliance VM holds fewer disks than configured; capacity lowered",
                    extra={"oma_vm_id": oma_vm_id, "capacity": learned, "was": before,
                           "max_attached_disks": settings.max_attached_disks, "reason": reason})
    now = capacity(settings, slots)
    CAPACITY.labels(oma_vm_id=oma_vm_id).set(now)
    return now


async def report(db: AsyncSession, settings: Any) -> list[dict[str, Any]]:
    """Per appliance VM: capacity in force, learnt capacity and why, disks held (for /health)."""
    out = []
    for slots in (await db.scalars(select(ApplianceSlots).order_by(ApplianceSlots.oma_vm_id))).all():
        cap = capacity(settings, slots)
        CAPACITY.labels(oma_vm_id=slots.oma_vm_id).set(cap)
        out.append({"oma_vm_id": slots.oma_vm_id, "capacity": cap, "configured": settings.max_attached_disks,
                    "learned_capacity": slots.learned_capacity, "learned_reason": slots.learned_reason,
                    "held": await used(db, slots.oma_vm_id)})
    return out

