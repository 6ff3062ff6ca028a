"""Failover's hand-over (issue 17): a live cutover boots the VM in OSSEA on its replica volumes, so
replication lets go of them until a rollback gives them back.

- `oma.replication.vm.handover {job_id, failover_id}` (failover's `release` step, before it detaches
  the volumes): the VM is recorded in `failed_over_vms`. Refused (409) while a sync of the VM is in
  flight. From then on a new job of the VM is a 409, and so is deleting a job that holds its volumes:
  they are the new VM's disks. The holding rows keep holding, so the appliance VM's disk slots stay
  reserved for the rollback's re-attach, and the orphan sweep never takes a held volume.
- `oma.replication.vm.reclaim {job_id, failover_id, reverted}` (the rollback's `reattach`, after the
  volumes are back on the appliance with their exports): the record goes and syncs are allowed again.
  Unless the disks were reverted to the snapshot taken before the cutover, the change ids no longer
  describe them (the new VM wrote to them): they are cleared, so the next sync is a full one.

A test failover boots clones of the replica while replication goes on, but snapshots it first:

- `oma.replication.vm.quiesce {job_id, failover_id}` (its `quiesce` step): the VM is recorded in
  `quiesced_vms`, so no new job of the VM is admitted (409); the reply lists the VM's jobs still in
  flight, which the step waits for (asking again) before it snapshots: every snapshot then holds the
  same finished sync.
- `oma.replication.vm.resume {job_id, failover_id}` (its `resume_replication` step, and the undo of
  `quiesce`): the record goes.

All are idempotent (a failover step runs again after a restart).
"""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from oma.services.replication import admission, queries
from oma.services.replication.models import IN_FLIGHT, FailedOverVm, JobVolume, QuiescedVm, ReplicationJob
from oma.shared import errors
from oma.shared.db import iso


class HandoverRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    job_id: str = Field(min_length=1, max_length=64, description="a replication job of the VM")
    failover_id: str = Field(min_length=1, max_length=64)


class ReclaimRequest(HandoverRequest):
    reverted: bool = Field(description="the disks were reverted to their pre-cutover snapshots")


async def failed_over(db: AsyncSession, vm_key: str) -> FailedOverVm | None:
    return await db.get(FailedOverVm, vm_key)


def refusal(row: FailedOverVm, what: str) -> errors.Conflict:
    return errors.Conflict("VM failed over", f"VM {row.vm_name} runs in OSSEA on its replica volumes since live "
                           f"failover {row.failover_id} ({iso(row.created_at)}); {what} after a rollback")


async def refuse_release(db: AsyncSession, job: ReplicationJob) -> None:
    """409 when the job holds volumes that are a failed-over VM's disks."""
    row = await failed_over(db, job.vm_key)
    if row is not None and await db.scalar(select(JobVolume.id).where(
            JobVolume.job_id == job.job_id, JobVolume.holds_volume.is_(True)).limit(1)) is not None:
        raise refusal(row, "its volumes can be released")


async def hand_over(db: AsyncSession, body: HandoverRequest) -> dict[str, Any]:
    """In the admission transaction (the caller holds the appliance VM's slot lock), so no job of the
    VM can be admitted between the check and the record."""
    job = await queries.job(db, body.job_id)
    await admission.lock(db, job.oma_vm_id or "")
    row = await failed_over(db, job.vm_key)
    if row is not None:
        if row.failover_id != body.failover_id:
            raise refusal(row, "another failover can take it")
        return await _reply(db, row)
    busy = await db.scalar(select(ReplicationJob).where(ReplicationJob.vm_key == job.vm_key,
                                                        ReplicationJob.status.in_(IN_FLIGHT)).limit(1))
    if busy is not None:
        raise errors.Conflict("Replication job in flight", f"VM {job.vm_name} has job {busy.job_id} ({busy.status}); "
                              "its volumes cannot be handed over before it finishes")
    row = FailedOverVm(vm_key=job.vm_key, vm_name=job.vm_name, failover_id=body.failover_id, job_id=job.job_id)
    db.add(row)
    await db.flush()
    return await _reply(db, row)


async def reclaim(db: AsyncSession, body: ReclaimRequest) -> dict[str, Any]:
    job = await queries.job(db, body.job_id)
    row = await failed_over(db, job.vm_key)
    if row is not None and row.failover_id != body.failover_id:
        raise refusal(row, "another failover's rollback can give them back")
    held = sorted(await admission.holdings(db, job.vm_key), key=lambda r: r.unit_number)
    if row is None:  # a resumed step: already given back
        return {"success": True, "vm_name": job.vm_name, "failed_over": False,
                "volume_ids": [r.volume_id for r in held]}
    if not body.reverted:  # the new VM wrote to the disks: no CBT delta on top of them is valid
        await db.execute(update(JobVolume).where(JobVolume.id.in_([r.id for r in held]))
                         .values(change_id=None, previous_change_id=None))
    await db.delete(row)
    return {"success": True, "vm_name": job.vm_name, "failed_over": False, "full_sync_next": not body.reverted,
            "volume_ids": [r.volume_id for r in held]}


async def _reply(db: AsyncSession, row: FailedOverVm) -> dict[str, Any]:
    held = sorted(await admission.holdings(db, row.vm_key), key=lambda r: r.unit_number)
    return {"success": True, "vm_name": row.vm_name, "failed_over": True, "failover_id": row.failover_id,
            "since": iso(row.created_at), "volume_ids": [r.volume_id for r in held]}


# -- a test failover's pause ----------------------------------------------------------------------

def paused(row: QuiescedVm) -> errors.Conflict:
    return errors.Conflict("Replication paused", f"test failover {row.failover_id} is snapshotting the replica of "
                           f"VM {row.vm_name} (since {iso(row.created_at)}); retry once it has")


async def refuse_if_paused(db: AsyncSession, vm_key: str) -> None:
    if (row := await db.get(QuiescedVm, vm_key)) is not None:
        raise paused(row)


async def quiesce(db: AsyncSession, body: HandoverRequest) -> dict[str, Any]:
    """In the admission transaction, as `hand_over`: a job admitted before the record is listed as in
    flight, none is admitted after it."""
    job = await queries.job(db, body.job_id)
    await admission.lock(db, job.oma_vm_id or "")
    row = await db.get(QuiescedVm, job.vm_key)
    if row is None:
        db.add(QuiescedVm(vm_key=job.vm_key, vm_name=job.vm_name, failover_id=body.failover_id))
    elif row.failover_id != body.failover_id:
        raise paused(row)
    busy = (await db.scalars(select(ReplicationJob.job_id).where(
        ReplicationJob.vm_key == job.vm_key, ReplicationJob.status.in_(IN_FLIGHT)).order_by(ReplicationJob.id))).all()
    return {"success": True, "vm_name": job.vm_name, "quiesced": True, "in_flight": list(busy)}


async def resume(db: AsyncSession, body: HandoverRequest) -> dict[str, Any]:
    job = await queries.job(db, body.job_id)
    row = await db.get(QuiescedVm, job.vm_key)
    if row is not None and row.failover_id == body.failover_id:
        await db.delete(row)
    return {"success": True, "vm_name": job.vm_name, "quiesced": False}
