from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request

from oma.services.gateway.deps import BusDep
from oma.services.gateway.proxy import errors_doc, forward
from oma.services.gateway import responses as r
from oma.shared.schemas import OFFSET_MAX, VCenterRequest
from oma.shared.subjects import Inventory

router = APIRouter(prefix="/api/v1", tags=["inventory"])


def vcenter_timeout(bus_timeout: float, settings: Any) -> float:
    """`test` logs in to vCenter."""
    return max(bus_timeout, settings.vsphere_timeout + 5)


def discover_timeout(bus_timeout: float, settings: Any) -> float:
    """A login and a bounded series of paged reads, each within vsphere_timeout."""
    return max(bus_timeout, settings.vsphere_timeout * 10)


@router.post("/vcenter/config", response_model=r.VCenterConfigResult,
             responses={201: {"model": r.VCenterConfigResult, "description": "created configuration"},
                        **errors_doc(400, 401, 404, 409, 502, 504)})
async def vcenter_config(body: VCenterRequest, bus: BusDep, request: Request):
    """vCenter connections, with the same anti-sprawl `action` pattern as the OSSEA endpoint."""
    return await forward(bus, Inventory.VCENTER_ACTION, body.model_dump(exclude_none=True),
                         timeout=vcenter_timeout(bus.timeout, request.app.state.settings))


@router.get("/vms/discover", response_model=r.Discovery, responses=errors_doc(400, 401, 404, 502, 504))
async def discover(bus: BusDep, request: Request, vcenter: str = Query(min_length=1, max_length=255)):
    """Read the vCenter's inventory now, store it, and return the VMs with a summary."""
    return await forward(bus, Inventory.DISCOVER, {"vcenter": vcenter},
                         timeout=discover_timeout(bus.timeout, request.app.state.settings))


@router.get("/vms", response_model=r.VmList, responses=errors_doc(400, 401))
async def list_vms(bus: BusDep, vcenter: str | None = Query(None, max_length=255),
                   datacenter: str | None = Query(None, max_length=255),
                   name: str | None = Query(None, max_length=255),
                   power_state: str | None = Query(None, max_length=32),
                   cbt: bool | None = None, include_gone: bool = False,
                   limit: int = Query(100, ge=1, le=1000), offset: int = Query(0, ge=0, le=OFFSET_MAX)):
    """The stored inventory, filtered and paginated."""
    q = {k: v for k, v in dict(vcenter=vcenter, datacenter=datacenter, name=name, power_state=power_state,
                               cbt=cbt, include_gone=include_gone, limit=limit, offset=offset).items()
         if v is not None}
    return await forward(bus, Inventory.LIST, q)


@router.get("/vms/{vm_id}", response_model=r.VmDetail, responses=errors_doc(401, 404))
async def get_vm(vm_id: Annotated[str, Path(min_length=1, max_length=255)], bus: BusDep):
    """One VM with its disks and NICs, by moref (`vm-42`) or instance UUID."""
    return await forward(bus, Inventory.GET, {"id": vm_id})
