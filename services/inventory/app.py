from __future__ import annotations

import asyncio
import time
from typing import Any

from oma.services.inventory import service
from oma.shared import errors
from oma.shared.actions import given, require, run_action
from oma.shared.bus import Reply, dumps
from oma.shared.contracts import SourceAuthError, SourceUnreachable
from oma.shared.plugins import get_backend
from oma.shared.schemas import VCenterRequest
from oma.shared.service import BusRequest, ServiceApp, endpoint
from oma.shared.subjects import Auth, Inventory

CONNECTION_FIELDS = ("host", "port", "username", "password", "datacenter", "verify_tls")
PUBLISH_BATCH = 256  # events published concurrently at a time
# Metric label of a failed discovery, by error class (bounded, never a message).
_RESULTS: tuple[tuple[type[Exception], str], ...] = (
    (SourceAuthError, "auth_failed"), (SourceUnreachable, "unreachable"), (errors.NotFound, "not_found"))


class InventoryService(ServiceApp):
    name = "inventory"
    description = "vCenter connections and the source VM inventory"

    async def setup(self) -> None:
        self.store = service.VCenters(self.keys)
        # Resolved now, so a misconfigured source name fails at start-up, not at the first discovery.
        self.source = get_backend(self.pm, "inventory", self.settings.inventory_source)
        self.reads = 0  # vCenter inventory reads made (concurrent discoveries of one vCenter share one)
        self._inflight: dict[str, asyncio.Task] = {}
        self._publishing: dict[str, asyncio.Task] = {}  # the last event batch of each vCenter

    async def _source(self, conn: dict[str, Any]) -> Any:
        """The configured source, or the `vma` source when the vCenter is reached through a VMA."""
        if conn.get("appliance_id"):
            conn = {**conn, "api_url": await self.appliance_url(conn["appliance_id"])}
            return get_backend(self.pm, "inventory", "vma").factory(conn, self.settings)
        return self.source.factory({k: conn[k] for k in CONNECTION_FIELDS if conn.get(k) is not None},
                                   self.settings)

    async def appliance_url(self, appliance_id: str) -> str:
        reply = await self.bus.call(Auth.APPLIANCE_GET, {"appliance_id": appliance_id})
        return reply["appliance"]["api_url"]

    async def _stored(self, req: BusRequest) -> dict[str, Any]:
        """The decrypted connection of the vCenter the request names (host or name), else 404."""
        return await self._connection(req.model(service.DiscoverRequest).vcenter)

    @endpoint(Inventory.CONNECTION)
    async def vcenter_connection(self, req: BusRequest):
        """A vCenter's decrypted connection and its VMA's API URL, for replication (never the gateway)."""
        conn = await self._stored(req)
        if conn["appliance_id"]:
            conn["api_url"] = await self.appliance_url(conn["appliance_id"])
        return {"success": True, "connection": conn}

    # -- vCenter connections: the anti-sprawl `action` endpoint ---------------------------------

    @endpoint(Inventory.VCENTER_ACTION)
    async def vcenter_action(self, req: BusRequest):
        body = req.model(VCenterRequest)
        values = given(body.configuration)
        if body.action == "test":
            return await self._test(body.id, values)
        return await run_action(self.sessions, self.store, body.action, body.id, values, self._changed)

    async def _changed(self, row: Any, action: str) -> None:
        service.CONFIG_CHANGES.labels(action=action).inc()
        self.log.info("vcenter configuration changed", extra={"config_id": row.id, "vcenter": row.host,
                                                              "action": action})

    async def _test(self, config_id: int | None, values: dict[str, Any]) -> dict[str, Any]:
        """Log in and count the VMs. With an id: the stored connection, overridden by any given
        field. The session is closed before vCenter is called."""
        if config_id is None and not values:
            raise errors.BadRequest("Missing required fields", "test needs a configuration or an id")
        if config_id is not None:
            async with self.sessions() as db:
                stored = service.connection(await self.store.load(db, config_id), self.keys)
            values = self.store.merge_for_test(stored, values)
        require(values, service.CREATE_REQUIRED, "test")
        try:
            found = await (await self._source(values)).test()
        except errors.OmaError as exc:
            self.log.info("vcenter connection test failed", extra={"vcenter": values["host"], "status": exc.status,
                                                                   "error": exc.error})
            raise
        return {"success": True, "message": "vCenter connection test successful",
                "details": {"host": values["host"], "api_version": found["api_version"],
                            "vm_count": found["vm_count"], "about": found.get("about")}}

    # -- discovery -----------------------------------------------------------------------------

    async def _connection(self, vcenter: str) -> dict[str, Any]:
        """The decrypted connection of a vCenter (host or name), else 404."""
        async with self.sessions() as db:
            row = await service.find(db, vcenter)
            if row is None:
                raise errors.NotFound("vCenter not found",
                                      f"No vCenter configuration with host or name {vcenter!r}; create one "
                                      "with POST /api/v1/vcenter/config")
            return service.connection(row, self.keys)

    @endpoint(Inventory.POWER)
    async def power(self, req: BusRequest):
        """Power a source VM off (guest shutdown, then hard) or on: failover's cutover and rollback."""
        body = req.model(service.PowerRequest)
        conn = await self._connection(body.vcenter)
        source = await self._source(conn)
        on = None if body.action == "state" else body.action == "on"
        result = await source.power(body.vm_id, on, body.shutdown_timeout)
        if on is not None:
            self.log.info("source VM power changed", extra={"vcenter": body.vcenter, **result})
            await self._power_changed(conn["host"], body.vm_id, result.get("power_state"))
        return {"success": True, **result}

    async def _power_changed(self, host: str, vm_id: str, state: str | None) -> None:
        """The stored VM, and the VM contexts through a `changed` event, follow a power action at
        once (the GUI showed the last discovery's state after a rollback until the next one)."""
        if not state:
            return
        async with self.sessions.begin() as db:
            vm = await service.set_power_state(db, host, vm_id, state)
        if vm is None:
            return
        ev = service.event(host, vm, "changed")
        try:
            await self.bus.publish_event(Inventory.EVT_DISCOVERED, ev, msg_id=ev["event_id"])
        except Exception as exc:  # noqa: BLE001 - stored already; the next discovery tells it again
            self.log.warning("could not publish a power change", extra={"vcenter": host, "reason": type(exc).__name__})

    @endpoint(Inventory.DISCOVER)
    async def discover(self, req: BusRequest):
        conn = await self._stored(req)
        host = conn["host"]
        # One read per vCenter at a time: a request that arrives meanwhile shares its result.
        task = self._inflight.get(host)
        if task is None:
            task = self.spawn(self._discover(conn))
            self._inflight[host] = task
            task.add_done_callback(lambda t: self._inflight.pop(host, None) if self._inflight.get(host) is t else None)
            task.add_done_callback(lambda t: t.cancelled() or t.exception())  # retrieved even if all waiters left
        else:
            self.log.info("discovery already running: sharing its result", extra={"vcenter": host})
        return Reply(self._fit(await asyncio.shield(task)))

    async def _discover(self, conn: dict[str, Any]) -> dict[str, Any]:
        host = conn["host"]
        started = time.perf_counter()
        result = "error"
        try:
            self.reads += 1
            self.log.info("discovery started", extra={"vcenter": host})
            found = await (await self._source(conn)).discover()
            read_s = time.perf_counter() - started
            self.log.info("discovery read", extra={"vcenter": host, "vms": len(found), "seconds": round(read_s, 3)})
            async with self.sessions.begin() as db:
                res = await service.upsert(db, host, found)
            async with self.sessions() as db:
                gone = await service.vms_by_key(db, host, res.gone) if res.gone else []
                present = await service.count_present(db)
            skipped = set(res.duplicates)
            vms = [service.discovered(host, vm, res.change[key], res.first_seen[key], res.seen_at)
                   for vm in found if vm["id"] not in skipped for key in (service.vm_key(vm),)]
            if skipped:
                self.log.warning("VMs with a repeated instance UUID skipped", extra={"vcenter": host,
                                                                                     "vms": sorted(skipped)})
            changes = [(vm, vm["change"]) for vm in vms if vm["change"] != "unchanged"] + [(vm, "gone") for vm in gone]
            if changes:  # after the reply; each vCenter's batches in discovery order
                self._publishing[host] = self.spawn(self._publish(host, changes, self._publishing.get(host)))
            seconds = time.perf_counter() - started
            summary = {"found": len(vms), "new": res.count("new"), "changed": res.count("changed"),
                       "gone": len(res.gone), "unchanged": res.count("unchanged"), "seconds": round(seconds, 3)}
            self.log.info("discovery stored", extra={"vcenter": host, **summary,
                                                     "store_seconds": round(seconds - read_s, 3)})
            service.DISCOVERED_VMS.set(present)
            result = "success"
            return {"success": True, "vcenter": host, "vms": vms, "summary": summary}
        except errors.OmaError as exc:
            result = next((label for cls, label in _RESULTS if isinstance(exc, cls)), "error")
            self.log.warning("discovery failed", extra={"vcenter": host, "status": exc.status, "error": exc.error,
                                                        "details": exc.details})
            raise
        finally:
            service.DISCOVERIES.labels(result=result).inc()
            service.DISCOVERY_SECONDS.observe(time.perf_counter() - started)

    async def _publish(self, host: str, changes: list[tuple[dict[str, Any], str]],
                       previous: asyncio.Task | None) -> None:
        """One event per new, changed or gone VM, published concurrently in batches, once the
        previous discovery's events are out. The store is committed already: a failed publish is
        logged, not raised."""
        if previous is not None:
            await asyncio.gather(previous, return_exceptions=True)
        failed = 0
        for i in range(0, len(changes), PUBLISH_BATCH):
            events = [service.event(host, vm, change) for vm, change in changes[i:i + PUBLISH_BATCH]]
            results = await asyncio.gather(*(self.bus.publish_event(Inventory.EVT_DISCOVERED, e, msg_id=e["event_id"])
                                             for e in events), return_exceptions=True)
            failed += sum(1 for r in results if isinstance(r, BaseException))
        if failed:
            self.log.warning("could not publish some discovery events", extra={"vcenter": host, "failed": failed,
                                                                               "events": len(changes)})

    def _fit(self, reply: dict[str, Any]) -> bytes:
        """The reply as bytes, within the bus's largest message: a very large inventory is answered
        with the VMs' identities only (the full records are one GET /api/v1/vms away)."""
        body = dumps(reply)
        limit = self.bus.nc.max_payload - 4096  # headers
        if len(body) <= limit:
            return body
        brief = [{k: vm[k] for k in ("id", "uuid", "name", "path", "datacenter", "power_state", "change")}
                 for vm in reply["vms"]]
        reply = {**reply, "vms": brief, "vms_detail": "brief: the full records are listed by GET /api/v1/vms"}
        body = dumps(reply)
        while len(body) > limit and reply["vms"]:
            reply["vms"] = reply["vms"][:len(reply["vms"]) * 3 // 4]
            reply["vms_detail"] = (f"first {len(reply['vms'])} of {reply['summary']['found']} VMs, brief: "
                                   "the full records are listed by GET /api/v1/vms")
            body = dumps(reply)
        return body

    # -- reading the inventory -----------------------------------------------------------------

    @endpoint(Inventory.LIST)
    async def list_vms(self, req: BusRequest):
        q = req.model(service.ListRequest)
        async with self.sessions() as db:
            vcenters = ()
            if q.vcenter is not None:
                row = await service.find(db, q.vcenter)
                vcenters = (q.vcenter,) if row is None else (q.vcenter, row.host)
            return await service.list_vms(db, q, vcenters)

    @endpoint(Inventory.GET)
    async def get_vm(self, req: BusRequest):
        body = req.model(service.GetRequest)
        async with self.sessions() as db:
            return {"success": True, "vm": await service.get_vm(db, body.id)}
