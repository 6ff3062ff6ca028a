"""Recovery: which process provisions a job, and resuming the jobs whose process is gone.

The process that admits a job holds a lease on it (`replication_jobs.lease_until`), renewed while it
provisions (every `provision_lease` / 3 s). A job still `provisioning` whose lease lapsed lost its
process (killed, restarted, host gone): the first copy to claim it (an atomic conditional UPDATE)
resumes it, so two copies never provision one job; every step is recorded before it acts, so the job
picks up where it stopped (see provisioning in service.py).
"""
from __future__ import annotations

from datetime import timedelta

from sqlalchemy import or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from oma.services.replication.models import CANCELLED, PROVISIONING, ReplicationJob
from oma.shared.db import utcnow

async def renew(db: AsyncSession, job_ids: list[str], lease: float) -> None:
    """Extend this process's claim on the jobs it is provisioning."""
    if job_ids:
        await db.execute(update(ReplicationJob).where(ReplicationJob.job_id.in_(job_ids),
                                                      ReplicationJob.status == PROVISIONING)
                         .values(lease_until=utcnow() + timedelta(seconds=lease)))


async def claim_lapsed(db: AsyncSession, lease: float) -> list[str]:
    """Provisioning jobs whose process stopped renewing (killed, restarted, gone): each is claimed
    by an atomic conditional UPDATE, so of several processes exactly one resumes it."""
    now = utcnow()
    lapsed = (await db.scalars(select(ReplicationJob.job_id).where(
        ReplicationJob.status == PROVISIONING,
        or_(ReplicationJob.lease_until.is_(None), ReplicationJob.lease_until < now)))).all()
    claimed = []
    for job_id in lapsed:
        result = await db.execute(update(ReplicationJob).where(
            ReplicationJob.job_id == job_id, ReplicationJob.status == PROVISIONING,
            or_(ReplicationJob.lease_until.is_(None), ReplicationJob.lease_until < now))
            .values(lease_until=now + timedelta(seconds=lease)))
        if result.rowcount == 1:
            claimed.append(job_id)
    return claimed


async def cancelled_elsewhere(db: AsyncSession, job_ids: list[str]) -> list[str]:
    """Of the jobs this process provisions, those a DELETE on another copy cancelled: stop them."""
    if not job_ids:
        return []
    return list((await db.scalars(select(ReplicationJob.job_id).where(
        ReplicationJob.job_id.in_(job_ids), ReplicationJob.status == CANCELLED))).all())
