"""The optional request fields the original appliance's GUI and scheduler send (docs/replication.md):
checked against the inventory where they name the VM's place, then kept on the job as given."""
from __future__ import annotations

from typing import Any, Awaitable, Callable

from oma.services.replication.models import ORIGINAL_FIELDS
from oma.shared import errors
from oma.shared.schemas import ReplicationRequest
from oma.shared.subjects import Inventory

Call = Callable[..., Awaitable[Any]]


def _refuse(field: str, text: str) -> errors.BadRequest:
    return errors.BadRequest("Validation failed", f"{field}: {text}")


async def place(req: ReplicationRequest, call: Call) -> str | None:
    """The vCenter host the job records: `vcenter_host` must be a vCenter whose inventory holds this
    VM, and `datacenter` the VM's datacenter there and in `source_vm`; a contradiction is a 400.
    A datacenter `source_vm` lacks is filled in from `datacenter`."""
    vm = req.source_vm
    if req.datacenter and vm.datacenter and req.datacenter != vm.datacenter:
        raise _refuse("datacenter", f"{req.datacenter!r} contradicts source_vm.datacenter {vm.datacenter!r}")
    if req.datacenter and not vm.datacenter:
        vm.datacenter = req.datacenter
    if not req.vcenter_host:
        return None
    listed = (await call(Inventory.LIST, {"vcenter": req.vcenter_host, "name": vm.name, "include_gone": True,
                                          "limit": 1000}, wait=False))["vms"]
    found = next((v for v in listed if v["id"] == vm.id and (vm.uuid is None or v["uuid"] == vm.uuid)), None)
    if found is None:
        raise _refuse("vcenter_host", f"VM {vm.name} ({vm.id}) is not in the inventory of vCenter "
                      f"{req.vcenter_host!r}: discover that vCenter first, or leave vcenter_host out")
    if vm.datacenter and found.get("datacenter") and vm.datacenter != found["datacenter"]:
        raise _refuse("datacenter", f"{vm.datacenter!r} contradicts the inventory: VM {vm.name} is in "
                      f"datacenter {found['datacenter']!r} of vCenter {found['vcenter']}")
    return found["vcenter"]


def job_fields(req: ReplicationRequest, vcenter_host: str | None) -> dict[str, Any]:
    """The ReplicationJob columns of the original's fields."""
    return {**{f: getattr(req, f) for f in ORIGINAL_FIELDS}, "vcenter_host": vcenter_host}


def seed_change_id(job: Any) -> str | None:
    """The base of the CBT delta the request gave, for a taken-over disk that carries none."""
    return job.previous_change_id or job.change_id
