"""Failover jobs: admission (one active failover per VM), the step engine, resume after a restart,
compensation, and the network mappings.

The engine runs a job's steps in order, each marked `running` before it starts and `done` after; on a
failure it runs the compensations of the steps that ran, newest first. After kill -9, `recover()`
resumes every job that was running (its steps are idempotent) or compensating.
"""
from __future__ import annotations

import asyncio
import time
from datetime import datetime
from typing import Any

import orjson
from prometheus_client import Counter, Histogram
from sqlalchemy import delete, func, or_, select, update
from sqlalchemy.exc import IntegrityError

from oma.services.failover import steps as st
from oma.services.failover.models import (
    ACTIVE,
    CLEANED_UP,
    COMPENSATED,
    COMPENSATING,
    COMPENSATION_FAILED,
    COMPLETED,
    FAILED,
    ROLLED_BACK,
    JOB_STATUSES,
    R_CREATED,
    R_DELETED,
    R_PLANNED,
    RUNNING,
    S_COMPENSATED,
    S_COMPENSATING,
    S_DONE,
    S_FAILED,
    S_PENDING,
    S_RUNNING,
    FailoverJob,
    FailoverLock,
    FailoverResource,
    FailoverStep,
    NetworkMapping,
)
from oma.shared.errors import error_text
from oma.shared import errors, preflight
from oma.shared.bus import Reply, event_envelope
from oma.shared.db import free_id, iso, limit_offset, list_filters, utcnow
from oma.shared.plugins import BackendNotFound, get_backend
from oma.shared.schemas import FailoverOptions, FailoverRequest, NetworkMappingRequest
from oma.shared.subjects import Config, Failover, Replication, Scheduler

STEP_DURATION = Histogram("oma_failover_step_duration_seconds", "Duration of each failover step",
                          ["step", "result"], buckets=(.1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900))
JOBS = Counter("oma_failover_jobs_total", "Failover jobs reaching each status", ["action", "status"])
COMPENSATION_FAILURES = Counter("oma_failover_compensation_failures_total",
                                "Failover jobs whose compensation failed (cloud objects may be left)")
# The VM context status each job status means (services/context_aggregator).
CONTEXT_STATUS = {("test", RUNNING): "failing_over", ("test", COMPLETED): "failed_over_test",
                  ("test", COMPENSATING): "cleaning_up", ("test", COMPENSATED): "ready_for_failover",
                  ("cleanup", RUNNING): "cleaning_up", ("cleanup", COMPLETED): "ready_for_failover",
                  ("live", RUNNING): "failing_over", ("live", COMPLETED): "failed_over_live",
                  ("live", COMPENSATING): "cleaning_up", ("live", COMPENSATED): "ready_for_failover",
                  ("rollback", RUNNING): "cleaning_up", ("rollback", COMPLETED): "rolled_back"}
# What undoes each kind of failover, the status the undone job gets, and the steps.
UNDOES = {"cleanup": ("test", CLEANED_UP, st.CLEANUP_STEPS), "rollback": ("live", ROLLED_BACK, st.ROLLBACK_STEPS)}
USABLE_REPLICATION = ("ready_for_sync", "replicating", "completed")
GROUP_DEFAULTS = ("service_offering", "network_profile")  # the options a protection group may default


def failover_id_base(now: datetime) -> str:
    """`fo-YYYYMMDD-HHMMSS` as the API promises, like replication's job ids; `_insert` adds `-2`,
    `-3`... only when that second is taken."""
    return f"fo-{now:%Y%m%d-%H%M%S}"


