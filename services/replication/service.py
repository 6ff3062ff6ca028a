"""Replication jobs: creation, provisioning of every disk at once, cancel/delete, and the coordinator
that calls the other parts, each a module of functions that take the session (factory), the bus and
the cloud operations they use: admission.py (who may provision, decided in the database), progress.py
(the VMA's reports), cleanup.py (releasing volumes, the orphan sweep), recovery.py (leases, resuming
jobs whose process is gone), queries.py (reads), naming.py (job ids, volume names), cloud.py (the
cloud steps through shared.contracts.CloudClient).

Every resource is recorded before it is created: a disk's row carries the unique volume name before
createVolume is sent, and the volume id as soon as the cloud answers. So whatever stops this service,
the rows name every volume it may have created, and cleanup finds them (by id, else by name).

Several replication processes may share one database and one appliance VM (docs/replication.md).
"""
from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import orjson
from prometheus_client import Counter, Gauge, Histogram
from sqlalchemy import func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from oma.services.replication import admission, cleanup, handover, original, progress, queries, recovery, views
from oma.services.replication.cloud import CloudOps, error_text
from oma.services.replication.models import (
    CANCELLED,
    COMPLETED,
    D_ATTACHING,
    D_CANCELLED,
    D_CREATING,
    D_EXPORTING,
    D_FAILED,
    D_PENDING,
    D_QUEUED,
    D_READY,
    FAILED,
    FINISHED,
    IN_FLIGHT,
    PROVISIONING,
    QUEUED,
    READY,
    REPLICATING,
    ApplianceSlots,
    JobVolume,
    ReplicationJob,
)
from oma.services.replication.naming import (  # noqa: F401 - re-exported: tests and tools name them here
    GIB,
    job_id_base,
    parse_volume_name,
    rounded_gb,
    volume_name,
)
from oma.shared import errors, preflight
from oma.shared.bus import Reply
from oma.shared.contracts import CloudCapacityError
from oma.shared.db import free_id, utcnow
from oma.shared.locks import KeyedLocks
from oma.shared.plugins import get_backend
from oma.shared.schemas import ProgressReport, ReplicationRequest
from oma.shared.subjects import Config, Exports, Replication

REUSED_MESSAGE = "Migration workflow started - VM export reused without SIGHUP operation"
NEW_MESSAGE = "Migration workflow started - VM exports created"

PLACEMENT_TTL = 60.0  # seconds a zone id and disk offering are used before they are asked again
JOBS = Counter("oma_replication_jobs_total", "Replication jobs entering each status", ["status"])
PROVISION = Histogram("oma_replication_provision_duration_seconds", "From admission to ready_for_sync or failure",
                      ["result"], buckets=(.1, .25, .5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600))
THROUGHPUT = Gauge("oma_vma_throughput_mbps", "Smoothed VMA throughput summed over replicating jobs (MB/s)")
ATTACHED = Gauge("oma_attached_disks", "Data disks the appliance VM holds (or is about to) for replication")


def numbered(job: ReplicationJob, rows: list[JobVolume], subjects: list[str]) -> list[tuple[str, dict[str, Any]]]:
    """Each event with the job's next seq, in the caller's transaction, which holds the job's row
    lock (queries.job(lock=True)): no other writer takes a seq meanwhile."""
    events = []
    for subject in subjects:
        job.seq += 1
        events.append((subject, views.event(job, rows)))
    return events


@dataclass
class CloudStart:
    """What a create prepared for its provisioning task: the cloud client preflight used and the
    zone/offering lookup asked beside preflight. The task that takes it closes the client; a create
    that starts no task discards it."""
    ops: CloudOps
    placing: asyncio.Future
    taken: bool = False

    async def discard(self) -> None:
        if not self.taken:
            await self.drop_placement()
            await self.ops.close()

    async def drop_placement(self) -> None:
        self.placing.cancel()
        await asyncio.gather(self.placing, return_exceptions=True)


