from __future__ import annotations

from pathlib import Path
from typing import Any

from services.config import service
from shared import errors
from shared.bus import Reply
from shared.crypto import Keyring
from shared.plugins import get_backend
from shared.schemas import OsseaConfigRequest
from shared.service import BusRequest, ServiceApp, endpoint
from shared.subjects import Config


class ConfigService(ServiceApp):
    name = "config"
    description = "OSSEA (CloudStack) configuration"
    migrations = Path(__file__).parent / "migrations"

    async def setup(self) -> None:
        self.keys = Keyring.from_file(self.settings.secret_key_path)
        # Resolved now, so a misconfigured backend name fails at start-up, not at the first test.
        self.cloud = get_backend(self.pm, "cloud", self.settings.cloud_backend)

    @endpoint(Config.ACTION)
    async def action(self, req: BusRequest):
        body = req.model(OsseaConfigRequest)
        values = service.given(body.configuration)
        if body.action == "get":
            async with self.sessions() as db:
                if body.id is None:
                    return {"success": True, "configurations": await service.list_configs(db)}
                return {"success": True, "configuration": service.public(await service.load(db, body.id))}
        if body.action == "create":
            if body.id is not None:
                raise errors.BadRequest("Validation failed", "id: not allowed with create (ids are assigned)")
            async with self.sessions.begin() as db:
                row = await service.create(db, self.keys, values)
            await self._changed(row, "create")
            return Reply({"success": True, "message": "Configuration created successfully",
                          "configuration": service.public(row)}, status=201)
        if body.action == "update":
            async with self.sessions.begin() as db:
                row = await service.update(db, self.keys, service.require_id(body.id, "update"), values)
            await self._changed(row, "update")
            return {"success": True, "message": "Configuration updated successfully",
                    "configuration": service.public(row)}
        if body.action == "delete":
            async with self.sessions.begin() as db:
                row = await service.delete(db, service.require_id(body.id, "delete"))
            await self._changed(row, "delete")
            return {"success": True, "message": f"Configuration {row.name!r} (ID {row.id}) deleted", "id": row.id}
        return await self._test(body.id, values)

    async def _test(self, config_id: int | None, values: dict[str, Any]) -> dict[str, Any]:
        """With an id: the stored configuration, overridden by any given field. The session is
        closed before the cloud is called."""
        if config_id is None and not values:
            raise errors.BadRequest("Missing required fields", "test needs a configuration or an id")
        if config_id is not None:
            async with self.sessions() as db:
                stored = service.credentials(await service.load(db, config_id), self.keys)
            values = {**stored, **values}
        try:
            return await service.test_connection(lambda creds: self.cloud.factory(creds, self.settings),
                                                 values, self.settings.cloud_timeout)
        except errors.OmaError as exc:
            self.log.info("ossea connection test failed", extra={"config_id": config_id, "status": exc.status,
                                                                 "error": exc.error})
            raise

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
            return service.credentials(await service.load(db, body.id), self.keys)
