from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout
from sqlalchemy import or_, select

from oma.services.replication import admission, handover
from oma.services.replication.models import IN_FLIGHT, JobVolume, ReplicationJob
from oma.services.replication import changeids
from oma.services.replication.driver import VmaDriver
from oma.services.replication.service import Replicator
from oma.shared import errors
from oma.shared.schemas import ProgressReport, ReplicationRequest
from oma.shared.service import BusRequest, ServiceApp, endpoint
from oma.shared.subjects import Replication


class ReplicationService(ServiceApp):
    name = "replication"
    description = "Replication jobs: volumes, attachments, exports, progress"
    migrations = Path(__file__).parent / "migrations"

    # The services recovery and provisioning call; start-up waits for them (bounded, logged).
    needs = ("config", "export_manager")

    async def setup(self) -> None:
        self.jobs = Replicator(settings=self.settings, bus=self.bus, sessions=self.sessions, log=self.log,
                               pm=self.pm, spawn=self.spawn)
        self.jobs.driver = VmaDriver(self.jobs, self.pm)  # issue 16: syncs started and followed through the VMA
        # In the background: recovery needs the config and export services, which may start after us.
        # Not `spawn`ed: shutdown must not wait for their sleeps; teardown cancels them.
        self._janitors = [asyncio.create_task(self._recover()), asyncio.create_task(self._leases())]
        if self.settings.volume_sweep_interval > 0:
            self._janitors.append(asyncio.create_task(self._sweep(self.settings.volume_sweep_interval)))

    async def teardown(self) -> None:
        for task in self._janitors:
            task.cancel()
        await asyncio.gather(*self._janitors, return_exceptions=True)
        await self.jobs.driver.close()

    async def wait_for_services(self) -> list[str]:
        """Until each service in `needs` answers `$SRV.PING.<name>`, at most `dependency_wait`
        seconds; returns those still silent (work then goes on: bus calls wait for them too)."""
        deadline = time.monotonic() + self.settings.dependency_wait
        missing = list(self.needs)
        logged = 0.0
        while missing:
            for name in list(missing):
                try:
                    await self.bus.nc.request(f"$SRV.PING.{name}", b"", timeout=1.0)
                    missing.remove(name)
                except (NoRespondersError, NatsTimeout):
                    pass
            if not missing or time.monotonic() >= deadline:
                break
            if time.monotonic() - logged >= 10:
                logged = time.monotonic()
                self.log.info("start-up waits for services", extra={"services": missing})
            await asyncio.sleep(0.5)
        if missing:
            self.log.warning("services still not answering; going on", extra={"services": missing})
        return missing

    async def _recover(self) -> None:
        interval = self.settings.cleanup_retry_interval
        await self.wait_for_services()
        for attempt in range(30):
            try:
                await self.jobs.recover()
                break
            except errors.Unavailable as exc:  # a service we need is not up yet
                self.log.info("recovery waits for a service", extra={"attempt": attempt, "reason": str(exc)})
                await asyncio.sleep(1.0)
            except Exception:  # noqa: BLE001 - e.g. a database hiccup: log, and the cleanup loop goes on
                self.log.exception("recovery failed; unfinished cleanups are retried below")
                break
        # Cleanups that could not finish (cloud or config down) are retried until they do.
        while True:
            await asyncio.sleep(interval)
            try:
                left = await self.jobs.retry_cleanups()
            except Exception:  # noqa: BLE001 - keep the janitor alive; it logs and tries again
                self.log.exception("cleanup retry failed")
                continue
            if left:
                self.log.warning("cleanups still pending", extra={"jobs": left})

    async def _leases(self) -> None:
        """Renew the claims on the jobs this process provisions; resume those whose process died."""
        interval = self.settings.provision_lease / 3
        while True:
            await asyncio.sleep(interval)
            try:
                await self.jobs.renew_leases()
                await self.jobs.resume_lapsed()
            except Exception:  # noqa: BLE001 - e.g. a database hiccup: the next round tries again
                self.log.exception("lease round failed")

    async def _sweep(self, interval: float) -> None:
        """Volumes OMA made that no row holds (docs/replication.md), every `volume_sweep_interval`."""
        while True:
            await asyncio.sleep(interval)
            try:
                await self.jobs.sweep_orphans()
            except Exception:  # noqa: BLE001 - keep the sweep alive; it logs and tries again
                self.log.exception("orphan sweep failed")

    async def health(self, req: BusRequest) -> dict[str, Any]:
        """Adds the VMAs the running syncs depend on, and each appliance VM's disk capacity
        (configured, learnt from the cloud, held). Both are warnings, not `down`: replication serves."""
        body = await super().health(req)
        warnings = []
        body["vmas"] = vmas = self.jobs.driver.health()
        if vmas["waiting_jobs"]:
            warnings.append(f"VMA unreachable: {', '.join(vmas['unreachable'])} "
                            f"({vmas['waiting_jobs']} running job(s) wait on it)")
        try:
            async with self.sessions() as db:
                body["appliance_vms"] = await admission.report(db, self.settings)
            # A capacity below the setting is the operator's news.
            warnings += [f"appliance VM {a['oma_vm_id']} holds at most {a['capacity']} data disks for replication "
                         f"(OMA_MAX_ATTACHED_DISKS={a['configured']}; the cloud refused more)"
                         for a in body["appliance_vms"] if a["capacity"] < a["configured"]]
        except Exception as exc:  # noqa: BLE001 - the database line above already says it is down
            body["appliance_vms"] = None
            self.log.debug("capacity report unavailable", extra={"reason": type(exc).__name__})
        if warnings:
            body["warning"] = "; ".join(warnings)
        return body

    @staticmethod
    def _job_id(req: BusRequest) -> str:
        job_id = str(req.json().get("job_id") or "")
        if not job_id or len(job_id) > 64:
            raise errors.BadRequest("Validation failed", "job_id: required, at most 64 characters")
        return job_id

    @endpoint(Replication.CREATE)
    async def create(self, req: BusRequest):
        return await self.jobs.create(req.model(ReplicationRequest))

    @endpoint(Replication.PREFLIGHT)
    async def preflight(self, req: BusRequest):
        """The checks create would run for this request (shared/preflight.py), without creating."""
        body = req.model(ReplicationRequest)
        creds = await self.jobs.credentials(body.ossea_config_id, wait=False)
        return {"success": True, "vm_name": body.source_vm.name,
                "checks": await self.jobs.preflight(body, creds)}

    @endpoint(Replication.LIST)
    async def list_jobs(self, req: BusRequest):
        return await self.jobs.list(req.json())

    @endpoint(Replication.GET)
    async def get(self, req: BusRequest):
        return await self.jobs.get(self._job_id(req))

    @endpoint(Replication.PROGRESS)
    async def progress(self, req: BusRequest):
        payload = dict(req.json())
        job_id = self._job_id(req)
        payload.pop("job_id", None)
        return await self.jobs.progress(job_id, req.model(ProgressReport, payload))

    @endpoint(Replication.CANCEL)
    async def cancel(self, req: BusRequest):
        return await self.jobs.cancel(self._job_id(req))

    @endpoint(Replication.CHANGEID_GET)
    async def changeid_get(self, req: BusRequest):
        return await changeids.lookup(self.sessions, req.model(changeids.ChangeIdQuery))

    @endpoint(Replication.CHANGEID_RECORD)
    async def changeid_record(self, req: BusRequest):
        body = req.model(changeids.ChangeIdRecord)
        reply = await changeids.record(self.sessions, body)
        self.jobs.driver.nudge(body.job_id)  # the copy is done: its completion is near
        return reply

    @endpoint(Replication.USING_CONFIG)
    async def using_config(self, req: BusRequest):
        """The jobs that still need OSSEA configuration N: in flight, holding volumes (and their
        exports), or with a cleanup left to do. The config service refuses to delete it while any do."""
        config_id = req.json().get("ossea_config_id")
        if type(config_id) is not int:
            raise errors.BadRequest("Validation failed", "ossea_config_id: an integer is required")
        holding = select(JobVolume.job_id).where(JobVolume.holds_volume.is_(True))
        async with self.sessions() as db:
            jobs = (await db.scalars(select(ReplicationJob.job_id).where(
                ReplicationJob.ossea_config_id == config_id,
                or_(ReplicationJob.status.in_(IN_FLIGHT), ReplicationJob.cleanup_pending.is_(True),
                    ReplicationJob.job_id.in_(holding))).order_by(ReplicationJob.id))).all()
        return {"success": True, "job_ids": list(jobs)}

    @endpoint(Replication.HANDOVER)
    async def hand_over(self, req: BusRequest):
        """Failover's live cutover takes the VM's replica volumes (handover.py)."""
        return await self.jobs.hand_over(req.model(handover.HandoverRequest))

    @endpoint(Replication.QUIESCE)
    async def quiesce(self, req: BusRequest):
        """A test failover pauses the VM's syncs while it snapshots the replica (handover.py)."""
        return await self.jobs.quiesce(req.model(handover.HandoverRequest))

    @endpoint(Replication.RESUME)
    async def resume(self, req: BusRequest):
        return await self.jobs.resume(req.model(handover.HandoverRequest))

    @endpoint(Replication.RECLAIM)
    async def reclaim(self, req: BusRequest):
        """Failover's rollback gives them back (handover.py)."""
        return await self.jobs.reclaim(req.model(handover.ReclaimRequest))
