"""export_manager: NBD exports with VM-based reuse (thin handlers; the logic is in service.py)."""
from __future__ import annotations

import asyncio
from typing import Any

from oma.services.export_manager import service
from oma.services.export_manager.service import (
    EnsureRequest,
    ListRequest,
    Selector,
    Snapshot,
)
from oma.shared.bus import event_envelope
from oma.shared.errors import Unavailable
from oma.shared.plugins import get_backend
from oma.shared.service import BusRequest, ServiceApp, endpoint
from oma.shared.subjects import Exports


class ExportManagerService(ServiceApp):
    name = "export_manager"
    description = "NBD exports with VM-based reuse"

    exporter: Any = None
    exports: service.ExportManager | None = None
    _periodic: asyncio.Task | None = None
    _retry: asyncio.Task | None = None

    async def setup(self) -> None:
        self.exporter = get_backend(self.pm, "exporter", self.settings.export_backend).factory(self.settings)
        self.exports = service.ExportManager(self.sessions, self.exporter, self._publish, self.log,
                                             batch_wait=self.settings.export_batch_wait)
        self.exporter_error: str | None = None
        if not await self._start_exporter():
            # The appliance still comes up (nbdkit may be installed later, the port freed): exports
            # answer 503 with the reason, /health shows it, and we keep trying.
            self._retry = asyncio.create_task(self._retry_start(10.0), name="exporter-retry")
        interval = self.settings.export_reconcile_interval
        if interval > 0:
            self._periodic = asyncio.create_task(self._reconcile_every(interval), name="export-reconcile")

    async def _start_exporter(self) -> bool:
        try:
            await self.exporter.start()
        except Unavailable as exc:
            self.exporter_error = str(exc.details or exc.error)
            self.log.error("NBD server not running; exports unavailable", extra={
                "backend": self.settings.export_backend, "reason": self.exporter_error})
            return False
        self.exporter_error = None
        report = await self.exports.reconcile()       # serve what the table says, nothing else
        self.log.info("exports reconciled at start-up", extra={
            "backend": self.exporter.name, "port": self.exporter.port, "active": report["active"],
            "readded": len(report["readded"]), "removed": len(report["removed"]),
            "missing_devices": len(report["missing_devices"])})
        return True

    async def _retry_start(self, every: float) -> None:
        while True:
            try:
                if await self._start_exporter():
                    return
            except Exception:  # noqa: BLE001 - keep trying; exports answer 503 meanwhile
                self.log.exception("NBD server start failed")
            await asyncio.sleep(every)

    async def exporter_problem(self, handshake: bool = True) -> str | None:
        """Why the NBD server does not serve (start failed, watchdog failing, process gone, no NBD
        answer on its port), or None. With `handshake` probed for real: a process squatting the port
        is not our server. Ensures skip the handshake (a burst of them would knock once each)."""
        if self.exporter_error is not None:
            return self.exporter_error
        return await self.exporter.serving_error(handshake)

    async def _exporter_ready(self, handshake: bool = True) -> dict[str, Any]:
        problem = await self.exporter_problem(handshake)
        if problem is not None:
            raise Unavailable("NBD exporter not serving", problem)
        return {"serving": True, "backend": self.exporter.name, "port": self.exporter.port,
                "tls": self.exporter.config.tls}

    async def teardown(self) -> None:
        if self._retry is not None:
            self._retry.cancel()
            await asyncio.gather(self._retry, return_exceptions=True)
        if self._periodic is not None:
            self._periodic.cancel()
            await asyncio.gather(self._periodic, return_exceptions=True)
        if self.exports is not None:
            self.exports.close()
        if self.exporter is not None:
            # keep_running leaves the server and its open NBD connections up; the next start attaches.
            await self.exporter.stop(keep_running=self.settings.nbd_keep_running)

    async def _reconcile_every(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                if self.exporter_error is None:
                    await self.exports.reconcile()
            except Exception:
                self.log.exception("periodic reconcile failed")

    async def _publish(self, action: str, m: Snapshot) -> None:
        """Sent in the background, in order: a reply need not wait for the stream's ack."""
        self.spawn(self._send(action, m))

    async def _send(self, action: str, m: Snapshot) -> None:
        payload = {**event_envelope(),
                   "export_name": m.export_name, "vm_id": m.vm_id, "disk_unit_number": m.disk_unit_number,
                   "vm_name": m.vm_name, "device_path": m.device_path, "action": action}
        try:
            await self.bus.publish_event(Exports.EVT_CHANGED, payload, msg_id=payload["event_id"])
        except Exception:
            self.log.exception("could not publish export event", extra={"export_name": m.export_name})

    async def health(self, req: BusRequest) -> dict[str, Any]:
        body = await super().health(req)
        body["exporter"] = self.exporter.state() if self.exporter is not None else None
        problem = await self.exporter_problem() if self.exporter is not None else "no exporter"
        if problem is not None:  # the gateway counts any status but "up" as down: /health 503
            body.update(status="degraded", reason=f"NBD exporter not serving: {problem}")
        return body

    @endpoint(Exports.READY)
    async def exporter_ready(self, req: BusRequest):
        """200 when the NBD server serves, else 503 with the reason: replication asks this before
        its first cloud call, so a job never provisions volumes nobody could stream into."""
        return await self._exporter_ready()

    @endpoint(Exports.ENSURE)
    async def ensure_export(self, req: BusRequest):
        await self._exporter_ready(handshake=False)
        return await self.exports.ensure(req.model(EnsureRequest))

    @endpoint(Exports.LIST)
    async def list_exports(self, req: BusRequest):
        return await self.exports.list(req.model(ListRequest))

    @endpoint(Exports.GET)
    async def get_export(self, req: BusRequest):
        return await self.exports.get(req.model(Selector))

    @endpoint(Exports.DEACTIVATE)
    async def deactivate_export(self, req: BusRequest):
        return await self.exports.deactivate(req.model(Selector))

    @endpoint(Exports.REMOVE)
    async def remove_export(self, req: BusRequest):
        return await self.exports.remove(req.model(Selector))

    @endpoint(Exports.RECONCILE)
    async def reconcile_exports(self, req: BusRequest):
        await self._exporter_ready()
        return await self.exports.reconcile()
