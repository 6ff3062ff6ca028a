"""Protection groups, schedules, their executions, and preflight (the scheduler service)."""
from __future__ import annotations

from fastapi import APIRouter, Path, Query

from oma.services.gateway import responses as r
from oma.services.gateway.deps import BusDep
from oma.services.gateway.proxy import errors_doc, forward
from oma.shared.schemas import INT32_MAX, GroupRequest, PreflightRequest, ScheduleRequest
from oma.shared.subjects import Scheduler

router = APIRouter(prefix="/api/v1", tags=["scheduler"])
ScheduleId = Path(ge=1, le=INT32_MAX)


@router.post("/groups", response_model=r.GroupResult,
             responses={201: {"model": r.GroupResult, "description": "created"}, **errors_doc(400, 401, 404, 409)})
async def groups(body: GroupRequest, bus: BusDep):
    """Protection groups (named VMs and/or a filter over the inventory, with a target configuration, a
    schedule and failover defaults): get, create, update, delete, add_vms, remove_vms."""
    return await forward(bus, Scheduler.GROUPS, body.model_dump(mode="json", exclude_none=True))


@router.post("/schedules", response_model=r.ScheduleResult,
             responses={201: {"model": r.ScheduleResult, "description": "created"}, **errors_doc(400, 401, 404, 409)})
async def schedules(body: ScheduleRequest, bus: BusDep):
    """Schedules (an interval or a cron expression, a time window, jitter, at most N syncs of a group at
    once, skip-if-running): get, create, update, delete, run. Each run starts an incremental sync of every
    VM of the groups on it."""
    return await forward(bus, Scheduler.SCHEDULES, body.model_dump(mode="json", exclude_none=True))


@router.get("/schedules/{schedule_id}/executions", response_model=r.ExecutionList, responses=errors_doc(400, 401, 404))
async def executions(bus: BusDep, schedule_id: int = ScheduleId,
                     group_id: int | None = Query(None, ge=1, le=INT32_MAX),
                     limit: int = Query(100, ge=1, le=1000), offset: int = Query(0, ge=0, le=INT32_MAX)):
    """The schedule's runs, newest first: per group, the VMs started, skipped and failed."""
    q = {k: v for k, v in dict(schedule_id=schedule_id, group_id=group_id, limit=limit, offset=offset).items()
         if v is not None}
    return await forward(bus, Scheduler.EXECUTIONS, q)


@router.get("/schedules/{schedule_id}/executions/{execution_id}", response_model=r.ExecutionList,
            responses=errors_doc(401, 404))
async def execution(bus: BusDep, schedule_id: int = ScheduleId,
                    execution_id: str = Path(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9-]+$")):
    """One run with each VM's outcome: its replication job, or why it failed or was skipped."""
    return await forward(bus, Scheduler.EXECUTIONS, {"schedule_id": schedule_id, "execution_id": execution_id})


@router.post("/preflight", response_model=r.PreflightResult, responses=errors_doc(400, 401, 404, 503, 504))
async def preflight(body: PreflightRequest, bus: BusDep):
    """Per VM (of `vm_names` or of the group `group_id`), the checks replication runs before it
    creates a job: CBT, disk slots, account volume limit, disk offering, network mappings, target name,
    power state; each pass, warn or fail with a reason. Replication refuses a VM with a failed check, with
    the same reasons."""
    return await forward(bus, Scheduler.PREFLIGHT, body.model_dump(mode="json", exclude_none=True))
