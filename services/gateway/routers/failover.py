from __future__ import annotations

from fastapi import APIRouter, Query

from oma.services.gateway.deps import BusDep
from oma.services.gateway.proxy import errors_doc, forward
from oma.services.gateway import responses as r
from oma.shared.schemas import FailoverRequest, NetworkMappingRequest
from oma.shared.subjects import Failover

router = APIRouter(prefix="/api/v1", tags=["failover"])


@router.post("/failover", status_code=202, response_model=r.FailoverAccepted,
             responses=errors_doc(400, 401, 404, 409, 502, 504))
async def failover(body: FailoverRequest, bus: BusDep):
    """Start a failover job: `test` (a clone of the replica boots on test networks), `cleanup` (remove
    it), `live` or `rollback`. The job runs in the background; follow it at /failover/jobs/{id}."""
    return await forward(bus, Failover.ACTION, body.model_dump(mode="json", exclude_none=True))


@router.get("/failover/jobs", response_model=r.FailoverJobList, responses=errors_doc(400, 401))
async def list_jobs(bus: BusDep, status: str | None = Query(None, max_length=32),
                    vm_name: str | None = Query(None, max_length=255),
                    limit: int = Query(100, ge=1, le=1000), offset: int = Query(0, ge=0)):
    q = {k: v for k, v in dict(status=status, vm_name=vm_name, limit=limit, offset=offset).items() if v is not None}
    return await forward(bus, Failover.LIST, q)


@router.get("/failover/jobs/{failover_id}", response_model=r.FailoverJobDetail, responses=errors_doc(401, 404))
async def get_job(failover_id: str, bus: BusDep):
    """Steps with status and times, the cloud objects created (name and id), errors."""
    return await forward(bus, Failover.GET, {"failover_id": failover_id})


@router.post("/network/mappings", response_model=r.NetworkMappingResult,
             responses={201: {"model": r.NetworkMappingResult, "description": "created"},
                        **errors_doc(400, 401, 404, 409)})
async def network_mappings(body: NetworkMappingRequest, bus: BusDep):
    """Source network (per vCenter) -> production and test network ids: get, create, update, delete."""
    return await forward(bus, Failover.MAPPINGS, body.model_dump(exclude_none=True))
