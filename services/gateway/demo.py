"""The demo panel's one action (`oma-api -demo`, docs/demo.md): a guest writes to a source disk, so
that an incremental sync has something to copy. It goes to the VMA simulator's `/sim/mutate` (the
CBT model of plugins/vma/disks.py); outside a demo the route answers 404."""
from __future__ import annotations

from typing import Any

import aiohttp
from pydantic import BaseModel, Field

from oma.shared import errors
from oma.shared.bus import Bus
from oma.shared.schemas import NO_CONTROL
from oma.shared.settings import Settings
from oma.shared.subjects import Inventory


class MutateRequest(BaseModel):
    vm_name: str = Field(min_length=1, max_length=255, pattern=NO_CONTROL, description="the VM, as discovered")
    disk_id: str | None = Field(None, pattern=r"^disk-\d{1,9}$", description="default: the VM's first disk")
    percent: float = Field(1.0, gt=0, le=100, description="share of the disk's blocks the guest rewrites")


async def mutate(settings: Settings, bus: Bus, body: MutateRequest) -> dict[str, Any]:
    if not (settings.demo and settings.demo_vma_url):
        raise errors.NotFound("Not a demo", "the demo panel exists only when oma-api runs with -demo")
    found = await bus.call(Inventory.LIST, {"name": body.vm_name, "limit": 1000})
    vm = next((v for v in found["vms"] if v["name"] == body.vm_name), None)
    if vm is None:
        raise errors.NotFound("VM not found", f"no discovered VM named {body.vm_name!r}")
    disks = [d["id"] for d in vm.get("disks") or []]
    disk = body.disk_id or (disks[0] if disks else None)
    if disk not in disks:
        raise errors.NotFound("Disk not found", f"VM {body.vm_name!r} has no disk {disk!r} (its disks: "
                                                f"{', '.join(disks) or 'none'})")
    payload = {"vm": vm["path"], "disk": disk, "percent": body.percent}
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=settings.request_timeout)) as http:
            async with http.post(f"{settings.demo_vma_url}/sim/mutate", json=payload) as r:
                answer = await r.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        raise errors.BadGateway("VMA simulator unreachable", type(exc).__name__) from None
    if r.status == 404:  # the simulator makes a disk when a replication first names it
        raise errors.Conflict("Disk not replicated yet", f"replicate {body.vm_name} once before changing its disks")
    if r.status != 200:
        raise errors.BadGateway("VMA simulator error", answer.get("details") or answer.get("error"))
    return {"success": True, "vm_name": body.vm_name, "disk_id": disk, "percent": body.percent,
            "bytes_written": answer["bytes_written"], "change_id": answer["change_id"]}
