from __future__ import annotations

from typing import Any

from oma.services.config import service
from oma.shared import errors
from oma.shared.actions import given, run_action
from oma.shared.plugins import get_backend
from oma.shared.schemas import OsseaConfigRequest
from oma.shared.service import BusRequest, ServiceApp, endpoint
from oma.shared.subjects import Config, Failover, Replication

MAX_JOBS_NAMED = 20  # in a 409's details
# Who keeps jobs that need a configuration's credentials, and how an operator frees it.
USERS_OF_CONFIG = (
    ("replication", Replication.USING_CONFIG,
     "delete them first (DELETE /api/v1/replication/jobs/{job_id}), which releases their volumes"),
    ("failover", Failover.USING_CONFIG,
     "clean up the test failovers and roll back the live ones first (POST /api/v1/failover), or let the "
     "running ones finish"))


class ConfigService(ServiceApp):
    name = "config"
    description = "OSSEA (CloudStack) configuration"

    async def setup(self) -> None:
        self.store = service.Configs(self.keys)
        # Resolved now, so a misconfigured backend name fails at start-up, not at the first test.
        self.cloud = get_backend(self.pm, "cloud", self.settings.cloud_backend)

    @endpoint(Config.ACTION)
    async def action(self, req: BusRequest):
        body = req.model(OsseaConfigRequest)
        values = given(body.configuration)
        if body.action == "test":
            return await self._test(body.id, values)
        if body.action == "delete" and body.id is not None:
            await self._refuse_if_used(body.id)
        return await run_action(self.sessions, self.store, body.action, body.id, values, self._changed)

    async def _test(self, config_id: int | None, values: dict[str, Any]) -> dict[str, Any]:
        """With an id: the stored configuration, overridden by any given field. The session is
        closed before the cloud is called."""
        if config_id is None and not values:
            raise errors.BadRequest("Missing required fields", "test needs a configuration or an id")
        if config_id is not None:
            async with self.sessions() as db:
                stored = service.credentials(await self.store.load(db, config_id), self.keys)
            values = self.store.merge_for_test(stored, values)
        try:
            return await service.test_connection(lambda creds: self.cloud.factory(creds, self.settings),
                                                 values, self.settings.cloud_timeout)
        except errors.OmaError as exc:
            self.log.info("ossea connection test failed", extra={"config_id": config_id, "status": exc.status,
                                                                 "error": exc.error})
            raise

    async def _refuse_if_used(self, config_id: int) -> None:
        """409 while a job needs the configuration: cleaning up a replication job (detaching and
        deleting its volumes), or a failover's cleanup or rollback, needs the cloud's credentials. The
        services that keep those jobs are asked; when one cannot answer, nothing is deleted. An unknown
        id is a 404 first."""
        async with self.sessions() as db:
            await self.store.load(db, config_id)
        for service_name, subject, way_out in USERS_OF_CONFIG:
            try:
                reply = await self.bus.call(subject, {"ossea_config_id": config_id})
            except (errors.Unavailable, errors.UpstreamTimeout) as exc:
                raise errors.Unavailable("Cannot check whether jobs use the configuration",
                                         f"{exc.details}; a configuration is deleted only once the {service_name} "
                                         "service confirms that no job uses it") from None
            jobs = reply["job_ids"]
            if jobs:
                named = ", ".join(jobs[:MAX_JOBS_NAMED]) + (
                    f" and {len(jobs) - MAX_JOBS_NAMED} more" if len(jobs) > MAX_JOBS_NAMED else "")
                raise errors.Conflict("Configuration in use",
                                      f"OSSEA configuration {config_id} is used by {service_name} jobs: {named}; "
                                      f"{way_out}")

    async def _changed(self, row: Any, action: str) -> None:
        service.CHANGES.labels(action=action).inc()
        self.log.info("ossea configuration changed",
                      extra={"config_id": row.id, "config_name": row.name, "action": action})
        try:
            await self.bus.publish_event(Config.EVT_CHANGED, service.event(row, action))
        except Exception as exc:  # noqa: BLE001 - the change is committed; say so rather than fail
            self.log.warning("could not publish the configuration change",
                             extra={"config_id": row.id, "reason": type(exc).__name__})

    @endpoint(Config.CREDENTIALS)
    async def credentials(self, req: BusRequest):
        body = req.model(service.CredentialsRequest)
        async with self.sessions() as db:
            return service.credentials(await self.store.load(db, body.id), self.keys)