class Replicator:
    """Coordinates a process's part in replication: the jobs it provisions (tasks), its in-process
    locks, and the steps of the other parts (admission, progress, cleanup, recovery, queries), given
    what they need explicitly: no reference to the app."""

    def __init__(self, *, settings: Any, bus: Any, sessions: Any, log: Any, pm: Any,
                 spawn: Callable[[Awaitable[Any]], asyncio.Task]):
        self.settings = settings
        self.bus = bus
        self.sessions = sessions
        self.log = log
        self.spawn = spawn  # background work that shutdown waits for
        self.cloud_backend = get_backend(pm, "cloud", settings.cloud_backend)
        self.resolver = get_backend(pm, "device-resolver", settings.device_resolver).factory(settings)
        self.keep_failed = bool(self.settings.keep_failed_resources)
        self._admission = asyncio.Lock()
        self._slot_rows: set[str] = set()  # appliance VMs whose appliance_slots row exists
        self._running: dict[str, asyncio.Task] = {}
        self._progress_locks: dict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._cleanups = KeyedLocks()  # by job id
        self._throughput: dict[str, float] = {}
        # The zone id and custom offering per cloud account and zone, with when they expire.
        self._placements: dict[tuple[Any, ...], tuple[float, tuple[str, str]]] = {}

    # -- plumbing -------------------------------------------------------------------------------

    async def credentials(self, config_id: int, *, wait: bool = True) -> dict[str, Any]:
        """The configuration's credentials, by the id the job recorded (the config it started with)."""
        return await self.call(Config.CREDENTIALS, {"id": config_id}, wait=wait)

    async def call(self, subject: str, payload: Any, *, wait: bool = True) -> Any:
        """A bus call that, with `wait`, rides out a service that is not up yet or died mid-request
        (no responders, no reply) for at most `dependency_wait`: such a restart never fails a job."""
        deadline = time.monotonic() + self.settings.dependency_wait
        while True:
            try:
                return await self.bus.call(subject, payload)
            except (errors.NoResponders, errors.BusTimeout) as exc:
                if not wait or time.monotonic() >= deadline:
                    raise
                self.log.info("waiting for a service", extra={"subject": subject, "reason": str(exc.details)})
                await asyncio.sleep(1.0)

    def cloud(self, creds: dict[str, Any]) -> CloudOps:
        return CloudOps(self.cloud_backend.factory(creds, self.settings), self.settings)

    async def load(self, job_id: str) -> tuple[ReplicationJob, list[JobVolume]]:
        async with self.sessions() as db:
            return await queries.job(db, job_id), await queries.rows(db, job_id)

    async def _set(self, row_id: int, **values: Any) -> None:
        async with self.sessions.begin() as db:
            await db.execute(update(JobVolume).where(JobVolume.id == row_id).values(**values))

    async def emit(self, job_id: str, subject: str) -> None:
        """Record the next seq, then publish (a failed publish is logged: the state is committed)."""
        async with self.sessions.begin() as db:
            events = numbered(await queries.job(db, job_id, lock=True), await queries.rows(db, job_id), [subject])
        await self.publish(job_id, events)

    async def publish(self, job_id: str, events: list[tuple[str, dict[str, Any]]]) -> None:
        """Publish events numbered by `numbered` once their transaction committed."""
        for subject, payload in events:
            try:
                await self.bus.publish_event(subject, payload, msg_id=payload["event_id"])
            except Exception as exc:  # noqa: BLE001
                self.log.warning("could not publish a replication event",
                                 extra={"job_id": job_id, "subject": subject, "reason": type(exc).__name__})

    async def refresh_gauges(self) -> None:
        async with self.sessions() as db:
            ATTACHED.set(await db.scalar(select(func.count()).select_from(JobVolume)
                                         .where(JobVolume.holds_volume.is_(True))) or 0)
        THROUGHPUT.set(sum(self._throughput.values()))

    # -- create ---------------------------------------------------------------------------------

    async def create(self, req: ReplicationRequest) -> Reply:
        entered = time.monotonic()
        # The configuration (404 for an unknown id) and, beside it, whether the NBD server serves:
        # no volume for a disk that no NBD server could export (503 from export_manager).
        creds, exporting = await asyncio.gather(self.credentials(req.ossea_config_id, wait=False),
                                                self.bus.call(Exports.READY, {}), return_exceptions=True)
        if isinstance(creds, BaseException):
            raise creds
        if not creds.get("is_active", True):
            raise errors.Conflict("OSSEA configuration inactive",
                                  f"OSSEA configuration {req.ossea_config_id} ({creds.get('name')}) is not active")
        if not creds.get("oma_vm_id"):
            raise errors.Conflict("OSSEA configuration incomplete",
                                  f"OSSEA configuration {req.ossea_config_id} has no oma_vm_id: volumes need a VM "
                                  "to attach to")
        if isinstance(exporting, BaseException):
            raise exporting
        # One cloud client for preflight and the provisioning task; the zone and the disk offering
        # are asked beside preflight, so the first createVolume waits for neither.
        ops = self.cloud(creds)
        start = CloudStart(ops, self._placement(ops, creds))
        try:
            return await self._create(req, creds, start, entered)
        finally:
            await start.discard()

    async def _create(self, req: ReplicationRequest, creds: dict[str, Any], start: CloudStart,
                      entered: float) -> Reply:
        vm = req.source_vm
        units = vm.disk_slots()  # the request was validated: no two disks share a slot
        # Pre-flight: no volume for a VM that cannot work (shared/preflight.py: 400 with the failed checks).
        checks = await self.preflight(req, creds, start.ops)
        if preflight.failed(checks):  # a VM failed over is refused as such (409), not by preflight
            async with self.sessions() as db:
                if (moved := await handover.failed_over(db, vm.uuid or vm.id)) is not None:
                    raise handover.refusal(moved, "it can be replicated again")
        preflight.refuse_if_failed(vm.name, checks)
        vcenter_host = await original.place(req, self.call)  # 400 when the original's fields contradict it
        key = vm.uuid or vm.id
        oma_vm_id = creds["oma_vm_id"]
        now = utcnow()
        if oma_vm_id not in self._slot_rows:
            await admission.ensure_row(self.sessions, oma_vm_id)
            self._slot_rows.add(oma_vm_id)
        async with self._admission:  # this process's turn; the slot row's lock is every process's
            async with self.sessions.begin() as db:
                slots = await admission.lock(db, oma_vm_id)
                job_id = await free_id(db, ReplicationJob.job_id, job_id_base(now))  # under the admission lock
                busy = await db.scalar(select(ReplicationJob).where(
                    or_(ReplicationJob.vm_id == vm.id, ReplicationJob.vm_key == key),
                    ReplicationJob.status.in_(IN_FLIGHT)).limit(1))
                if busy is not None:
                    raise errors.Conflict("Replication job already in flight",
                                          f"VM {vm.name} already has job {busy.job_id} ({busy.status})")
                if (moved := await handover.failed_over(db, key)) is not None:
                    raise handover.refusal(moved, "it can be replicated again")
                await handover.refuse_if_paused(db, key)
                job = ReplicationJob(
                    job_id=job_id, vm_id=vm.id, vm_uuid=vm.uuid, vm_key=key, vm_name=vm.name,
                    ossea_config_id=req.ossea_config_id, oma_vm_id=oma_vm_id,
                    replication_type=req.replication_type, status=QUEUED,
                    progress_percent=0.0, bytes_transferred=0, seq=0, cleanup_pending=False, created_at=now,
                    total_bytes=sum(d.capacity_bytes or int(d.size_gb * GIB) for d in vm.disks),
                    source_vm=orjson.dumps(vm.model_dump(mode="json", exclude_none=True)).decode(),
                    current_operation="Queued", message="Waiting for free disk slots on the appliance VM",
                    **original.job_fields(req, vcenter_host), start_sync=req.start_sync)  # issue 16: driver.py
                rows = [JobVolume(job_id=job_id, unit_number=unit, disk_id=d.id, disk_path=d.path,
                                  datastore=d.datastore, capacity_bytes=d.capacity_bytes, size_gb=rounded_gb(d),
                                  status=D_QUEUED, reused=False, created_by_job=False, holds_volume=False,
                                  bytes_transferred=0, created_at=now)
                        for unit, d in zip(units, vm.disks)]
                held = admission.pair(rows, await admission.holdings(db, key))
                needed = sum(r.unit_number not in held for r in rows)
                cap = admission.capacity(self.settings, slots)
                if needed > cap:
                    learnt = " (learnt from the cloud's refusals)" if cap < self.settings.max_attached_disks else ""
                    raise errors.Conflict("Too many disks", f"VM {vm.name} needs {needed} new data disks; the "
                                          f"appliance VM holds at most {cap}{learnt}")
                # Decided before the rows exist: they are inserted as admission left them (no updates).
                admitted = await admission.try_admit(db, job, rows, cap, self.settings.provision_lease, held)
                db.add(job)
                await db.flush()  # the parent row first: no ORM relationship orders the inserts
                db.add_all(rows)
            JOBS.labels(status=job.status).inc()
            self.log.info("replication job created", extra={"job_id": job_id, "vm_name": vm.name,
                                                            "disks": len(rows), "status": job.status})
            # Numbered before the task starts: a created event numbered beside the task's ready event
            # could take the same seq, and the read model would drop one of them.
            await self.emit(job_id, Replication.EVT_CREATED)
            # Started under the admission lock: a cancel can never slip between admission and start.
            task = self._start(job_id, creds, (job, rows), start) if admitted else None
        await self.refresh_gauges()
        if task is None:
            job, rows = await self.load(job_id)
            return Reply(views.create_reply(job, rows), status=202)
        # provision_wait counts from the request: the gateway's timeout is derived from it.
        left = max(0.0, self.settings.provision_wait - (time.monotonic() - entered))
        done, _ = await asyncio.wait({task}, timeout=left)
        # Ready: the job as the task made it so (no second read); otherwise as it is now.
        ready = task.result() if done and not task.cancelled() and task.exception() is None else None
        job, rows = ready or await self.load(job_id)
        if job.status == FAILED:
            raise errors.BadGateway("Replication job failed", f"job {job_id}: {job.error}")
        if job.status == CANCELLED:
            raise errors.Conflict("Replication job cancelled", f"job {job_id} was cancelled while provisioning")
        return Reply(views.create_reply(job, rows), status=201 if job.status == READY else 202)

    @staticmethod
    def _placement_key(creds: dict[str, Any]) -> tuple[Any, ...]:
        return creds.get("api_url"), creds.get("api_key"), creds.get("domain"), creds.get("zone")

    def _placement(self, ops: CloudOps, creds: dict[str, Any]) -> asyncio.Future:
        """The zone's id and the custom disk offering: asked of the cloud at most once a minute per
        account and zone (they seldom change; a job that fails forgets them, so a removed offering
        costs one failed job, not a minute of them)."""
        key = self._placement_key(creds)
        hit = self._placements.get(key)
        if hit is not None and hit[0] > time.monotonic():
            known = asyncio.get_running_loop().create_future()
            known.set_result(hit[1])
            return known

        async def ask() -> tuple[str, str]:
            found = await ops.placement(creds["zone"])
            self._placements[key] = (time.monotonic() + PLACEMENT_TTL, found)
            return found
        return asyncio.ensure_future(ask())

    async def preflight(self, req: ReplicationRequest, creds: dict[str, Any],
                        ops: CloudOps | None = None) -> list[dict[str, str]]:
        """The VM's preflight checks (shared/preflight.py), with the slots as admission counts them
        (read beside the other facts)."""
        vm, oma_vm_id = req.source_vm, creds.get("oma_vm_id") or ""
        # Paired with the VM's live volumes as create pairs its rows: the disks left need new volumes.
        wanted = [SimpleNamespace(unit_number=u, disk_id=d.id) for u, d in zip(vm.disk_slots(), vm.disks)]

        async def slots() -> tuple[int, int, int]:
            async with self.sessions() as db:
                new = len(wanted) - len(admission.pair(wanted, await admission.holdings(db, vm.uuid or vm.id)))
                used = await admission.used(db, oma_vm_id)
                cap = admission.capacity(self.settings, await db.get(ApplianceSlots, oma_vm_id))
            return new, cap, max(cap - used, 0)
        client = ops or self.cloud(creds)
        try:
            (new, cap, free), facts = await asyncio.gather(slots(), preflight.gather(
                vm.model_dump(mode="json", exclude_none=True), call=self.bus.call, client=client.client,
                cbt_probe=self.driver.cbt_enabled, capacity=0, free_slots=0, new_disks=0))
        finally:
            if ops is None:
                await client.close()
        facts.new_disks, facts.capacity, facts.free_slots = new, cap, free
        return preflight.evaluate(facts, incremental=req.replication_type == "incremental")

    async def pump(self) -> None:
        """Admit queued jobs, oldest first per appliance VM, while their disks fit: whichever
        process releases disks starts the jobs waiting for them, its own or another's."""
        async with self.sessions() as db:
            appliances = await admission.appliances_waiting(db)
        for oma_vm_id in appliances:
            async with self._admission:
                async with self.sessions.begin() as db:
                    slots = await admission.lock(db, oma_vm_id)
                    started = await admission.admit_queued(db, oma_vm_id, admission.capacity(self.settings, slots),
                                                           self.settings.provision_lease)
                for job_id in started:
                    JOBS.labels(status=PROVISIONING).inc()
                    self.log.info("queued replication job admitted", extra={"job_id": job_id})
                    await self.emit(job_id, Replication.EVT_STATUS)
                    self._start(job_id)
        await self.refresh_gauges()

    def _start(self, job_id: str, creds: dict[str, Any] | None = None,
               admitted: tuple[ReplicationJob, list[JobVolume]] | None = None,
               start: CloudStart | None = None) -> asyncio.Task:
        if start is not None:
            start.taken = True  # the task closes its client now
        task = self.spawn(self._provision(job_id, creds, admitted, start))
        self._running[job_id] = task
        # Only this task's entry: a job queued again and re-admitted has a newer one.
        task.add_done_callback(lambda t: self._running.pop(job_id) if self._running.get(job_id) is t else None)
        return task

    # -- provisioning ---------------------------------------------------------------------------

    async def _provision(self, job_id: str, creds: dict[str, Any] | None = None,
                         admitted: tuple[ReplicationJob, list[JobVolume]] | None = None,
                         start: CloudStart | None = None) -> tuple[ReplicationJob, list[JobVolume]] | None:
        """Provision every disk of an admitted job at once (`creds`, `admitted`, `start`: the
        configuration the create just fetched, the job and rows as its admission left them, its cloud
        client and placement lookup: none asked again)."""
        started = time.monotonic()
        result = "failed"
        ops: CloudOps | None = start.ops if start else None
        try:
            job, rows = admitted or await self.load(job_id)
            if job.status != PROVISIONING:  # cancelled before it could start: nothing to create
                result = "cancelled"
                return None
            creds = creds or await self.credentials(job.ossea_config_id)
            ops = ops or self.cloud(creds)
            placement = None
            if any(r.created_by_job for r in rows):
                placement = await (start.placing if start else ops.placement(creds["zone"]))
            outcomes = await asyncio.gather(*(self._provision_disk(ops, job, r, placement, creds["oma_vm_id"])
                                              for r in rows), return_exceptions=True)
            failures = [o for o in outcomes if isinstance(o, BaseException)]
            if failures and all(isinstance(f, CloudCapacityError) for f in failures):
                if await self._requeue_for_capacity(job_id, ops, creds["oma_vm_id"], failures[0]):
                    result = "requeued"
                    return None
            if failures:
                raise failures[0]
            ready = await self._ready(job_id)
            result = "ready"
            return ready
        except asyncio.CancelledError:
            result = "cancelled"
            raise
        except Exception as exc:  # noqa: BLE001 - any failure fails the job, with its text
            if creds is not None:
                self._placements.pop(self._placement_key(creds), None)
            await self.fail(job_id, error_text(exc), ops)
            return None
        finally:
            PROVISION.labels(result=result).observe(time.monotonic() - started)
            if start is not None:
                await start.drop_placement()  # not needed (no new volume) or already answered
            if ops is not None:
                await ops.close()

    async def _requeue_for_capacity(self, job_id: str, ops: CloudOps, oma_vm_id: str,
                                    refusal: CloudCapacityError) -> bool:
        """The cloud refused an attach for want of a disk slot on the appliance VM: learn what it
        holds, give back what this job made (each detach confirmed before its delete), and queue the
        job again at its place; it starts when disks are released. False (the job then fails) when its
        volumes could not all be released, or when it needs more disks than the VM can ever hold."""
        async with self.sessions() as db:
            ours = set((await db.scalars(select(JobVolume.volume_id).where(
                JobVolume.holds_volume.is_(True), JobVolume.volume_id.is_not(None)))).all())
        learned = admission.learned_from(refusal.limit, await ops.attached_to(oma_vm_id), ours)
        await self.cleanup(job_id, created_only=True, ops=ops)
        async with self._admission:
            async with self.sessions.begin() as db:
                cap = await admission.learn(db, self.settings, oma_vm_id, learned, error_text(refusal))
                job = await queries.job(db, job_id)
                rows = await queries.rows(db, job_id)
                new = sum(r.created_by_job for r in rows)
                if job.cleanup_pending or job.status != PROVISIONING or new > cap:
                    return False
                for r in rows:
                    if r.created_by_job:
                        r.status, r.holds_volume, r.error = D_QUEUED, False, None
                        r.volume_id = r.device_id = r.device_path = None
                        r.export_name = r.export_port = r.export_uri = None
                job.status, job.started_at, job.current_operation = QUEUED, None, "Queued"
                job.message = (f"Waiting for free disk slots: the appliance VM holds at most {cap} disks "
                               "for replication (learnt from the cloud's refusal)")[:255]
        JOBS.labels(status=QUEUED).inc()
        self.log.warning("replication job queued again: the appliance VM has no free disk slot",
                         extra={"job_id": job_id, "oma_vm_id": oma_vm_id, "capacity": cap,
                                "reason": error_text(refusal)})
        await self.emit(job_id, Replication.EVT_STATUS)
        await self.pump()
        return True

    async def _provision_disk(self, ops: CloudOps, job: ReplicationJob, row: JobVolume,
                              placement: tuple[str, str] | None, oma_vm_id: str) -> None:
        attached: dict[str, Any] = {}  # what the attach answered, written with the next step's record
        try:
            if row.created_by_job:
                assert placement is not None
                volume_id, current = await self._existing_volume(ops, row, oma_vm_id)
                if volume_id is None:
                    async def record(volume_id: str) -> None:
                        await self._set(row.id, volume_id=volume_id)

                    async def sending() -> None:  # stamps updated_at: a restart waits out this attempt
                        await self._set(row.id, status=D_CREATING, updated_at=utcnow())
                    volume_id = await ops.create_volume(row.volume_name, placement[0], placement[1],
                                                        row.size_gb, record, sending)
                if not current or current.get("virtualmachineid") != oma_vm_id:
                    # `created` is not recorded on its way to `attaching`: one write less between the
                    # two cloud jobs (a restart in between settles first, then finds it unattached).
                    await self._set(row.id, volume_id=volume_id, status=D_ATTACHING, updated_at=utcnow())
                    volume = await ops.attach(volume_id, oma_vm_id)
                    attached = {"device_id": volume.get("deviceid")}
                path = await self.resolver.resolve(volume_id, self.settings.device_wait)
            else:
                path = await self._reused_device(ops, row, oma_vm_id)
            # The device recorded while the export is ensured: the ensure is idempotent, so a restart
            # in between only ensures it again (the record spares that restart the in-flight wait).
            # Both finish before either's error is raised: no late write after the failure's.
            recorded, export = await asyncio.gather(
                self._set(row.id, status=D_EXPORTING, device_path=path, **attached),
                self.call(Exports.ENSURE, {"vm_id": job.vm_key, "disk_unit_number": row.unit_number,
                                           "vm_name": job.vm_name, "device_path": path}), return_exceptions=True)
            for outcome in (recorded, export):
                if isinstance(outcome, BaseException):
                    raise outcome
            await self._set(row.id, status=D_READY, export_name=export["export_name"],
                            export_port=export.get("port"), export_uri=export.get("uri"),
                            reused=bool(export.get("reused")),
                            device_path=export.get("device_path") or path)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            await self._set(row.id, status=D_FAILED, error=error_text(exc), **attached)
            raise

    async def _existing_volume(self, ops: CloudOps, row: JobVolume,
                               oma_vm_id: str) -> tuple[str | None, dict[str, Any] | None]:
        """What a job resumed after a restart already has in the cloud for this disk: after any call
        sent before the restart can no longer land (`_settle`), every volume carrying the disk's unique
        name; one is kept (the recorded one, else the one attached to us) and the others are released.
        A fresh disk (status pending, no id) costs no cloud call."""
        if row.volume_id is None and row.status == D_PENDING:
            return None, None
        if row.status in (D_CREATING, D_ATTACHING):
            await self._settle(row)
        found = await ops.by_name(row.volume_name)
        if not found:
            current = await ops.volume(row.volume_id) if row.volume_id else None
            return (row.volume_id, current) if current is not None else (None, None)
        keep = (next((v for v in found if v["id"] == row.volume_id), None)
                or next((v for v in found if v.get("virtualmachineid") == oma_vm_id), found[0]))
        if keep["id"] != row.volume_id:
            await self._set(row.id, volume_id=keep["id"])
        for extra in (v for v in found if v["id"] != keep["id"]):
            self.log.warning("duplicate volume of a resumed disk released",
                             extra={"job_id": row.job_id, "volume_id": extra["id"], "kept": keep["id"]})
            await ops.release(extra["id"])
        return keep["id"], keep

    def inflight_grace(self) -> float:
        grace = self.settings.cloud_inflight_grace
        return self.settings.cloud_job_timeout if grace is None else grace

    async def _settle(self, row: JobVolume) -> None:
        """Wait until a createVolume/attachVolume sent before the restart (stamped in `updated_at`)
        can no longer take effect in the cloud; only then is what the cloud holds final."""
        left = self.inflight_grace() - (utcnow() - row.updated_at).total_seconds()
        if left > 0:
            self.log.info("resumed disk waits for calls sent before the restart",
                          extra={"job_id": row.job_id, "unit_number": row.unit_number, "seconds": round(left, 1)})
            await asyncio.sleep(left)

    async def _reused_device(self, ops: CloudOps, row: JobVolume, oma_vm_id: str) -> str:
        """The VM's existing volume: normally still attached; re-attached if someone detached it."""
        try:
            return await self.resolver.resolve(row.volume_id, min(1.0, self.settings.device_wait))
        except errors.OmaError:
            pass
        current = await ops.volume(row.volume_id)
        if current is None:
            raise errors.BadGateway("Volume gone", f"volume {row.volume_id} (disk {row.unit_number}) no longer "
                                    "exists in OSSEA; delete the VM's last job to start afresh")
        if current.get("virtualmachineid") not in (None, oma_vm_id):
            raise errors.Conflict("Volume attached elsewhere", f"volume {row.volume_id} is attached to VM "
                                  f"{current['virtualmachineid']}")
        if current.get("virtualmachineid") is None:
            volume = await ops.attach(row.volume_id, oma_vm_id)
            await self._set(row.id, device_id=volume.get("deviceid"))
        return await self.resolver.resolve(row.volume_id, self.settings.device_wait)

    async def _ready(self, job_id: str) -> tuple[ReplicationJob, list[JobVolume]] | None:
        """Ready for sync: the job and its rows as they were made so (None: another run did it)."""
        async with self.sessions.begin() as db:
            # Atomic: of two provisioning runs of one job (a resumed one racing a late one), one
            # makes it ready, so its sync starts once.
            moved = await db.execute(update(ReplicationJob).where(
                ReplicationJob.job_id == job_id, ReplicationJob.status == PROVISIONING).values(status=READY))
            if moved.rowcount != 1:
                return None
            job = await queries.job(db, job_id)
            rows = await queries.rows(db, job_id)
            job.status, job.progress_percent, job.ready_at = READY, 100.0, utcnow()
            job.current_operation = "Ready for sync"
            job.message = REUSED_MESSAGE if any(r.reused for r in rows) else NEW_MESSAGE
            # The status event numbered in this transaction: the row is locked by the update above
            # until commit, and one transaction less stands before the reply.
            events = numbered(job, rows, [Replication.EVT_STATUS])
        JOBS.labels(status=READY).inc()
        self.log.info("replication job ready for sync", extra={"job_id": job_id, "disks": len(rows)})
        self.spawn(self.publish(job_id, events))  # committed: the reply need not wait for the stream's ack
        self.driver.ready(job_id)  # issue 16 hook: start the sync through the job's VMA (driver.py)
        return job, rows

    # -- failure, cancel, cleanup ---------------------------------------------------------------

    async def fail(self, job_id: str, error: str, ops: CloudOps | None = None) -> None:
        async with self.sessions.begin() as db:
            await queries.job(db, job_id)  # 404 for an unknown job
            # Atomic: of two failures of one job (two disks), one fails it and cleans up.
            moved = await db.execute(update(ReplicationJob).where(
                ReplicationJob.job_id == job_id, ReplicationJob.status.not_in(FINISHED)).values(
                status=FAILED, error=error[:4000], completed_at=utcnow(), current_operation="Failed",
                cleanup_pending=not self.keep_failed))
            if moved.rowcount != 1:
                return
        JOBS.labels(status=FAILED).inc()
        self._throughput.pop(job_id, None)
        self.log.warning("replication job failed", extra={"job_id": job_id, "error": error})
        await self.emit(job_id, Replication.EVT_FAILED)
        if not self.keep_failed:
            await self.cleanup(job_id, created_only=True, ops=ops)
        await self.pump()

    async def cancel(self, job_id: str) -> dict[str, Any]:
        """A job in flight is cancelled (what it created is removed); a finished job's volumes are released."""
        async with self._admission:
            async with self.sessions() as db:  # a failed-over VM's disks are not ours to release
                await handover.refuse_release(db, await queries.job(db, job_id))
            task = self._running.get(job_id)
            if task is not None:
                task.cancel()
                await asyncio.wait({task})
            async with self.sessions.begin() as db:
                job = await queries.job(db, job_id)
                before = job.status
                if before in IN_FLIGHT:
                    job.status, job.completed_at, job.current_operation = CANCELLED, utcnow(), "Cancelled"
                    job.cleanup_pending = True
                    for r in await queries.rows(db, job_id):
                        if r.status == D_QUEUED:
                            r.status = D_CANCELLED
        await self.driver.stop(job_id, before)  # issue 16 hook: the VMA's /cleanup of a running sync
        if before in IN_FLIGHT:
            JOBS.labels(status=CANCELLED).inc()
            self._throughput.pop(job_id, None)
            await self.emit(job_id, Replication.EVT_STATUS)
        released = await self.cleanup(job_id, created_only=before in IN_FLIGHT, sweep=True)
        await self.pump()
        job, _ = await self.load(job_id)
        self.log.info("replication job deleted", extra={"job_id": job_id, "was": before, "released": len(released)})
        what = "cancelled" if before in IN_FLIGHT else f"was {before}"
        if job.cleanup_pending:  # not silently `released_volumes: []`: what is left, and why
            what += f"; {job.message}"
        elif before not in IN_FLIGHT:
            what += "; its volumes were released"
        return {"success": True, "job_id": job_id, "status": job.status, "previous_status": before,
                "released_volumes": released, "message": f"Job {job_id} {what}",
                "cleanup_pending": bool(job.cleanup_pending)}

    async def cleanup(self, job_id: str, *, created_only: bool, ops: CloudOps | None = None,
                      sweep: bool = False) -> list[str]:
        """Deactivate exports, detach and delete the volumes the job holds (only those it created, or all).
        With `sweep`, volumes a finished job's rows name but no longer hold are looked up by name too.
        One cleanup of a job at a time: a DELETE's cleanup is marked pending while it runs, and the
        retry janitor, running beside it, sent a second detach and delete of each volume (a second
        detach queued behind the first is the straggler of apache/cloudstack#14214; the later
        delete failed with 431 and left the job `Cleanup pending`). The later one finds what is left."""
        async with self._cleanups.hold(job_id):
            return await self._cleanup(job_id, created_only=created_only, ops=ops, sweep=sweep)

    async def _cleanup(self, job_id: str, *, created_only: bool, ops: CloudOps | None,
                       sweep: bool) -> list[str]:
        job, rows = await self.load(job_id)
        targets = [r for r in rows if (r.holds_volume or (sweep and r.created_by_job and r.volume_name))
                   and (r.created_by_job or not created_only)]
        released: list[str] = []
        if targets:
            async with self.sessions() as db:  # volumes other jobs hold now (taken over): never touched
                others = set((await db.scalars(select(JobVolume.volume_id).where(
                    JobVolume.holds_volume.is_(True), JobVolume.job_id != job_id,
                    JobVolume.volume_id.is_not(None)))).all())
            own = ops is None
            try:
                if own:  # the configuration the job started with, by its recorded id
                    ops = self.cloud(await self._cleanup_credentials(job))
                outcomes = await asyncio.gather(
                    *(cleanup.release_row(self.sessions, self.bus, ops, job, r, others) for r in targets),
                    return_exceptions=True)
            except Exception as exc:  # noqa: BLE001 - e.g. the configuration is gone: retried on restart
                outcomes = [exc]
            finally:
                if own and ops is not None:
                    await ops.close()
            problems = [o for o in outcomes if isinstance(o, BaseException)]
            released = [v for o in outcomes if isinstance(o, list) for v in o]
            if problems:
                self.log.warning("cleanup incomplete", extra={"job_id": job_id, "reason": error_text(problems[0])})
        else:
            problems = []
        async with self.sessions.begin() as db:
            row = await queries.job(db, job_id)
            row.cleanup_pending = bool(problems)
            if problems:  # said on the job (and in the DELETE reply), not only in a log
                row.message = f"Cleanup pending: {error_text(problems[0])}"[:255]
            elif row.message and row.message.startswith("Cleanup pending"):
                row.message = "Cleanup done"
        await self.refresh_gauges()
        return released

    async def _cleanup_credentials(self, job: ReplicationJob) -> dict[str, Any]:
        try:
            return await self.credentials(job.ossea_config_id, wait=False)
        except errors.NotFound:
            raise errors.Conflict("OSSEA configuration gone", f"OSSEA configuration {job.ossea_config_id}, "
                                  "which this job's volumes were created with, no longer exists; they stay in "
                                  "the cloud until it is restored (retried every cleanup_retry_interval)") from None

    async def recover(self) -> None:
        """At start-up: unfinished cleanups are retried, provisioning jobs no process holds resume
        (adopting what the cloud already made for them), then the queue moves."""
        async with self.sessions() as db:
            pending = (await db.scalars(select(ReplicationJob.job_id).where(
                ReplicationJob.cleanup_pending.is_(True), ReplicationJob.status != PROVISIONING))).all()
        await self.retry_cleanups(pending)
        await self.resume_lapsed()
        await self.pump()
        await self.driver.resume()  # issue 16 hook: follow every sync running on a VMA again

    async def resume_lapsed(self) -> list[str]:
        """Resume the provisioning jobs whose process stopped renewing its lease (killed, restarted):
        this one's after a restart, another copy's when it died. Every step is recorded before it
        acts, so the job picks up where it stopped."""
        async with self._admission:
            async with self.sessions.begin() as db:
                claimed = await recovery.claim_lapsed(db, self.settings.provision_lease)
            for job_id in claimed:
                task = self._running.get(job_id)
                if task is not None and not task.done():  # ours and alive (a late renewal): claim renewed
                    continue
                self.log.warning("replication job interrupted by a restart; resuming", extra={"job_id": job_id})
                self._start(job_id)
        return claimed

    async def renew_leases(self) -> None:
        """Keep this process's claim on the jobs it provisions; stop those another copy cancelled
        (what they make after its cleanup has no holding row: the orphan sweep releases it)."""
        async with self.sessions.begin() as db:
            await recovery.renew(db, list(self._running), self.settings.provision_lease)
            stopped = await recovery.cancelled_elsewhere(db, list(self._running))
        for job_id in stopped:
            task = self._running.get(job_id)
            if task is not None:
                self.log.info("job cancelled by another copy; provisioning stopped", extra={"job_id": job_id})
                task.cancel()

    async def retry_cleanups(self, job_ids: list[str] | None = None) -> int:
        """Run the cleanups left unfinished (cloud or config service down); return how many still are."""
        if job_ids is None:
            async with self.sessions() as db:
                job_ids = list((await db.scalars(select(ReplicationJob.job_id).where(
                    ReplicationJob.cleanup_pending.is_(True), ReplicationJob.status.in_(FINISHED)))).all())
        for job_id in job_ids:
            job, _ = await self.load(job_id)
            await self.cleanup(job_id, created_only=job.status != COMPLETED)
        async with self.sessions() as db:
            left = await db.scalar(select(func.count()).select_from(ReplicationJob).where(
                ReplicationJob.cleanup_pending.is_(True), ReplicationJob.status.in_(FINISHED)))
        if job_ids and left < len(job_ids):
            await self.pump()
        return left or 0

    async def sweep_orphans(self) -> list[str]:
        """Release the cloud volumes this appliance made that no row holds: a createVolume that landed
        after its job was cancelled, failed or killed. A volume is touched only when its whole name is the
        one `volume_name` gives a job of this database (VM, disk, job id), on the same configuration,
        that can no longer adopt it (not queued, not provisioning, no cleanup of its own pending), and
        it is attached to no VM but ours. Unknown job ids (another appliance, a wiped database) are left."""
        async with self.sessions() as db:
            config_ids = (await db.scalars(select(ReplicationJob.ossea_config_id).distinct())).all()
        swept: list[str] = []
        for config_id in config_ids:
            try:
                creds = await self.credentials(config_id, wait=False)
            except errors.OmaError as exc:  # gone or down: its jobs' cleanups say so
                self.log.info("orphan sweep skips a configuration", extra={"ossea_config_id": config_id,
                                                                           "reason": error_text(exc)})
                continue
            ops = self.cloud(creds)
            try:
                swept += await cleanup.sweep_account(self.sessions, ops, config_id, creds.get("oma_vm_id"))
            finally:
                await ops.close()
        if swept:
            await self.refresh_gauges()
        return swept

    # -- failover's hand-over (handover.py) ----------------------------------------------------

    async def hand_over(self, body: handover.HandoverRequest) -> dict[str, Any]:
        async with self._admission:  # with the slot row's lock: no job of the VM is admitted meanwhile
            async with self.sessions.begin() as db:
                reply = await handover.hand_over(db, body)
        self.log.info("replica volumes handed over to a failed-over VM", extra={
            "job_id": body.job_id, "failover_id": body.failover_id, "volumes": reply["volume_ids"]})
        return reply

    async def quiesce(self, body: handover.HandoverRequest) -> dict[str, Any]:
        async with self._admission:  # with the slot row's lock, as hand_over
            async with self.sessions.begin() as db:
                return await handover.quiesce(db, body)

    async def resume(self, body: handover.HandoverRequest) -> dict[str, Any]:
        async with self.sessions.begin() as db:
            return await handover.resume(db, body)

    async def reclaim(self, body: handover.ReclaimRequest) -> dict[str, Any]:
        async with self._admission:
            async with self.sessions.begin() as db:
                reply = await handover.reclaim(db, body)
        self.log.info("replica volumes given back after a rollback", extra={
            "job_id": body.job_id, "failover_id": body.failover_id, "full_sync_next": reply.get("full_sync_next")})
        return reply

    # -- progress from the VMA ------------------------------------------------------------------

    async def progress(self, job_id: str, report: ProgressReport) -> dict[str, Any]:
        """A VMA report: recorded (progress.record), then the events, gauges and, on failure, cleanup."""
        async with self._progress_locks[job_id]:
            async with self.sessions.begin() as db:  # one transaction: the report and its events' seq
                reply, subjects, job, rows = await progress.record(db, job_id, report, self.keep_failed)
                events = numbered(job, rows, subjects)
            status = reply["status"]
            if status == REPLICATING and reply["vma_throughput_mbps"] is not None:
                self._throughput[job_id] = reply["vma_throughput_mbps"]
            elif status != REPLICATING:
                self._throughput.pop(job_id, None)
                self._progress_locks.pop(job_id, None)
            if status != REPLICATING or Replication.EVT_STATUS in subjects:
                JOBS.labels(status=status).inc()
            await self.publish(job_id, events)
        if status == FAILED and not self.keep_failed:
            self.spawn(self._after_vma_failure(job_id))
        THROUGHPUT.set(sum(self._throughput.values()))
        return reply

    async def _after_vma_failure(self, job_id: str) -> None:
        await self.cleanup(job_id, created_only=True)
        await self.pump()

    # -- reads ----------------------------------------------------------------------------------

    async def get(self, job_id: str) -> dict[str, Any]:
        job, rows = await self.load(job_id)
        return views.detail(job, rows)

    async def list(self, q: dict[str, Any]) -> dict[str, Any]:
        async with self.sessions() as db:
            return await queries.list_jobs(db, q)
