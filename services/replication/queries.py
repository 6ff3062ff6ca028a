"""Reads: one job with its disks, and the job list with its filters (session passed in)."""
from __future__ import annotations

from collections import defaultdict
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from oma.services.replication import views
from oma.services.replication.models import JOB_STATUSES, JobVolume, ReplicationJob
from oma.shared import errors
from oma.shared.db import limit_offset, list_filters


async def job(db: AsyncSession, job_id: str, *, lock: bool = False) -> ReplicationJob:
    """`lock`: the row is locked until the transaction ends (SELECT ... FOR UPDATE)."""
    query = select(ReplicationJob).where(ReplicationJob.job_id == job_id)
    found = await db.scalar(query.with_for_update() if lock else query)
    if found is None:
        raise errors.NotFound("Job not found", f"No replication job with ID: {job_id}")
    return found


async def rows(db: AsyncSession, job_id: str) -> list[JobVolume]:
    return list((await db.scalars(select(JobVolume).where(JobVolume.job_id == job_id)
                                  .order_by(JobVolume.unit_number))).all())


def parse_since(value: str) -> datetime:
    try:
        dt = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        raise errors.BadRequest("Validation failed", "since: expected an RFC 3339 time such as "
                                "2025-08-12T08:08:02Z") from None
    return dt.astimezone(timezone.utc).replace(tzinfo=None) if dt.tzinfo else dt


async def list_jobs(db: AsyncSession, q: dict[str, Any]) -> dict[str, Any]:
    """GET /replication/jobs: newest first, filtered by status, vm_name, since; paged."""
    limit, offset = limit_offset(q)
    conds = list_filters(q, ReplicationJob.status, JOB_STATUSES, ReplicationJob.vm_name)
    if q.get("since"):
        conds.append(ReplicationJob.created_at >= parse_since(str(q["since"])))
    total = await db.scalar(select(func.count()).select_from(ReplicationJob).where(*conds))
    jobs = (await db.scalars(select(ReplicationJob).where(*conds).order_by(ReplicationJob.id.desc())
                             .limit(limit).offset(offset))).all()
    by_job: dict[str, list[JobVolume]] = defaultdict(list)
    if jobs:
        for r in (await db.scalars(select(JobVolume).where(JobVolume.job_id.in_([j.job_id for j in jobs]))
                                   .order_by(JobVolume.unit_number))).all():
            by_job[r.job_id].append(r)
    return {"success": True, "jobs": [views.summary(j, by_job[j.job_id]) for j in jobs],
            "total": total, "limit": limit, "offset": offset}
