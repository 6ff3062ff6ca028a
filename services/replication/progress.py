"""Progress from the VMA: bytes, percent, throughput (EWMA) and ETA, and the status moves a report
makes (ready_for_sync -> replicating -> completed | failed). Runs in the caller's transaction."""
from __future__ import annotations

import math
import time
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from oma.services.replication import queries, views
from oma.services.replication.models import (
    COMPLETED,
    FAILED,
    FINISHED,
    PROVISIONING,
    QUEUED,
    READY,
    REPLICATING,
    JobVolume,
    ReplicationJob,
)
from oma.shared import errors
from oma.shared.db import utcnow
from oma.shared.schemas import INT32_MAX, ProgressReport
from oma.shared.subjects import Replication

EWMA_ALPHA = 0.3  # weight of the newest throughput sample
ETA_MAX = INT32_MAX  # vma_eta_seconds is an INT column (68 years)


async def record(db: AsyncSession, job_id: str, report: ProgressReport,
                 keep_failed: bool) -> tuple[dict[str, Any], list[str], ReplicationJob, list[JobVolume]]:
    """Apply one report; the reply for the VMA, the event subjects to publish (in order), and the job
    and its disks as they now are (the job's row locked: the caller numbers the events with it)."""
    events: list[str] = []
    job = await queries.job(db, job_id, lock=True)
    if job.status in FINISHED:
        raise errors.Conflict("Job finished", f"job {job_id} is {job.status}: no more progress accepted")
    if job.status in (QUEUED, PROVISIONING):
        raise errors.Conflict("Job not ready", f"job {job_id} is {job.status}: its exports are not ready")
    rows = {r.unit_number: r for r in await queries.rows(db, job_id)}
    stale = apply_bytes(job, report)
    for i, d in enumerate(report.disks or []):
        row = rows.get(d.unit_number)
        if row is None:
            raise errors.BadRequest("Validation failed", f"disks.{i}.unit_number: job {job_id} has "
                                    f"no disk with unit number {d.unit_number}")
        if d.bytes_transferred is not None:
            row.bytes_transferred = max(row.bytes_transferred, d.bytes_transferred)
        if d.total_bytes:
            row.total_bytes = d.total_bytes
        if report.status == COMPLETED and d.change_id:
            row.change_id = d.change_id
    if report.current_operation and not stale:
        job.current_operation = report.current_operation
    if report.status == REPLICATING and job.status == READY:
        job.status = REPLICATING
        events.append(Replication.EVT_STATUS)
    if report.status == REPLICATING and not stale:
        events.append(Replication.EVT_PROGRESS)
    elif report.status == COMPLETED:
        job.status, job.completed_at, job.progress_percent = COMPLETED, utcnow(), 100.0
        if views.vma_sync_type(job, list(rows.values())) == "full":  # a CBT delta's bytes are what changed
            job.bytes_transferred = max(job.bytes_transferred, job.total_bytes or 0)
        job.vma_eta_seconds, job.current_operation = 0, report.current_operation or "Completed"
        events.append(Replication.EVT_COMPLETED)
    elif report.status == FAILED:
        job.status, job.completed_at, job.cleanup_pending = FAILED, utcnow(), not keep_failed
        job.error = report.error or "the VMA reported a failure"
        job.current_operation = report.current_operation or "Failed"
        events.append(Replication.EVT_FAILED)
    reply = {"success": True, "job_id": job_id, "status": job.status, "applied": not stale,
             "progress_percent": round(job.progress_percent, 2),
             "bytes_transferred": job.bytes_transferred, "total_bytes": job.total_bytes,
             "vma_throughput_mbps": round(job.vma_throughput_mbps, 2)
             if job.vma_throughput_mbps is not None else None,
             "vma_eta_seconds": job.vma_eta_seconds}
    return reply, events, job, list(rows.values())


def apply_bytes(job: ReplicationJob, report: ProgressReport) -> bool:
    """Bytes, percent, EWMA throughput and ETA; True when the report is older than what we have."""
    if report.total_bytes:
        job.total_bytes = report.total_bytes
    b = report.bytes_transferred
    if b is None:
        return False
    if b < job.bytes_transferred:
        return True  # out of order: never move backwards
    now = time.time()
    if b > job.bytes_transferred or job.last_report_ts is None:
        if job.last_report_ts is not None and now > job.last_report_ts:
            rate = (b - job.bytes_transferred) / (now - job.last_report_ts) / 1e6
            old = job.vma_throughput_mbps
            job.vma_throughput_mbps = rate if old is None else EWMA_ALPHA * rate + (1 - EWMA_ALPHA) * old
        job.last_report_ts = now
    job.bytes_transferred = b
    if job.total_bytes:
        job.progress_percent = min(100.0, 100.0 * b / job.total_bytes)
        if job.vma_throughput_mbps:
            eta = max(job.total_bytes - b, 0) / (job.vma_throughput_mbps * 1e6)
            job.vma_eta_seconds = math.ceil(min(eta, ETA_MAX))  # a trickle of bytes: years, not an overflow
    return False