class JobResources:
    """The resource rows of one job (st.Resources)."""

    def __init__(self, sessions: Any, failover_id: str, step: str = ""):
        self.sessions = sessions
        self.failover_id = failover_id
        self.step = step

    async def plan(self, kind: str, ordinal: int, name: str, source_id: str | None = None) -> FailoverResource:
        async with self.sessions.begin() as db:
            row = await db.scalar(select(FailoverResource).where(
                FailoverResource.failover_id == self.failover_id, FailoverResource.kind == kind,
                FailoverResource.ordinal == ordinal))
            if row is None:
                row = FailoverResource(failover_id=self.failover_id, step=self.step, kind=kind, ordinal=ordinal,
                                       name=name, source_id=source_id, state=R_PLANNED)
                db.add(row)
        return row

    async def record(self, row: FailoverResource, cloud_id: str) -> None:
        row.cloud_id, row.state = cloud_id, R_CREATED
        await self._set(row, cloud_id=cloud_id, state=R_CREATED)

    async def deleted(self, row: FailoverResource) -> None:
        row.state = R_DELETED
        await self._set(row, state=R_DELETED)

    async def _set(self, row: FailoverResource, **values: Any) -> None:
        async with self.sessions.begin() as db:
            await db.execute(update(FailoverResource).where(FailoverResource.id == row.id).values(**values))

    async def rows(self, kind: str) -> list[FailoverResource]:
        async with self.sessions() as db:
            return list((await db.scalars(select(FailoverResource).where(
                FailoverResource.failover_id == self.failover_id, FailoverResource.kind == kind)
                .order_by(FailoverResource.ordinal))).all())


