"""Replication jobs: admission (capacity, FIFO queue), provisioning of every disk at once, progress
from the VMA, cancel/delete with cleanup, and recovery after a restart.

Every resource is recorded before it is created: a disk's row carries the unique volume name before
createVolume is sent, and the volume id as soon as the cloud answers. So whatever stops this service,
the rows name every volume it may have created, and cleanup finds them (by id, else by name).

Admission is serialised by one lock in this process: run one replication service per appliance.
"""
from __future__ import annotations

import asyncio
import math
import re
import time
from collections import defaultdict
from datetime import datetime, timezone
from typing import Any

import orjson
from prometheus_client import Counter, Gauge, Histogram
from sqlalchemy import func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from services.replication import views
from services.replication.cloud import CloudOps, error_text
from services.replication.models import (
    CANCELLED,
    COMPLETED,
    D_ATTACHED,
    D_ATTACHING,
    D_CANCELLED,
    D_CREATED,
    D_CREATING,
    D_EXPORTING,
    D_FAILED,
    D_PENDING,
    D_QUEUED,
    D_READY,
    D_RELEASED,
    FAILED,
    FINISHED,
    IN_FLIGHT,
    JOB_STATUSES,
    PROVISIONING,
    QUEUED,
    READY,
    REPLICATING,
    JobVolume,
    ReplicationJob,
)
from shared import errors
from shared.bus import Reply
from shared.db import utcnow
from shared.plugins import get_backend
from shared.schemas import INT32_MAX, ProgressReport, ReplicationRequest
from shared.subjects import Config, Exports, Replication

GIB = 1024 ** 3
EWMA_ALPHA = 0.3  # weight of the newest throughput sample
ETA_MAX = INT32_MAX  # vma_eta_seconds is an INT column (68 years)
REUSED_MESSAGE = "Migration workflow started - VM export reused without SIGHUP operation"
NEW_MESSAGE = "Migration workflow started - VM exports created"

JOBS = Counter("oma_replication_jobs_total", "Replication jobs entering each status", ["status"])
PROVISION = Histogram("oma_replication_provision_duration_seconds", "From admission to ready_for_sync or failure",
                      ["result"], buckets=(.1, .25, .5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600))
THROUGHPUT = Gauge("oma_vma_throughput_mbps", "Smoothed VMA throughput summed over replicating jobs (MB/s)")
ATTACHED = Gauge("oma_attached_disks", "Data disks the appliance VM holds (or is about to) for replication")
SWEPT = Counter("oma_replication_orphans_swept_total", "OMA volumes no row holds, removed by the sweep")


def job_id_base(now: datetime) -> str:
    """The seed's `job-YYYYMMDD-HHMMSS`; `create` adds `-2`, `-3`... only when that second is taken."""
    return f"job-{now:%Y%m%d-%H%M%S}"


def rounded_gb(disk: Any) -> int:
    """Whole GiB, rounded up: from capacity_bytes when given (exact), else size_gb."""
    if disk.capacity_bytes:
        return max(1, math.ceil(disk.capacity_bytes / GIB))
    return max(1, math.ceil(disk.size_gb))


