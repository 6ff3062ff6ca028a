"""What the pages show, read over the bus with the same requests as the API routes."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import orjson

from oma.services.gateway.fastpath import context_read
from oma.services.gateway.ui.render import STATUS, vm_view
from oma.shared import errors
from oma.shared.subjects import Auth, Config, Contexts, Failover, Inventory, Replication

PAGE_SIZES = (25, 50, 100)
# The list request pages by name only; a name filter or another order reads the whole list,
# at most this many VMs (1,000 per request), and pages it here.
SCAN_LIMIT = 10_000
SORT_KEYS = {"name": lambda c: c["vm_name"],
             "status": lambda c: (c["current_status"], c["vm_name"]),
             "progress": lambda c: (c.get("progress_percent") or 0.0, c["vm_name"])}


class Bus:
    """The gateway's bus for the pages, with the context reads answered from the gateway's copy of
    the aggregator's replies when nothing changed since (as the API's fast path answers them)."""

    def __init__(self, state: Any):
        self.state, self.bus, self.timeout = state, state.bus, state.bus.timeout

    async def call(self, subject: str, payload: Any = None, **kw: Any) -> Any:
        if subject in (Contexts.LIST, Contexts.GET):
            return orjson.loads(await context_read(self.state, subject, payload))
        return await self.bus.call(subject, payload, **kw)


@dataclass
class Query:
    q: str = ""
    status: str = ""
    sort: str = "name"
    desc: bool = False
    page: int = 1
    size: int = PAGE_SIZES[0]

    @property
    def filtered(self) -> bool:
        return bool(self.q or self.status)

    def params(self, **changes: Any) -> dict[str, Any]:
        """The query string of this view with some fields changed (links, sort buttons)."""
        out = {"q": self.q, "status": self.status, "sort": ("-" if self.desc else "") + self.sort,
               "page": self.page, "size": self.size, **changes}
        return {k: v for k, v in out.items() if v not in ("", None)}


async def counters(bus: Bus) -> dict[str, int]:
    """VMs per status (the list's `total` for each status filter, which the service caches)."""
    totals = await asyncio.gather(*(bus.call(Contexts.LIST, {"status": s, "limit": 1, "offset": 0}) for s in STATUS))
    return {s: t["total"] for s, t in zip(STATUS, totals)}


async def _scan(bus: Bus, status: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    while len(out) < SCAN_LIMIT:
        page = await bus.call(Contexts.LIST, {**({"status": status} if status else {}), "limit": 1000,
                                              "offset": len(out)})
        out += page["vm_contexts"]
        if len(out) >= page["total"] or not page["vm_contexts"]:
            break
    return out


async def details(bus: Bus, names: list[str]) -> list[dict[str, Any]]:
    """Each VM's full context: the list lacks throughput, ETA and the last sync."""
    bodies = await asyncio.gather(*(bus.call(Contexts.GET, {"vm_name": n}) for n in names),
                                  return_exceptions=True)
    return [vm_view(b) for b in bodies if isinstance(b, dict)]  # a VM gone meanwhile is left out


async def vm_page(bus: Bus, query: Query) -> tuple[list[dict[str, Any]], int]:
    """One page of VM rows and the number of VMs matching the filters."""
    offset = (query.page - 1) * query.size
    if not query.q and query.sort == "name" and not query.desc:  # the service's own order and paging
        page = await bus.call(Contexts.LIST, {**({"status": query.status} if query.status else {}),
                                              "limit": query.size, "offset": offset})
        return await details(bus, [c["vm_name"] for c in page["vm_contexts"]]), page["total"]
    rows = await _scan(bus, query.status)
    if query.q:
        needle = query.q.casefold()
        rows = [c for c in rows if needle in c["vm_name"].casefold()]
    rows.sort(key=SORT_KEYS[query.sort], reverse=query.desc)
    return await details(bus, [c["vm_name"] for c in rows[offset:offset + query.size]]), len(rows)


async def configurations(bus: Bus) -> list[dict[str, Any]]:
    return (await bus.call(Config.ACTION, {"action": "get"}))["configurations"]


async def start_replication(bus: Bus, vm_name: str, config_id: int, timeout: float,
                            kind: str = "initial") -> dict[str, Any]:
    """The inventory's record of the VM, posted as POST /api/v1/replications would be (and with its
    timeout, `routers.replications.create_timeout`); `kind` is the replication_type."""
    listed = (await bus.call(Inventory.LIST, {"name": vm_name, "limit": 1000}))["vms"]
    vm = next((v for v in listed if v["name"] == vm_name), None)
    if vm is None:
        raise errors.NotFound("VM not in the inventory", f"{vm_name!r}: run discovery for its vCenter first")
    return await bus.call(Replication.CREATE, {"source_vm": vm, "ossea_config_id": config_id,
                                               "replication_type": kind}, timeout=timeout)


# --- discovery, jobs, settings ----------------------------------------------------------------
async def vcenters(bus: Bus) -> list[dict[str, Any]]:
    return (await bus.call(Inventory.VCENTER_ACTION, {"action": "get"}))["configurations"]


async def inventory_page(bus: Bus, vcenter: str, q: str, page: int, size: int) -> dict[str, Any]:
    """One page of a vCenter's stored inventory (gone VMs too), each VM with its context's row
    view (`row`; a VM whose context is not built yet shows as discovered)."""
    listed = await bus.call(Inventory.LIST, {"vcenter": vcenter, "include_gone": True, "limit": size,
                                             "offset": (page - 1) * size, **({"name": q} if q else {})})
    views = {v["name"]: v for v in await details(bus, [vm["name"] for vm in listed["vms"]])}
    for vm in listed["vms"]:
        vm["disk_gb"] = sum(d.get("size_gb") or 0 for d in vm.get("disks") or ())
        vm["row"] = views.get(vm["name"]) or vm_view({"context": {"vm_name": vm["name"],
                                                                  "current_status": "discovered"}})
    return listed


async def jobs_page(bus: Bus, kind: str, status: str, vm_name: str, page: int, size: int) -> dict[str, Any]:
    """Replication or failover jobs, newest first, as GET /replication/jobs or /failover/jobs."""
    q = {"limit": size, "offset": (page - 1) * size, **({"status": status} if status else {}),
         **({"vm_name": vm_name} if vm_name else {})}
    return await bus.call(Replication.LIST if kind == "replication" else Failover.LIST, q)


async def failovers(bus: Bus, vm_name: str) -> list[dict[str, Any]] | None:
    """The VM's last 20 failovers; None when the failover service does not answer (the rest of
    the VM page is still worth showing)."""
    try:
        return (await bus.call(Failover.LIST, {"vm_name": vm_name, "limit": 20}))["jobs"]
    except errors.Unavailable:
        return None


async def settings_page(bus: Bus) -> dict[str, Any]:
    """Every configuration as the API answers it: secrets come back redacted from the services."""
    ossea, vcs, vmas, maps = await asyncio.gather(
        configurations(bus), vcenters(bus), bus.call(Auth.APPLIANCE_ACTION, {"action": "get"}),
        bus.call(Failover.MAPPINGS, {"action": "get"}))
    return {"ossea": ossea, "vcenters": vcs, "appliances": vmas["appliances"], "mappings": maps["mappings"]}
