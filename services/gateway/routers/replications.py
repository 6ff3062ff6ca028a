from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request

from oma.services.gateway.deps import BusDep
from oma.services.gateway.proxy import errors_doc, forward
from oma.services.gateway import responses as r
from oma.shared.schemas import OFFSET_MAX, ChangeIdBody, ProgressReport, ReplicationRequest
from oma.shared.subjects import Replication

JobId = Annotated[str, Path(min_length=1, max_length=64, description="e.g. job-20250812-080802")]

router = APIRouter(prefix="/api/v1", tags=["replication"])


# Timeouts derive from the settings the replication service works by, plus one bus round trip.
def create_timeout(settings: Any) -> float:
    """The service answers 202 once `provision_wait` has passed since it got the request."""
    return settings.provision_wait + settings.request_timeout


def cancel_timeout(settings: Any) -> float:
    """A cancel detaches and deletes (in parallel across disks): two cloud steps, each bounded by
    `cloud_job_timeout` plus one last request of `cloud_timeout`."""
    return 2 * (settings.cloud_job_timeout + settings.cloud_timeout) + settings.request_timeout


@router.post("/replications", status_code=201, response_model=r.ReplicationCreated,
             responses={201: {"description": "ready_for_sync"},
                        202: {"model": r.ReplicationCreated, "description": "queued or still provisioning"},
                        **errors_doc(400, 401, 404, 409, 502, 504)})
async def create_replication(body: ReplicationRequest, bus: BusDep, request: Request):
    """Create volumes, attach them, and publish NBD exports for every disk of `source_vm`: 201 when
    ready_for_sync, 202 (poll the job) when still queued or provisioning after `provision_wait`."""
    return await forward(bus, Replication.CREATE, body.model_dump(mode="json"),
                         timeout=create_timeout(request.app.state.settings))


@router.get("/replication/jobs", response_model=r.JobList, responses=errors_doc(400, 401))
async def list_jobs(bus: BusDep, status: str | None = Query(None, max_length=32),
                    vm_name: str | None = Query(None, max_length=255),
                    since: str | None = Query(None, max_length=40, description="RFC 3339 time"),
                    limit: int = Query(100, ge=1, le=1000), offset: int = Query(0, ge=0, le=OFFSET_MAX)):
    q = {k: v for k, v in dict(status=status, vm_name=vm_name, since=since, limit=limit, offset=offset).items()
         if v is not None}
    return await forward(bus, Replication.LIST, q)


@router.get("/replication/jobs/{job_id}", response_model=r.JobDetail, responses=errors_doc(401, 404))
async def get_job(job_id: JobId, bus: BusDep):
    return await forward(bus, Replication.GET, {"job_id": job_id})


@router.post("/replication/jobs/{job_id}/progress", response_model=r.ProgressAccepted,
             responses=errors_doc(400, 401, 404, 409))
async def report_progress(job_id: JobId, body: ProgressReport, bus: BusDep):
    """Progress from the VMA: bytes, status, and the new CBT change id per disk on completion."""
    return await forward(bus, Replication.PROGRESS, {"job_id": job_id, **body.model_dump(exclude_none=True)})


@router.delete("/replication/jobs/{job_id}", response_model=r.JobCancelled, responses=errors_doc(401, 404, 409))
async def cancel_job(job_id: JobId, bus: BusDep, request: Request):
    """Cancel a job in flight and clean up what it created."""
    return await forward(bus, Replication.CANCEL, {"job_id": job_id},
                         timeout=cancel_timeout(request.app.state.settings))


# The copier's change-id calls (services/replication/changeids.py), as the original VMA makes them.
@router.get("/replications/changeid", response_model=r.ChangeId, responses=errors_doc(400, 401))
async def get_change_id(bus: BusDep, vm_path: str = Query(min_length=1, max_length=1024),
                        disk_id: str = Query(min_length=1, max_length=255, description="disk-<key>")):
    """The change id the next copy of the disk starts from; empty for a first (full) sync."""
    return await forward(bus, Replication.CHANGEID_GET, {"vm_path": vm_path, "disk_id": disk_id})


@router.post("/replications/{job_id}/changeid", response_model=r.ChangeIdRecorded,
             responses=errors_doc(400, 401, 404))
async def record_change_id(job_id: JobId, body: ChangeIdBody, bus: BusDep):
    """The disk's new change id after a successful copy; the job's completion adds it to the CBT history."""
    return await forward(bus, Replication.CHANGEID_RECORD, {"job_id": job_id, **body.model_dump()})
