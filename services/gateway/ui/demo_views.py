"""The demo panel (`/ui/demo`, only with `oma-api -demo`): change a source disk for an incremental."""
from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, Request

from oma.services.gateway import demo
from oma.services.gateway.routers.replications import create_timeout
from oma.services.gateway.ui import data
from oma.services.gateway.ui import session as sess
from oma.services.gateway.ui.render import render
from oma.services.gateway.ui.views import PageRoute
from oma.shared import errors
from oma.shared.subjects import Inventory

router = APIRouter(prefix="/ui", include_in_schema=False, route_class=PageRoute)


def _require_demo(request: Request) -> None:
    if not request.app.state.settings.demo:
        raise errors.NotFound("Not a demo", "the demo panel exists only when oma-api runs with -demo")


@router.get("/demo")
async def panel(request: Request, user: sess.User):
    _require_demo(request)
    found = await request.app.state.bus.call(Inventory.LIST, {"limit": 1000})
    disks = [(vm["name"], d["id"], d.get("label") or d["id"]) for vm in found["vms"] for d in vm.get("disks") or []]
    return render(request, "demo.html", disks=disks, vms=[vm["name"] for vm in found["vms"]])


@router.post("/demo/mutate")
async def mutate(request: Request, user: sess.Operator, target: Annotated[str, Form(max_length=300)] = "",
                 percent: Annotated[float, Form(gt=0, le=100)] = 1.0):
    """`target` is "disk-KEY VM-NAME" (disk ids have no spaces; VM names may)."""
    _require_demo(request)
    disk_id, _, vm_name = target.partition(" ")
    body = demo.MutateRequest.model_validate({"vm_name": vm_name, "disk_id": disk_id, "percent": percent})
    done = await demo.mutate(request.app.state.settings, request.app.state.bus, body)
    return render(request, "_demo_mutated.html", done=done)


@router.post("/demo/incremental")
async def incremental(request: Request, user: sess.Operator, vm_name: Annotated[str, Form(max_length=255)] = ""):
    """An incremental replication of one VM to the demo's cloud (the dashboard starts initial ones)."""
    _require_demo(request)
    bus = request.app.state.bus
    configs = await data.configurations(bus)
    if not configs:
        raise errors.BadRequest("No target", "add an OSSEA configuration first (POST /api/v1/ossea/config)")
    await data.start_replication(bus, vm_name, configs[0]["id"], create_timeout(request.app.state.settings),
                                 "incremental")
    return render(request, "_started.html", started=1, failed=[])
