"""`POST /api/v1/demo/mutate`: the demo panel's guest write (services/gateway/demo.py)."""
from __future__ import annotations

from fastapi import APIRouter, Request

from oma.services.gateway import demo
from oma.services.gateway.deps import BusDep
from oma.services.gateway.proxy import errors_doc
from oma.services.gateway.responses import Ok

router = APIRouter(prefix="/api/v1", tags=["demo"])


class MutateResult(Ok):
    vm_name: str
    disk_id: str
    percent: float
    bytes_written: int
    change_id: str


@router.post("/demo/mutate", response_model=MutateResult, responses=errors_doc(400, 401, 404, 409, 502))
async def mutate(body: demo.MutateRequest, bus: BusDep, request: Request):
    """Only with `oma-api -demo`: a guest rewrites `percent` of a replicated VM's disk on the VMA
    simulator, so the next incremental copies exactly that (404 on any other appliance)."""
    return await demo.mutate(request.app.state.settings, bus, body)