def volume_name(vm_name: str, unit: int, job_id: str) -> str:
    """Unique per job and disk: how a volume whose id was never recorded is found again, and how
    the orphan sweep proves a volume is OMA's (`parse_volume_name`)."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "-", vm_name)[:120]
    return f"migration-{safe}-disk-{unit}-{job_id}"


VOLUME_NAME_RE = re.compile(r"^migration-.+-disk-(?P<unit>\d+)-(?P<job_id>job-\d{8}-\d{6}(?:-\d+)?)$")


def parse_volume_name(name: str) -> tuple[str, int] | None:
    """(job_id, unit) of a name `volume_name` made, else None."""
    m = VOLUME_NAME_RE.match(name or "")
    return (m["job_id"], int(m["unit"])) if m else None


def parse_since(value: str) -> datetime:
    try:
        dt = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        raise errors.BadRequest("Validation failed", "since: expected an RFC 3339 time such as "
                                "2025-08-12T08:08:02Z") from None
    return dt.astimezone(timezone.utc).replace(tzinfo=None) if dt.tzinfo else dt


class Replicator:
    def __init__(self, app: Any):
        self.app = app
        self.settings = app.settings
        self.bus = app.bus
        self.sessions = app.sessions
        self.log = app.log
        self.cloud_backend = get_backend(app.pm, "cloud", self.settings.cloud_backend)
        self.resolver = get_backend(app.pm, "device-resolver", self.settings.device_resolver).factory(self.settings)
        self.keep_failed = bool(self.settings.keep_failed_resources)
        self._admission = asyncio.Lock()
        self._running: dict[str, asyncio.Task] = {}
        self._progress_locks: dict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._throughput: dict[str, float] = {}

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

    async def _job(self, db: AsyncSession, job_id: str) -> ReplicationJob:
        job = await db.scalar(select(ReplicationJob).where(ReplicationJob.job_id == job_id))
        if job is None:
            raise errors.NotFound("Job not found", f"No replication job with ID: {job_id}")
        return job

    @staticmethod
    async def _rows(db: AsyncSession, job_id: str) -> list[JobVolume]:
        return list((await db.scalars(select(JobVolume).where(JobVolume.job_id == job_id)
                                      .order_by(JobVolume.unit_number))).all())

    async def load(self, job_id: str) -> tuple[ReplicationJob, list[JobVolume]]:
        async with self.sessions() as db:
            return await self._job(db, job_id), await self._rows(db, job_id)

    async def _set(self, row_id: int, **values: Any) -> None:
        async with self.sessions.begin() as db:
            await db.execute(update(JobVolume).where(JobVolume.id == row_id).values(**values))

    async def emit(self, job_id: str, subject: str) -> None:
        """Record the next seq, then publish (a failed publish is logged: the state is committed)."""
        async with self.sessions.begin() as db:
            await db.execute(update(ReplicationJob).where(ReplicationJob.job_id == job_id)
                             .values(seq=ReplicationJob.seq + 1))
            payload = views.event(await self._job(db, job_id), await self._rows(db, job_id))
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
        vm = req.source_vm
        units = vm.disk_slots()  # the request was validated: no two disks share a slot
        creds = await self.credentials(req.ossea_config_id, wait=False)  # 404 for an unknown id
        if not creds.get("is_active", True):
            raise errors.Conflict("OSSEA configuration inactive",
                                  f"OSSEA configuration {req.ossea_config_id} ({creds.get('name')}) is not active")
        if not creds.get("oma_vm_id"):
            raise errors.Conflict("OSSEA configuration incomplete",
                                  f"OSSEA configuration {req.ossea_config_id} has no oma_vm_id: volumes need a VM "
                                  "to attach to")
        # Pre-flight: no volume for a disk that no NBD server could export (503 from export_manager).
        await self.bus.call(Exports.READY, {})
        key = vm.uuid or vm.id
        now = utcnow()
        async with self._admission:
            async with self.sessions.begin() as db:
                job_id = await self._free_job_id(db, job_id_base(now))
                busy = await db.scalar(select(ReplicationJob).where(
                    or_(ReplicationJob.vm_id == vm.id, ReplicationJob.vm_key == key),
                    ReplicationJob.status.in_(IN_FLIGHT)).limit(1))
                if busy is not None:
                    raise errors.Conflict("Replication job already in flight",
                                          f"VM {vm.name} already has job {busy.job_id} ({busy.status})")
                job = ReplicationJob(
                    job_id=job_id, vm_id=vm.id, vm_uuid=vm.uuid, vm_key=key, vm_name=vm.name,
                    ossea_config_id=req.ossea_config_id, replication_type=req.replication_type, status=QUEUED,
                    progress_percent=0.0, bytes_transferred=0, seq=0, cleanup_pending=False, created_at=now,
                    total_bytes=sum(d.capacity_bytes or int(d.size_gb * GIB) for d in vm.disks),
                    source_vm=orjson.dumps(vm.model_dump(mode="json", exclude_none=True)).decode(),
                    current_operation="Queued", message="Waiting for free disk slots on the appliance VM",
                    vcenter_host=req.vcenter_host, start_sync=req.start_sync)  # issue 16: driver.py
                db.add(job)
                await db.flush()  # the parent row first: no ORM relationship orders the inserts
                rows = [JobVolume(job_id=job_id, unit_number=unit, disk_id=d.id, disk_path=d.path,
                                  datastore=d.datastore, capacity_bytes=d.capacity_bytes, size_gb=rounded_gb(d),
                                  status=D_QUEUED, reused=False, created_by_job=False, holds_volume=False,
                                  bytes_transferred=0, created_at=now)
                        for unit, d in zip(units, vm.disks)]
                db.add_all(rows)
                await db.flush()
                held = await self._holdings(db, key)
                needed = sum(r.unit_number not in held for r in rows)
                if needed > self.settings.max_attached_disks:
                    raise errors.Conflict("Too many disks", f"VM {vm.name} needs {needed} new data disks; the "
                                          f"appliance VM holds at most {self.settings.max_attached_disks}")
                admitted = await self._try_admit(db, job, rows)
            JOBS.labels(status=job.status).inc()
            self.log.info("replication job created", extra={"job_id": job_id, "vm_name": vm.name,
                                                            "disks": len(rows), "status": job.status})
            await self.emit(job_id, Replication.EVT_CREATED)
            # Started under the admission lock: a cancel can never slip between admission and start.
            task = self._start(job_id) if admitted else None
        await self.refresh_gauges()
        if task is None:
            job, rows = await self.load(job_id)
            return Reply(views.create_reply(job, rows), status=202)
        # provision_wait counts from the request: the gateway's timeout is derived from it.
        await asyncio.wait({task}, timeout=max(0.0, self.settings.provision_wait - (time.monotonic() - entered)))
        job, rows = await self.load(job_id)
        if job.status == FAILED:
            raise errors.BadGateway("Replication job failed", f"job {job_id}: {job.error}")
        if job.status == CANCELLED:
            raise errors.Conflict("Replication job cancelled", f"job {job_id} was cancelled while provisioning")
        return Reply(views.create_reply(job, rows), status=201 if job.status == READY else 202)

    @staticmethod
    async def _free_job_id(db: AsyncSession, base: str) -> str:
        """`base`, else the first free `base-N` (N from 2): ids stay unique when jobs share a second.
        Called under the admission lock, so two creates never pick the same one."""
        taken = set((await db.scalars(select(ReplicationJob.job_id).where(
            or_(ReplicationJob.job_id == base, ReplicationJob.job_id.like(base + "-%"))))).all())
        n = 1
        job_id = base
        while job_id in taken:
            n += 1
            job_id = f"{base}-{n}"
        return job_id

    @staticmethod
    async def _holdings(db: AsyncSession, vm_key: str) -> dict[int, JobVolume]:
        """The VM's live volumes by unit number (the rows that hold them). Whatever the holding row's
        state: a failed or cancelled incremental job keeps the volumes it took over, and the next job
        takes them back instead of stranding them on the appliance VM."""
        q = (select(JobVolume).join(ReplicationJob, ReplicationJob.job_id == JobVolume.job_id)
             .where(ReplicationJob.vm_key == vm_key, JobVolume.holds_volume.is_(True),
                    JobVolume.volume_id.is_not(None)))
        return {r.unit_number: r for r in (await db.scalars(q)).all()}

    async def _try_admit(self, db: AsyncSession, job: ReplicationJob, rows: list[JobVolume]) -> bool:
        """FIFO: admitted when no older job waits and the new disks fit; reserves the slots at once."""
        earlier = await db.scalar(select(func.count()).select_from(ReplicationJob).where(
            ReplicationJob.status == QUEUED, ReplicationJob.id < job.id))
        if earlier:
            return False
        held = await self._holdings(db, job.vm_key)
        needed = sum(r.unit_number not in held for r in rows)
        used = await db.scalar(select(func.count()).select_from(JobVolume).where(JobVolume.holds_volume.is_(True)))
        if used + needed > self.settings.max_attached_disks:
            return False
        carry = job.replication_type == "incremental"
        for r in rows:
            old = held.get(r.unit_number)
            if old is not None:  # the VM's volume: taken over, export reused, change id carried
                r.volume_id, r.volume_name, r.device_id = old.volume_id, old.volume_name, old.device_id
                r.device_path, r.export_name, r.export_port = old.device_path, old.export_name, old.export_port
                r.previous_change_id = (old.change_id or old.previous_change_id) if carry else None
                old.holds_volume = False
            else:
                r.volume_name, r.created_by_job = volume_name(job.vm_name, r.unit_number, job.job_id), True
            r.holds_volume, r.status = True, D_PENDING
        job.status, job.started_at = PROVISIONING, utcnow()
        job.current_operation, job.message = "Provisioning volumes", None
        return True

    async def pump(self) -> None:
        """Admit queued jobs, oldest first, while their disks fit."""
        started = []
        async with self._admission:
            async with self.sessions.begin() as db:
                queued = (await db.scalars(select(ReplicationJob).where(ReplicationJob.status == QUEUED)
                                           .order_by(ReplicationJob.id))).all()
                for job in queued:
                    if not await self._try_admit(db, job, await self._rows(db, job.job_id)):
                        break
                    started.append(job.job_id)
            for job_id in started:
                JOBS.labels(status=PROVISIONING).inc()
                self.log.info("queued replication job admitted", extra={"job_id": job_id})
                await self.emit(job_id, Replication.EVT_STATUS)
                self._start(job_id)
        await self.refresh_gauges()

    def _start(self, job_id: str) -> asyncio.Task:
        task = self.app.spawn(self._provision(job_id))
        self._running[job_id] = task
        task.add_done_callback(lambda _t: self._running.pop(job_id, None))
        return task

    # -- provisioning ---------------------------------------------------------------------------

    async def _provision(self, job_id: str) -> None:
        started = time.monotonic()
        result = "failed"
        ops: CloudOps | None = None
        try:
            job, rows = await self.load(job_id)
            if job.status != PROVISIONING:  # cancelled before it could start: nothing to create
                result = "cancelled"
                return
            creds = await self.credentials(job.ossea_config_id)
            ops = self.cloud(creds)
            placement = await ops.placement(creds["zone"]) if any(r.created_by_job for r in rows) else None
            outcomes = await asyncio.gather(*(self._provision_disk(ops, job, r, placement, creds["oma_vm_id"])
                                              for r in rows), return_exceptions=True)
            failures = [o for o in outcomes if isinstance(o, BaseException)]
            if failures:
                raise failures[0]
            await self._ready(job_id)
            result = "ready"
        except asyncio.CancelledError:
            result = "cancelled"
            raise
        except Exception as exc:  # noqa: BLE001 - any failure fails the job, with its text
            await self.fail(job_id, error_text(exc), ops)
        finally:
            PROVISION.labels(result=result).observe(time.monotonic() - started)
            if ops is not None:
                await ops.close()

    async def _provision_disk(self, ops: CloudOps, job: ReplicationJob, row: JobVolume,
                              placement: tuple[str, str] | None, oma_vm_id: str) -> None:
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
                    await self._set(row.id, volume_id=volume_id, status=D_CREATED)
                if not current or current.get("virtualmachineid") != oma_vm_id:
                    await self._set(row.id, status=D_ATTACHING, updated_at=utcnow())
                    volume = await ops.attach(volume_id, oma_vm_id)
                    await self._set(row.id, status=D_ATTACHED, device_id=volume.get("deviceid"))
                path = await self.resolver.resolve(volume_id, self.settings.device_wait)
            else:
                path = await self._reused_device(ops, row, oma_vm_id)
            await self._set(row.id, status=D_EXPORTING, device_path=path)
            export = await self.call(Exports.ENSURE, {"vm_id": job.vm_key, "disk_unit_number": row.unit_number,
                                                      "vm_name": job.vm_name, "device_path": path})
            await self._set(row.id, status=D_READY, export_name=export["export_name"],
                            export_port=export.get("port"), export_uri=export.get("uri"),
                            reused=bool(export.get("reused")),
                            device_path=export.get("device_path") or path)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            await self._set(row.id, status=D_FAILED, error=error_text(exc))
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

    async def _ready(self, job_id: str) -> None:
        async with self.sessions.begin() as db:
            job = await self._job(db, job_id)
            if job.status != PROVISIONING:
                return
            rows = await self._rows(db, job_id)
            job.status, job.progress_percent, job.ready_at = READY, 100.0, utcnow()
            job.current_operation = "Ready for sync"
            job.message = REUSED_MESSAGE if any(r.reused for r in rows) else NEW_MESSAGE
        JOBS.labels(status=READY).inc()
        self.log.info("replication job ready for sync", extra={"job_id": job_id, "disks": len(rows)})
        await self.emit(job_id, Replication.EVT_STATUS)
        self.driver.ready(job_id)  # issue 16 hook: start the sync through the job's VMA (driver.py)

    # -- failure, cancel, cleanup ---------------------------------------------------------------

    async def fail(self, job_id: str, error: str, ops: CloudOps | None = None, *, pump: bool = True) -> None:
        async with self.sessions.begin() as db:
            job = await self._job(db, job_id)
            if job.status in FINISHED:
                return
            job.status, job.error, job.completed_at = FAILED, error[:4000], utcnow()
            job.current_operation, job.cleanup_pending = "Failed", not self.keep_failed
        JOBS.labels(status=FAILED).inc()
        self._throughput.pop(job_id, None)
        self.log.warning("replication job failed", extra={"job_id": job_id, "error": error})
        await self.emit(job_id, Replication.EVT_FAILED)
        if not self.keep_failed:
            await self.cleanup(job_id, created_only=True, ops=ops)
        if pump:
            await self.pump()

    async def cancel(self, job_id: str) -> dict[str, Any]:
        """A job in flight is cancelled (what it created is removed); a finished job's volumes are released."""
        async with self._admission:
            task = self._running.get(job_id)
            if task is not None:
                task.cancel()
                await asyncio.wait({task})
            async with self.sessions.begin() as db:
                job = await self._job(db, job_id)
                before = job.status
                if before in IN_FLIGHT:
                    job.status, job.completed_at, job.current_operation = CANCELLED, utcnow(), "Cancelled"
                    job.cleanup_pending = True
                    for r in await self._rows(db, job_id):
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
        With `sweep`, volumes a finished job's rows name but no longer hold are looked up by name too."""
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
                outcomes = await asyncio.gather(*(self._release_row(ops, job, r, others) for r in targets),
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
            row = await self._job(db, job_id)
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

    async def _release_row(self, ops: CloudOps, job: ReplicationJob, row: JobVolume, others: set[str]) -> list[str]:
        if row.holds_volume and (row.export_name or row.status in (D_EXPORTING, D_READY)):
            target = ({"export_name": row.export_name} if row.export_name
                      else {"vm_id": job.vm_key, "disk_unit_number": row.unit_number})
            try:
                await self.bus.call(Exports.DEACTIVATE, target)
            except errors.NotFound:
                pass
            except errors.OmaError as exc:  # the volume still goes; export_manager drops exports of gone devices
                self.log.warning("could not deactivate an export", extra={"job_id": job.job_id,
                                                                           "reason": error_text(exc), **target})
        ids = [row.volume_id] if row.volume_id and row.holds_volume else []
        if row.created_by_job and row.volume_name:  # volumes whose id the row never learnt
            ids += [v["id"] for v in await ops.by_name(row.volume_name) if v["id"] not in ids and v["id"] not in others]
        for volume_id in ids:
            await ops.release(volume_id)
        if row.holds_volume:
            await self._set(row.id, holds_volume=False,
                            status=row.status if row.status == D_FAILED else D_RELEASED)
        return ids

    async def recover(self) -> None:
        """At start-up: unfinished cleanups are retried, jobs interrupted while provisioning resume
        (adopting what the cloud already made for them), then the queue moves."""
        async with self.sessions() as db:
            interrupted = (await db.scalars(select(ReplicationJob.job_id)
                                            .where(ReplicationJob.status == PROVISIONING))).all()
            pending = (await db.scalars(select(ReplicationJob.job_id).where(
                ReplicationJob.cleanup_pending.is_(True), ReplicationJob.status != PROVISIONING))).all()
        await self.retry_cleanups(pending)
        async with self._admission:
            for job_id in interrupted:  # every step is recorded before it acts: pick up where it stopped
                self.log.warning("replication job interrupted by a restart; resuming", extra={"job_id": job_id})
                self._start(job_id)
        await self.pump()
        await self.driver.resume()  # issue 16 hook: follow every sync running on a VMA again

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
                swept += await self._sweep_account(ops, config_id, creds.get("oma_vm_id"))
            finally:
                await ops.close()
        if swept:
            await self.refresh_gauges()
        return swept

    async def _sweep_account(self, ops: CloudOps, config_id: int, oma_vm_id: str | None) -> list[str]:
        named = {v["id"]: (v, parsed) for v in await ops.data_volumes()
                 if (parsed := parse_volume_name(v.get("name", "")))}
        if not named:
            return []
        async with self.sessions() as db:
            jobs = {j.job_id: j for j in (await db.scalars(select(ReplicationJob).where(
                ReplicationJob.job_id.in_({p[0] for _, p in named.values()})))).all()}
            held = set((await db.scalars(select(JobVolume.volume_id).where(
                JobVolume.holds_volume.is_(True), JobVolume.volume_id.in_(list(named))))).all())
        swept = []
        for volume_id, (vol, (job_id, unit)) in named.items():
            job = jobs.get(job_id)
            if (job is None or job.ossea_config_id != config_id or volume_id in held
                    or vol["name"] != volume_name(job.vm_name, unit, job.job_id)  # the whole name, VM too
                    or job.status in (QUEUED, PROVISIONING) or job.cleanup_pending
                    or vol.get("virtualmachineid") not in (None, oma_vm_id)):
                continue
            try:
                await ops.release(volume_id)
            except Exception as exc:  # noqa: BLE001 - the next sweep tries again
                self.log.warning("orphan sweep could not release a volume",
                                 extra={"volume_id": volume_id, "reason": error_text(exc)})
                continue
            SWEPT.inc()
            swept.append(volume_id)
            self.log.warning("orphaned volume released", extra={"volume_id": volume_id, "volume_name": vol["name"],
                                                                "job_id": job_id, "unit_number": unit})
        return swept

    # -- progress from the VMA ------------------------------------------------------------------

    async def progress(self, job_id: str, report: ProgressReport) -> dict[str, Any]:
        async with self._progress_locks[job_id]:
            events: list[str] = []
            async with self.sessions.begin() as db:
                job = await self._job(db, job_id)
                if job.status in FINISHED:
                    raise errors.Conflict("Job finished", f"job {job_id} is {job.status}: no more progress accepted")
                if job.status in (QUEUED, PROVISIONING):
                    raise errors.Conflict("Job not ready", f"job {job_id} is {job.status}: its exports are not ready")
                rows = {r.unit_number: r for r in await self._rows(db, job_id)}
                stale = self._apply_bytes(job, report)
                for i, d in enumerate(report.disks or []):
                    row = rows.get(d.unit_number)
                    if row is None:
                        raise errors.BadRequest("Validation failed", f"disks.{i}.unit_number: job {job_id} has "
                                                f"no disk with unit number {d.unit_number}")
                    if d.bytes_transferred is not None:
                        row.bytes_transferred = max(row.bytes_transferred, d.bytes_transferred)
                    if d.total_bytes:
                        row.total_bytes = d.total_bytes
                    if report.status == COMPLETED and d.change_id:
                        row.change_id = d.change_id
                if report.current_operation and not stale:
                    job.current_operation = report.current_operation
                if report.status == REPLICATING and job.status == READY:
                    job.status = REPLICATING
                    events.append(Replication.EVT_STATUS)
                if report.status == REPLICATING and not stale:
                    events.append(Replication.EVT_PROGRESS)
                elif report.status == COMPLETED:
                    job.status, job.completed_at, job.progress_percent = COMPLETED, utcnow(), 100.0
                    job.bytes_transferred = max(job.bytes_transferred, job.total_bytes or 0)
                    job.vma_eta_seconds, job.current_operation = 0, report.current_operation or "Completed"
                    events.append(Replication.EVT_COMPLETED)
                elif report.status == FAILED:
                    job.status, job.completed_at, job.cleanup_pending = FAILED, utcnow(), not self.keep_failed
                    job.error = report.error or "the VMA reported a failure"
                    job.current_operation = report.current_operation or "Failed"
                    events.append(Replication.EVT_FAILED)
                status = job.status
                reply = {"success": True, "job_id": job_id, "status": job.status, "applied": not stale,
                         "progress_percent": round(job.progress_percent, 2),
                         "bytes_transferred": job.bytes_transferred, "total_bytes": job.total_bytes,
                         "vma_throughput_mbps": round(job.vma_throughput_mbps, 2)
                         if job.vma_throughput_mbps is not None else None,
                         "vma_eta_seconds": job.vma_eta_seconds}
            if status == REPLICATING and reply["vma_throughput_mbps"] is not None:
                self._throughput[job_id] = reply["vma_throughput_mbps"]
            elif status != REPLICATING:
                self._throughput.pop(job_id, None)
                self._progress_locks.pop(job_id, None)
            if status != REPLICATING or Replication.EVT_STATUS in events:
                JOBS.labels(status=status).inc()
            for subject in events:
                await self.emit(job_id, subject)
        if status == FAILED and not self.keep_failed:
            self.app.spawn(self._after_vma_failure(job_id))
        THROUGHPUT.set(sum(self._throughput.values()))
        return reply

    @staticmethod
    def _apply_bytes(job: ReplicationJob, report: ProgressReport) -> bool:
        """Bytes, percent, EWMA throughput and ETA; True when the report is older than what we have."""
        if report.total_bytes:
            job.total_bytes = report.total_bytes
        b = report.bytes_transferred
        if b is None:
            return False
        if b < job.bytes_transferred:
            return True  # out of order: never move backwards
        now = time.time()
        if b > job.bytes_transferred or job.last_report_ts is None:
            if job.last_report_ts is not None and now > job.last_report_ts:
                rate = (b - job.bytes_transferred) / (now - job.last_report_ts) / 1e6
                old = job.vma_throughput_mbps
                job.vma_throughput_mbps = rate if old is None else EWMA_ALPHA * rate + (1 - EWMA_ALPHA) * old
            job.last_report_ts = now
        job.bytes_transferred = b
        if job.total_bytes:
            job.progress_percent = min(100.0, 100.0 * b / job.total_bytes)
            if job.vma_throughput_mbps:
                eta = max(job.total_bytes - b, 0) / (job.vma_throughput_mbps * 1e6)
                job.vma_eta_seconds = math.ceil(min(eta, ETA_MAX))  # a trickle of bytes: years, not an overflow
        return False

    async def _after_vma_failure(self, job_id: str) -> None:
        await self.cleanup(job_id, created_only=True)
        await self.pump()

    # -- reads ----------------------------------------------------------------------------------

    async def get(self, job_id: str) -> dict[str, Any]:
        job, rows = await self.load(job_id)
        return views.detail(job, rows)

    async def list(self, q: dict[str, Any]) -> dict[str, Any]:
        try:
            limit = int(q.get("limit", 100))
            offset = int(q.get("offset", 0))
        except (TypeError, ValueError):
            raise errors.BadRequest("Validation failed", "limit/offset: expected integers") from None
        if not 1 <= limit <= 1000 or offset < 0:
            raise errors.BadRequest("Validation failed", "limit: 1..1000; offset: >= 0")
        conds = []
        if q.get("status"):
            if q["status"] not in JOB_STATUSES:
                raise errors.BadRequest("Validation failed", f"status: one of {', '.join(JOB_STATUSES)}")
            conds.append(ReplicationJob.status == q["status"])
        if q.get("vm_name"):
            conds.append(ReplicationJob.vm_name == q["vm_name"])
        if q.get("since"):
            conds.append(ReplicationJob.created_at >= parse_since(str(q["since"])))
        async with self.sessions() as db:
            total = await db.scalar(select(func.count()).select_from(ReplicationJob).where(*conds))
            jobs = (await db.scalars(select(ReplicationJob).where(*conds).order_by(ReplicationJob.id.desc())
                                     .limit(limit).offset(offset))).all()
            rows: dict[str, list[JobVolume]] = defaultdict(list)
            if jobs:
                for r in (await db.scalars(select(JobVolume).where(JobVolume.job_id.in_([j.job_id for j in jobs]))
                                           .order_by(JobVolume.unit_number))).all():
                    rows[r.job_id].append(r)
        return {"success": True, "jobs": [views.summary(j, rows[j.job_id]) for j in jobs],
                "total": total, "limit": limit, "offset": offset}
