"""The copier's change-id calls (shared/reference/vma.md, "Change ids"), compatible with the original:

- `GET /api/v1/replications/changeid?vm_path=&disk_id=disk-<key>` -> `{"change_id": "..."}`: the base
  the copier's CBT query starts from. While the VM has a job in flight, that job's base (empty for an
  initial job, whose volumes are new: a delta on top of them would be wrong); otherwise the last one
  recorded for the disk. Unknown VM or disk: empty (a full sync), never 404.
- `POST /api/v1/replications/{job_id}/changeid {change_id, disk_id}`: the new change id after a
  successful copy, kept on the job's disk; the job's completion carries it into the CBT history.
"""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select

from oma.services.replication import views
from oma.services.replication.models import IN_FLIGHT, JobVolume, ReplicationJob
from oma.shared import errors

SCAN_LIMIT = 50  # jobs of one VM name looked at, newest first


class ChangeIdQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")
    vm_path: str = Field(min_length=1, max_length=1024)
    disk_id: str = Field(min_length=1, max_length=255)


class ChangeIdRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")
    job_id: str = Field(min_length=1, max_length=64)
    disk_id: str = Field(min_length=1, max_length=255)
    change_id: str = Field(min_length=1, max_length=255)


async def lookup(sessions: Any, q: ChangeIdQuery) -> dict[str, Any]:
    name = q.vm_path.rstrip("/").rsplit("/", 1)[-1]
    async with sessions() as db:  # the name is indexed; the path lives in the job's source_vm
        jobs = [j for j in (await db.scalars(select(ReplicationJob).where(ReplicationJob.vm_name == name)
                                             .order_by(ReplicationJob.id.desc()).limit(SCAN_LIMIT))).all()
                if views.source_vm(j).get("path") == q.vm_path]
        rows = {(r.job_id, r.disk_id): r for r in (await db.scalars(select(JobVolume).where(
            JobVolume.job_id.in_([j.job_id for j in jobs]), JobVolume.disk_id == q.disk_id))).all()} if jobs else {}
    change_id = ""
    if jobs and jobs[0].status in IN_FLIGHT:
        row = rows.get((jobs[0].job_id, q.disk_id))
        change_id = (row.previous_change_id if row else None) or ""
    else:
        change_id = next((rows[(j.job_id, q.disk_id)].change_id for j in jobs
                          if (j.job_id, q.disk_id) in rows and rows[(j.job_id, q.disk_id)].change_id), "")
    return {"success": True, "vm_path": q.vm_path, "disk_id": q.disk_id, "change_id": change_id}


async def record(sessions: Any, body: ChangeIdRecord) -> dict[str, Any]:
    async with sessions.begin() as db:
        if await db.scalar(select(ReplicationJob.id).where(ReplicationJob.job_id == body.job_id)) is None:
            raise errors.NotFound("Job not found", f"No replication job with ID: {body.job_id}")
        row = await db.scalar(select(JobVolume).where(JobVolume.job_id == body.job_id,
                                                      JobVolume.disk_id == body.disk_id))
        if row is None:
            raise errors.NotFound("Disk not found", f"job {body.job_id} has no disk {body.disk_id}")
        row.change_id = body.change_id
    return {"success": True, "job_id": body.job_id, "disk_id": body.disk_id, "change_id": body.change_id}
