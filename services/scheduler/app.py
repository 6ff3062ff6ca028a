from __future__ import annotations

import asyncio
import os
import random
import secrets
import socket
from pathlib import Path
from typing import Any

from oma.services.scheduler.service import TICKS, Scheduler
from oma.shared import errors
from oma.shared.schemas import GroupRequest, PreflightRequest, ScheduleRequest
from oma.shared.service import BusRequest, ServiceApp, endpoint
from oma.shared.subjects import Scheduler as Subjects


class SchedulerService(ServiceApp):
    name = "scheduler"
    description = "Protection groups, schedules and their executions; preflight"
    migrations = Path(__file__).parent / "migrations"

    async def setup(self) -> None:
        instance = f"{socket.gethostname()[:64]}-{os.getpid()}-{secrets.token_hex(3)}"
        self.scheduler = Scheduler(settings=self.settings, bus=self.bus, sessions=self.sessions, log=self.log,
                                   instance=instance, spawn=self.spawn)
        # Not `spawn`ed: shutdown must not wait for its sleep; teardown cancels it.
        self._rounds = asyncio.create_task(self._run(self.settings.scheduler_tick))
        self.log.info("scheduler running", extra={"instance": instance, "tick": self.settings.scheduler_tick})

    async def teardown(self) -> None:
        self._rounds.cancel()
        await asyncio.gather(self._rounds, return_exceptions=True)

    async def _run(self, every: float) -> None:
        while True:
            try:
                await self.scheduler.tick()
                TICKS.labels(result="ok").inc()
            except Exception:  # noqa: BLE001 - e.g. a database hiccup: the next round tries again
                TICKS.labels(result="error").inc()
                self.log.exception("scheduler round failed")
            # Jittered: copies sharing a database, and pollers on a fixed period, do not stay in step.
            await asyncio.sleep(every * random.uniform(0.75, 1.25))

    @endpoint(Subjects.GROUPS)
    async def groups(self, req: BusRequest):
        return await self.scheduler.groups(req.model(GroupRequest))

    @endpoint(Subjects.SCHEDULES)
    async def schedules(self, req: BusRequest):
        return await self.scheduler.schedules(req.model(ScheduleRequest))

    @endpoint(Subjects.EXECUTIONS)
    async def executions(self, req: BusRequest) -> dict[str, Any]:
        q = req.json()
        if not isinstance(q, dict):
            raise errors.BadRequest("Validation failed", "expected a JSON object")
        return await self.scheduler.executions(q)

    @endpoint(Subjects.PREFLIGHT)
    async def preflight(self, req: BusRequest):
        return await self.scheduler.preflight(req.model(PreflightRequest))
