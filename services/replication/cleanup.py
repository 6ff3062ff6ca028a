"""Cleanup: giving back what a job holds (exports, volumes) and sweeping the volumes no row holds.
Functions take the session factory, the bus and the cloud operations they use."""
from __future__ import annotations

import logging
from typing import Any

from prometheus_client import Counter
from sqlalchemy import select, update

from oma.services.replication.cloud import CloudOps, error_text
from oma.services.replication.models import (
    D_EXPORTING,
    D_FAILED,
    D_READY,
    D_RELEASED,
    PROVISIONING,
    QUEUED,
    JobVolume,
    ReplicationJob,
)
from oma.services.replication.naming import parse_volume_name, volume_name
from oma.shared import errors
from oma.shared.subjects import Exports

log = logging.getLogger("oma.replication")
SWEPT = Counter("oma_replication_orphans_swept_total", "OMA volumes no row holds, removed by the sweep")


async def release_row(sessions: Any, bus: Any, ops: CloudOps, job: ReplicationJob, row: JobVolume,
                      others: set[str]) -> list[str]:
    """Deactivate the disk's export, then release its volume(s) (detach confirmed, then delete): the
    recorded one, and, for a disk this job created, any other carrying its name that no other row holds."""
    if row.holds_volume and (row.export_name or row.status in (D_EXPORTING, D_READY)):
        target = ({"export_name": row.export_name} if row.export_name
                  else {"vm_id": job.vm_key, "disk_unit_number": row.unit_number})
        try:
            await bus.call(Exports.DEACTIVATE, target)
        except errors.NotFound:
            pass
        except errors.OmaError as exc:  # the volume still goes; export_manager drops exports of gone devices
            log.warning("could not deactivate an export",
                        extra={"job_id": job.job_id, "reason": error_text(exc), **target})
    ids = [row.volume_id] if row.volume_id and row.holds_volume else []
    if row.created_by_job and row.volume_name:  # volumes whose id the row never learnt
        ids += [v["id"] for v in await ops.by_name(row.volume_name) if v["id"] not in ids and v["id"] not in others]
    async def submitted(job_id: str) -> None:  # recorded first: a retried cleanup polls it (cloud.py)
        async with sessions.begin() as db:
            await db.execute(update(JobVolume).where(JobVolume.id == row.id).values(detach_job_id=job_id))

    for volume_id in ids:
        if volume_id == row.volume_id:
            await ops.release(volume_id, detach_job=row.detach_job_id, submitted=submitted)
        else:
            await ops.release(volume_id)
    if row.holds_volume:
        async with sessions.begin() as db:
            await db.execute(update(JobVolume).where(JobVolume.id == row.id).values(
                holds_volume=False, detach_job_id=None,
                status=row.status if row.status == D_FAILED else D_RELEASED))
    return ids


async def sweep_account(sessions: Any, ops: CloudOps, config_id: int, oma_vm_id: str | None) -> list[str]:
    """The orphan sweep for one configuration (Replicator.sweep_orphans says which volumes qualify)."""
    named = {v["id"]: (v, parsed) for v in await ops.data_volumes()
             if (parsed := parse_volume_name(v.get("name", "")))}
    if not named:
        return []
    async with sessions() as db:
        jobs = {j.job_id: j for j in (await db.scalars(select(ReplicationJob).where(
            ReplicationJob.job_id.in_({p[0] for _, p in named.values()})))).all()}
        held = set((await db.scalars(select(JobVolume.volume_id).where(
            JobVolume.holds_volume.is_(True), JobVolume.volume_id.in_(list(named))))).all())
    swept = []
    for volume_id, (vol, (job_id, unit)) in named.items():
        job = jobs.get(job_id)
        if (job is None or job.ossea_config_id != config_id or volume_id in held
                or vol["name"] != volume_name(job.vm_name, unit, job.job_id)  # the whole name, VM too
                or job.status in (QUEUED, PROVISIONING) or job.cleanup_pending
                or vol.get("virtualmachineid") not in (None, oma_vm_id)):
            continue
        try:
            await ops.release(volume_id)
        except Exception as exc:  # noqa: BLE001 - the next sweep tries again
            log.warning("orphan sweep could not release a volume",
                        extra={"volume_id": volume_id, "reason": error_text(exc)})
            continue
        SWEPT.inc()
        swept.append(volume_id)
        log.warning("orphaned volume released", extra={"volume_id": volume_id, "volume_name": vol["name"],
                                                       "job_id": job_id, "unit_number": unit})
    return swept
