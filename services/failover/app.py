from __future__ import annotations

from pathlib import Path

from oma.services.failover.service import Failovers
from oma.shared import errors
from oma.shared.schemas import FailoverRequest, NetworkMappingRequest
from oma.shared.service import BusRequest, ServiceApp, endpoint
from oma.shared.subjects import Failover


class FailoverService(ServiceApp):
    name = "failover"
    description = "Failover jobs: test failover and cleanup through a resumable, compensating step engine"
    migrations = Path(__file__).parent / "migrations"

    async def setup(self) -> None:
        self.failovers = Failovers(self)
        await self.failovers.recover()  # jobs a stop (or kill -9) interrupted resume now

    async def stop(self) -> None:
        # A step records what it is about to do before doing it and resumes on the next start (as
        # after kill -9), so a stop does not wait out one that may last an hour (a quiesce, a conversion).
        failovers = getattr(self, "failovers", None)
        if failovers is not None:
            failovers.interrupt()
        await super().stop()

    @endpoint(Failover.ACTION)
    async def action(self, req: BusRequest):
        return await self.failovers.action(req.model(FailoverRequest))

    @endpoint(Failover.LIST)
    async def list_jobs(self, req: BusRequest):
        return await self.failovers.list(req.json())

    @endpoint(Failover.GET)
    async def get(self, req: BusRequest):
        failover_id = str(req.json().get("failover_id") or "")
        if not failover_id or len(failover_id) > 64:
            raise errors.BadRequest("Validation failed", "failover_id: required, at most 64 characters")
        return await self.failovers.get(failover_id)

    @endpoint(Failover.MAPPINGS)
    async def mappings(self, req: BusRequest):
        return await self.failovers.mappings(req.model(NetworkMappingRequest))

    @endpoint(Failover.USING_CONFIG)
    async def using_config(self, req: BusRequest):
        """The failovers that still need OSSEA configuration N (the config service refuses to delete it
        while any do): running or compensating, holding a VM (a test VM up, a VM failed over, a cleanup or
        rollback to run again), or whose compensation failed (cloud objects may be left)."""
        config_id = req.json().get("ossea_config_id")
        if type(config_id) is not int:
            raise errors.BadRequest("Validation failed", "ossea_config_id: an integer is required")
        return {"success": True, "job_ids": await self.failovers.using_config(config_id)}