class Failovers:
    def __init__(self, app: Any):
        self.app = app
        self.settings = app.settings
        self.bus = app.bus
        self.sessions = app.sessions
        self.log = app.log
        self.cloud_backend = get_backend(app.pm, "cloud", self.settings.cloud_backend)
        self.resolver = get_backend(app.pm, "device-resolver", self.settings.device_resolver).factory(self.settings)
        self._running: dict[str, asyncio.Task] = {}

    def converter(self, name: str) -> Any:
        try:
            return get_backend(self.app.pm, "converter", name).factory(self.settings)
        except BackendNotFound as exc:
            raise errors.BadRequest("Converter not available", f"options.convert: {exc}") from None

    # -- requests -------------------------------------------------------------------------------

    async def action(self, req: FailoverRequest) -> Reply:
        if req.action in ("test", "live"):
            job = await self._admit(req)
        else:
            job = await self._admit_undo(req)
        JOBS.labels(action=job.action, status=RUNNING).inc()
        await self.emit(job)
        self.start(job.failover_id)
        return Reply({"success": True, "failover_id": job.failover_id, "status": job.status,
                      "action": job.action, "vm_name": job.vm_name}, status=202)

    async def _latest_replica(self, vm_name: str) -> dict[str, Any]:
        """The VM's latest replication job that holds a volume for every disk (asked over the bus)."""
        listed = await self.bus.call(Replication.LIST, {"vm_name": vm_name, "limit": 20})
        for job in listed.get("jobs", []):
            disks = job.get("disks") or []
            if job.get("status") in USABLE_REPLICATION and disks and all(d.get("attached") for d in disks):
                return await self.bus.call(Replication.GET, {"job_id": job["job_id"]})
        raise errors.Conflict("No replica to fail over",
                              f"VM {vm_name!r} has no replication job holding a volume for every disk")

    async def _nics(self, source_vm: dict[str, Any], profile: str) -> list[dict[str, Any]]:
        """The target network of each source NIC, in NIC order, from the network mappings."""
        column = "test_network_id" if profile == "test" else "production_network_id"
        vcenter = source_vm.get("vcenter") or ""
        async with self.sessions() as db:
            rows = (await db.scalars(select(NetworkMapping))).all()
        by_source = {(m.vcenter, m.source_network): getattr(m, column) for m in rows}
        nics = []
        for i, nic in enumerate(source_vm.get("nics") or []):
            network = nic.get("network") or ""
            target = by_source.get((vcenter, network)) or by_source.get(("", network))
            if not target:
                raise errors.BadRequest("Network mapping missing",
                                        f"source_vm.nics.{i}: no {profile} network mapped for {network!r}")
            nics.append({"network": network, "network_id": target, "mac": nic.get("mac_address")})
        if not nics:
            raise errors.BadRequest("No NICs", "the replicated source_vm lists no nics to map to networks")
        return nics

    async def _group_defaults(self, vm_name: str, replica: dict[str, Any]) -> dict[str, Any]:
        """The `defaults` of the VM's protection group: the group that started its replica (a scheduled
        sync's `vm_group_id`), else the first group naming it. None reachable (no scheduler): none."""
        try:
            gid = str(replica.get("vm_group_id") or "")
            if gid.isdigit():
                group = (await self.bus.call(Scheduler.GROUPS, {"action": "get", "id": int(gid)}))["group"]
            else:
                listed = (await self.bus.call(Scheduler.GROUPS, {"action": "get"}))["groups"]
                group = next((g for g in listed if vm_name.casefold() in {n.casefold() for n in g["vm_names"]}), {})
        except errors.OmaError as exc:
            self.log.info("group defaults unavailable", extra={"vm_name": vm_name, "reason": exc.error})
            return {}
        return group.get("defaults") or {}

    async def _with_defaults(self, vm_name: str, replica: dict[str, Any], opts: FailoverOptions) -> FailoverOptions:
        """The request's options, each one it leaves out taken from the VM's group defaults."""
        if all(getattr(opts, k) is not None for k in GROUP_DEFAULTS):
            return opts
        defaults = await self._group_defaults(vm_name, replica)
        return opts.model_copy(update={k: defaults[k] for k in GROUP_DEFAULTS
                                       if getattr(opts, k) is None and defaults.get(k)})

    async def _preflight(self, creds: dict[str, Any], source: dict[str, Any], opts: FailoverOptions,
                         profile: str, target_name: str | None) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
        """The NICs' target networks and the checks run before a job exists (shared/preflight.py's
        shape): every NIC mapped for the profile, the service offering there (or one that fits), and
        for a cutover the target name free. What the cloud does not answer warns."""
        checks, nics = [], []
        try:
            nics = await self._nics(source, profile)
            checks.append(preflight.check("network", preflight.PASS, f"{len(nics)} NIC(s) mapped ({profile})"))
        except errors.BadRequest as exc:
            checks.append(preflight.check("network", preflight.FAIL, str(exc.details)))
        client = self.cloud_backend.factory(creds, self.settings, poll_interval=self.settings.cloud_poll_interval)
        try:
            offerings, named = await asyncio.gather(
                preflight.quietly("service offerings", client.list_service_offerings()),
                preflight.quietly("target names", client.list_virtual_machines(name=target_name))
                if target_name else asyncio.sleep(0))
        finally:
            await client.close()
        if offerings is None:
            checks.append(preflight.check("service_offering", preflight.WARN,
                                          "the service offerings could not be read"))
        else:
            try:
                o = st.pick_offering(offerings, opts.service_offering, source.get("cpus"), source.get("memory_mb"))
                checks.append(preflight.check("service_offering", preflight.PASS,
                                              f"service offering {o.get('name')!r}"))
            except errors.BadRequest as exc:
                checks.append(preflight.check("service_offering", preflight.FAIL, str(exc.details)))
        if target_name:
            taken = next((v.get("id") for v in named or [] if v.get("name") == target_name), None)
            checks.append(preflight.check("target_name", *(
                (preflight.WARN, "the target cloud's VM names could not be read") if named is None else
                (preflight.FAIL, f"a VM named {target_name!r} already exists in the target cloud (id {taken})")
                if taken else (preflight.PASS, f"{target_name!r} is free in the target cloud"))))
        return nics, checks

    async def _admit(self, req: FailoverRequest) -> FailoverJob:
        opts, live = req.options, req.action == "live"
        self.converter(opts.convert or "none").check()  # 400 for an unknown or uninstalled converter
        if opts.final_sync and not live:
            raise errors.BadRequest("Final sync is a live cutover's", "options.final_sync: a test failover "
                                    "boots clones while replication goes on; only `live` syncs after the power-off")
        await self._not_locked(req.vm_name)  # the clear answer first; the insert below is what guarantees it
        replica = await self._latest_replica(req.vm_name)
        source = replica["source_vm"]
        if live and opts.final_sync is not False and replica["status"] != "completed":
            raise errors.Conflict("Sync in progress", f"replication job {replica['job_id']} of VM {req.vm_name!r} is "
                                  f"{replica['status']}; the cutover's final sync starts once it has completed")
        power_off = live and opts.power_off_source is not False
        if power_off and not source.get("vcenter"):
            raise errors.BadRequest("Source vCenter unknown", "the replicated source_vm names no vcenter to power "
                                    "it off through; set options.power_off_source to false to skip that")
        creds = await self.bus.call(Config.CREDENTIALS, {"id": replica["ossea_config_id"]})
        opts = await self._with_defaults(req.vm_name, replica, opts)
        now = utcnow()
        target_name = st.safe_name(req.vm_name, 63) if live else st.test_vm_name(req.vm_name, now)
        profile = opts.network_profile or ("production" if live else "test")
        nics, checks = await self._preflight(creds, source, opts, profile,
                                             target_name if live else None)  # a test VM's name is new each time
        preflight.refuse_if_failed(req.vm_name, checks)
        exports = {e["disk_unit_number"]: e for e in replica.get("nbd_exports") or []}
        plan = {
            "mode": req.action, "vm_name": req.vm_name, "oma_vm_id": creds.get("oma_vm_id"),
            "zone": creds.get("zone") or "", "template": opts.template or self.settings.failover_stub_template,
            "service_offering": opts.service_offering, "boot_type": opts.boot_type or _boot_type(source),
            "cpus": source.get("cpus"), "memory_mb": source.get("memory_mb"),
            "nics": nics,
            "disks": [{"ordinal": i, "unit": d["unit_number"], "volume_id": d["volume_id"],
                       **_export(exports.get(d["unit_number"]))}
                      for i, d in enumerate(sorted(replica["disks"], key=lambda d: d["unit_number"]))],
            "target_name": target_name,
            "preserve_macs": live, "power_off_source": power_off, "vcenter": source.get("vcenter"),
            "source_vm_id": source.get("id"), "shutdown_timeout": self.settings.failover_shutdown_timeout,
            # The final sync (live; on by default): a replication job of the same source VM, through its VMA.
            "final_sync": live and opts.final_sync is not False, "source_vm": source,
            "ossea_config_id": replica["ossea_config_id"], "replication_job_id": replica["job_id"],
            "provision_wait": self.settings.provision_wait, "convert": opts.convert or "none"}
        job = FailoverJob(action=req.action, vm_name=req.vm_name, status=RUNNING,
                          ossea_config_id=replica["ossea_config_id"], replication_job_id=replica["job_id"],
                          options=orjson.dumps(opts.model_dump(exclude_none=True)).decode(),
                          plan=orjson.dumps(plan).decode(), created_at=now)
        steps = st.LIVE_STEPS if live else st.TEST_STEPS
        if plan["convert"] == "none":  # no step that does nothing: its bookkeeping would cost time
            steps = tuple(n for n in steps if n != "convert")
        await self._insert(job, steps, lock=True)
        return job

    async def _admit_undo(self, req: FailoverRequest) -> FailoverJob:
        """cleanup (of a test failover) or rollback (of a live cutover): takes over the VM's lock."""
        undone, _, names = UNDOES[req.action]
        async with self.sessions() as db:
            lock = await db.get(FailoverLock, req.vm_name)
            target = await self._job(db, lock.failover_id) if lock else None
        if target is not None and target.action == req.action and target.status == FAILED:
            async with self.sessions() as db:  # a failed cleanup/rollback: undo the same failover again
                target = await self._job(db, target.target_id)
        if target is None or target.action != undone:
            raise errors.Conflict("Nothing to undo", f"VM {req.vm_name!r} has no {undone} failover to {req.action}")
        if target.status in ACTIVE:
            raise errors.Conflict("Failover in progress", f"{undone} failover {target.failover_id} is still "
                                  f"{target.status}; {req.action} when it has finished")
        job = FailoverJob(action=req.action, vm_name=req.vm_name,
                          status=RUNNING, target_id=target.failover_id, ossea_config_id=target.ossea_config_id,
                          replication_job_id=target.replication_job_id, options="{}", plan="{}")
        await self._insert(job, names, lock=False)
        return job

    async def _insert(self, job: FailoverJob, names: tuple[str, ...], *, lock: bool) -> None:
        """The job (its id the first free one of its second), its steps and the VM's lock in one
        transaction: the lock's primary key is what makes a second concurrent failover of the VM a 409;
        an id another process took in the same second (the unique index) is picked again."""
        job.created_at = job.created_at or utcnow()
        for _ in range(5):
            job.id = None  # type: ignore[assignment]  # a rolled-back attempt's autoincrement value
            try:
                async with self.sessions.begin() as db:
                    job.failover_id = await free_id(db, FailoverJob.failover_id, failover_id_base(job.created_at))
                    db.add(job)
                    await db.flush()
                    db.add_all(FailoverStep(failover_id=job.failover_id, position=i, name=n, status=S_PENDING,
                                            attempts=0) for i, n in enumerate(names))
                    if lock:
                        db.add(FailoverLock(vm_name=job.vm_name, failover_id=job.failover_id))
                    else:
                        await self._take_over_lock(db, job)
                return
            except IntegrityError:
                if lock:
                    await self._not_locked(job.vm_name)  # the VM's lock: a 409 that names the holder
        raise errors.Conflict("Failover ids exhausted", f"no free failover id in {failover_id_base(job.created_at)}")

    async def _take_over_lock(self, db: Any, job: FailoverJob) -> None:
        """A cleanup or rollback takes the VM's lock over from the failover it undoes."""
        held = await db.get(FailoverLock, job.vm_name, with_for_update=True)
        if held is None or held.failover_id == job.failover_id:
            raise errors.Conflict("Nothing to clean up", f"VM {job.vm_name!r} holds no failover")
        current = await self._job(db, held.failover_id)
        if current.action == job.action and current.status == RUNNING:
            raise errors.Conflict(f"{job.action.capitalize()} in progress", f"{current.failover_id} is running")
        held.failover_id = job.failover_id

    async def _not_locked(self, vm_name: str) -> None:
        async with self.sessions() as db:
            held = await db.get(FailoverLock, vm_name)
        if held is not None:
            raise errors.Conflict("Failover already active", f"VM {vm_name!r} already has failover "
                                  f"{held.failover_id}; clean it up or roll it back first")

    # -- the engine -----------------------------------------------------------------------------

    def start(self, failover_id: str) -> None:
        if failover_id not in self._running:
            task = self.app.spawn(self.run(failover_id))
            self._running[failover_id] = task
            task.add_done_callback(lambda _: self._running.pop(failover_id, None))

    def interrupt(self) -> None:
        """Cancel the runs of this process (a stop): the next start resumes them from their records."""
        for task in list(self._running.values()):
            task.cancel()

    async def recover(self) -> None:
        async with self.sessions() as db:
            ids = (await db.scalars(select(FailoverJob.failover_id).where(FailoverJob.status.in_(ACTIVE))
                                    .order_by(FailoverJob.id))).all()
        for failover_id in ids:
            self.log.info("resuming failover job", extra={"failover_id": failover_id})
            self.start(failover_id)

    async def run(self, failover_id: str) -> None:
        try:
            await self._run(failover_id)
        except Exception:  # noqa: BLE001 - e.g. the database went away: the job resumes at next start
            self.log.exception("failover job stopped", extra={"failover_id": failover_id})

    async def _run(self, failover_id: str) -> None:
        async with self.sessions() as db:
            job = await self._job(db, failover_id)
        # A cleanup works on the test failover's resources and plan.
        owner = job.target_id or job.failover_id
        async with self.sessions() as db:
            plan = orjson.loads((await self._job(db, owner)).plan)
        creds = await self._credentials(job.ossea_config_id)
        client = self.cloud_backend.factory(creds, self.settings, poll_interval=self.settings.cloud_poll_interval)
        try:
            async def save() -> None:
                await self._set_job(owner, plan=orjson.dumps(plan).decode())
            ctx = st.Ctx(client, JobResources(self.sessions, owner), plan, owner,
                         self.settings.cloud_poll_interval, self.settings.cloud_job_timeout, self.bus, save,
                         self.settings.failover_final_sync_timeout, self.converter(plan.get("convert") or "none"),
                         self.resolver, self.settings.device_wait,
                         quiesce_timeout=self.settings.failover_quiesce_timeout)
            if job.status == RUNNING:
                await self._forward(job, ctx)
            if job.status == COMPENSATING:
                await self._compensate(job, ctx)
        finally:
            await client.close()

    async def _credentials(self, config_id: int | None) -> dict[str, Any]:
        for attempt in range(30):  # config may start after us
            try:
                return await self.bus.call(Config.CREDENTIALS, {"id": config_id})
            except errors.Unavailable:
                await asyncio.sleep(1.0)
        return await self.bus.call(Config.CREDENTIALS, {"id": config_id})

    async def _forward(self, job: FailoverJob, ctx: st.Ctx) -> None:
        for step in await self._steps(job.failover_id):
            if step.status == S_DONE:
                continue
            ctx.res.step = step.name  # type: ignore[attr-defined]
            started = time.perf_counter()
            await self._set_step(step, status=S_RUNNING, started_at=utcnow(), attempts=step.attempts + 1,
                                 error=None)
            await self._set_job(job.failover_id, current_step=step.name)
            try:
                await st.RUN[step.name](ctx)
            except Exception as exc:  # noqa: BLE001 - every failure ends the step and starts compensation
                elapsed = time.perf_counter() - started
                STEP_DURATION.labels(step=step.name, result="failed").observe(elapsed)
                self.log.warning("failover step failed", extra={"failover_id": job.failover_id,
                                                                "step": step.name, "error": error_text(exc)})
                await self._set_step(step, status=S_FAILED, error=error_text(exc), completed_at=utcnow(),
                                     duration_seconds=elapsed)
                # A failover compensates; a failed cleanup or rollback stays failed (run it again).
                await self._finish(job, FAILED if job.action in UNDOES else COMPENSATING, error_text(exc))
                return
            elapsed = time.perf_counter() - started
            STEP_DURATION.labels(step=step.name, result="ok").observe(elapsed)
            # What the step resolved (ids, the target VM) is kept on the job that owns the resources.
            await self._set_job(ctx.failover_id, plan=orjson.dumps(ctx.plan).decode())
            await self._set_step(step, status=S_DONE, completed_at=utcnow(), duration_seconds=elapsed)
        await self._finish(job, COMPLETED)

    async def _compensate(self, job: FailoverJob, ctx: st.Ctx) -> None:
        ran = [s for s in await self._steps(job.failover_id)
               if s.status in (S_DONE, S_FAILED, S_RUNNING, S_COMPENSATING)]
        for step in reversed(ran):
            undo = (st.UNDO_LIVE if ctx.live else st.UNDO).get(step.name)
            await self._set_step(step, status=S_COMPENSATING)
            try:
                if undo is not None:
                    await undo(ctx)
            except Exception as exc:  # noqa: BLE001
                COMPENSATION_FAILURES.inc()
                self.log.error("failover compensation failed", extra={
                    "failover_id": job.failover_id, "step": step.name, "error": error_text(exc)})
                await self._set_step(step, error=f"compensation: {error_text(exc)}")
                await self._finish(job, COMPENSATION_FAILED, f"compensation of {step.name}: {error_text(exc)}")
                return
            await self._set_step(step, status=S_COMPENSATED)
        await self._finish(job, COMPENSATED, job.error)

    async def _finish(self, job: FailoverJob, status: str, error: str | None = None) -> None:
        done = status not in ACTIVE
        values: dict[str, Any] = {"status": status, "error": error}
        if done:
            values["completed_at"] = utcnow()
        async with self.sessions.begin() as db:
            await db.execute(update(FailoverJob).where(FailoverJob.id == job.id).values(**values))
            undoing = job.action in UNDOES and status == COMPLETED
            if undoing:
                await db.execute(update(FailoverJob).where(FailoverJob.failover_id == job.target_id)
                                 .values(status=UNDOES[job.action][1]))
            if status == COMPENSATED or undoing:
                await db.execute(delete(FailoverLock).where(FailoverLock.vm_name == job.vm_name))
        job.status, job.error = status, error
        JOBS.labels(action=job.action, status=status).inc()
        await self.emit(job)

    async def emit(self, job: FailoverJob) -> None:
        payload = {**event_envelope(), "failover_id": job.failover_id, "action": job.action,
                   "vm_name": job.vm_name, "status": job.status, "error": job.error,
                   "context_status": CONTEXT_STATUS.get((job.action, job.status))}
        try:
            await self.bus.publish_event(Failover.EVT_STATUS, payload, msg_id=payload["event_id"])
        except Exception as exc:  # noqa: BLE001 - the state is committed; the event is best effort
            self.log.warning("could not publish a failover event", extra={"reason": type(exc).__name__})

    # -- rows -----------------------------------------------------------------------------------

    @staticmethod
    async def _job(db: Any, failover_id: str | None) -> FailoverJob:
        job = await db.scalar(select(FailoverJob).where(FailoverJob.failover_id == failover_id))
        if job is None:
            raise errors.NotFound("Failover job not found", f"No failover job with ID: {failover_id}")
        return job

    async def _steps(self, failover_id: str) -> list[FailoverStep]:
        async with self.sessions() as db:
            return list((await db.scalars(select(FailoverStep).where(FailoverStep.failover_id == failover_id)
                                          .order_by(FailoverStep.position))).all())

    async def _set_step(self, step: FailoverStep, **values: Any) -> None:
        for k, v in values.items():
            setattr(step, k, v)
        async with self.sessions.begin() as db:
            await db.execute(update(FailoverStep).where(FailoverStep.id == step.id).values(**values))

    async def _set_job(self, failover_id: str, **values: Any) -> None:
        async with self.sessions.begin() as db:
            await db.execute(update(FailoverJob).where(FailoverJob.failover_id == failover_id).values(**values))

    async def using_config(self, config_id: int) -> list[str]:
        locked = select(FailoverLock.failover_id)
        async with self.sessions() as db:
            holders = select(FailoverJob.target_id).where(FailoverJob.failover_id.in_(locked))
            return list((await db.scalars(select(FailoverJob.failover_id).where(
                FailoverJob.ossea_config_id == config_id,
                or_(FailoverJob.status.in_((*ACTIVE, COMPENSATION_FAILED)), FailoverJob.failover_id.in_(locked),
                    FailoverJob.failover_id.in_(holders))).order_by(FailoverJob.id))).all())

    # -- reads ----------------------------------------------------------------------------------

    async def list(self, q: dict[str, Any]) -> dict[str, Any]:
        limit, offset = limit_offset(q)
        conds = list_filters(q, FailoverJob.status, JOB_STATUSES, FailoverJob.vm_name)
        async with self.sessions() as db:
            total = await db.scalar(select(func.count()).select_from(FailoverJob).where(*conds))
            jobs = (await db.scalars(select(FailoverJob).where(*conds).order_by(FailoverJob.id.desc())
                                     .limit(limit).offset(offset))).all()
        return {"success": True, "jobs": [self._summary(j) for j in jobs], "total": total,
                "limit": limit, "offset": offset}

    async def get(self, failover_id: str) -> dict[str, Any]:
        async with self.sessions() as db:
            job = await self._job(db, failover_id)
            steps = (await db.scalars(select(FailoverStep).where(FailoverStep.failover_id == failover_id)
                                      .order_by(FailoverStep.position))).all()
            resources = (await db.scalars(select(FailoverResource).where(
                FailoverResource.failover_id == (job.target_id or failover_id)).order_by(FailoverResource.id))).all()
        return {"success": True, **self._summary(job),
                "steps": [{"name": s.name, "status": s.status, "attempts": s.attempts, "error": s.error,
                           "started_at": iso(s.started_at), "completed_at": iso(s.completed_at),
                           "duration_seconds": s.duration_seconds} for s in steps],
                "resources": [{"kind": r.kind, "name": r.name, "cloud_id": r.cloud_id, "source_id": r.source_id,
                               "state": r.state, "step": r.step} for r in resources]}

    @staticmethod
    def _summary(job: FailoverJob) -> dict[str, Any]:
        plan = orjson.loads(job.plan)
        return {"failover_id": job.failover_id, "action": job.action, "vm_name": job.vm_name,
                "status": job.status, "current_step": job.current_step, "target_id": job.target_id,
                "replication_job_id": job.replication_job_id, "final_sync_job_id": plan.get("final_sync_job_id"),
                "target_vm_name": plan.get("target_name"),
                "target_vm_id": plan.get("target_vm_id"), "error": job.error,
                "created_at": iso(job.created_at), "completed_at": iso(job.completed_at)}

    # -- network mappings -----------------------------------------------------------------------

    async def mappings(self, req: NetworkMappingRequest) -> Reply:
        if req.action == "get":
            async with self.sessions() as db:
                rows = (await db.scalars(select(NetworkMapping).order_by(NetworkMapping.id))).all()
            return Reply({"success": True, "mappings": [_mapping(m) for m in rows]})
        if req.action == "create":
            m = req.mapping
            if m is None or not m.source_network:
                raise errors.BadRequest("Validation failed", "mapping.source_network: required")
            row = NetworkMapping(vcenter=m.vcenter or "", source_network=m.source_network,
                                 production_network_id=m.production_network_id, test_network_id=m.test_network_id)
            try:
                async with self.sessions.begin() as db:
                    db.add(row)
            except IntegrityError:
                raise errors.Conflict("Mapping exists", f"source network {m.source_network!r} is already "
                                      "mapped for this vCenter; update it") from None
            return Reply({"success": True, "mapping": _mapping(row)}, status=201)
        if req.id is None:
            raise errors.BadRequest("Validation failed", f"id: required for {req.action}")
        async with self.sessions.begin() as db:
            row = await db.get(NetworkMapping, req.id)
            if row is None:
                raise errors.NotFound("Mapping not found", f"No network mapping with ID: {req.id}")
            if req.action == "delete":
                await db.delete(row)
                return Reply({"success": True, "message": f"network mapping {req.id} deleted"})
            for k, v in (req.mapping.model_dump(exclude_unset=True) if req.mapping else {}).items():
                setattr(row, k, v)
        return Reply({"success": True, "mapping": _mapping(row)})


def _mapping(m: NetworkMapping) -> dict[str, Any]:
    return {"id": m.id, "vcenter": m.vcenter, "source_network": m.source_network,
            "production_network_id": m.production_network_id, "test_network_id": m.test_network_id}


def _export(export: dict[str, Any] | None) -> dict[str, Any]:
    """What restores a disk's export after a rollback (its device path is stable: by volume serial)."""
    if not export:
        return {}
    return {"export_name": export["export_name"], "export_vm_id": export["vm_id"],
            "device_path": export["device_path"]}


def _boot_type(source: dict[str, Any]) -> str:
    return "UEFI" if str(source.get("firmware") or "").lower() == "efi" else "BIOS"
