"""Orchestration: OMA starts every sync through the job's VMA and follows it to the end.

When a job's exports are ready and its vCenter is reached through a VMA (`start_sync`, by default
then), the driver calls the VMA's `POST /replicate` with the job's NBD targets, sets the job
`replicating`, and follows it: one loop polls the followed jobs' `GET /progress/{job_id}` each
`vma_poll_interval` (100 jobs cost 100 small GETs per interval, not 100 tasks; a job whose polls see
nothing move is polled less often, `schedule`), and the push route
feeds the same model (`Replicator.progress`, which ignores reports older than what it has).
A VMA that does not answer, or bytes that do not move, for `vma_stall_after` make the job
`stalled`; `vma_fail_after` later it fails with the reason. A failed sync keeps its volumes and
exports: the next job of the VM (a retry) takes them over.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from prometheus_client import Gauge
from sqlalchemy import select, update

from oma.services.replication import views
from oma.services.replication.cloud import error_text
from oma.services.replication.models import (
    COMPLETED,
    FAILED,
    FINISHED,
    READY,
    REPLICATING,
    STALLED,
    JobVolume,
    ReplicationJob,
)
from oma.shared import errors
from oma.shared.db import utcnow
from oma.shared.plugins import get_backend
from oma.shared.schemas import DiskProgress, ProgressReport
from oma.shared.subjects import Auth, Inventory, Replication
from oma.shared.vma import (CleanupRequest, NbdTarget, ProgressResponse, ReplicateRequest, VCenterCredentials,
                        VmaClient, VmaError, VmaNotFound, vcenter_address)

STALLED_JOBS = Gauge("oma_replication_stalled_jobs", "Jobs whose VMA stopped answering or whose bytes stopped moving")
FOLLOWED = Gauge("oma_replication_followed_jobs", "Jobs whose sync the replication service follows on a VMA")
UNREACHABLE = Gauge("oma_vma_unreachable_appliances", "VMAs whose last progress poll got no answer")
SEEN_EVERY = 30.0  # seconds between reachability updates to auth while nothing changes
QUIET_BACKOFF = 4  # a job whose polls see nothing move is polled up to 4x less often (never > stall/4)
NUDGE_DELAYS = (0.1, 0.3, 1.0)  # polls of a job whose copier recorded a change id (its sync is ending)


@dataclass
class Follow:
    job_id: str
    appliance_id: str
    client: VmaClient
    bytes: int = -1                      # the VMA's last bytes_transferred
    status: str = ""
    moved: float = field(default_factory=time.monotonic)
    error: str | None = None             # why the last poll failed
    stalled: bool = False
    idle: int = 0                        # polls in a row that saw nothing move
    due: float = 0.0                     # when the next round polls it (monotonic)


def device_uri(row: JobVolume, nbd_host: str) -> str:
    """The target the VMA writes: the export's URI (nbd:// or, with TLS, nbds:// with its PSK query),
    its host replaced by OMA_NBD_HOST when set; without a URI, nbd://OMA_NBD_HOST:port/export (hostless
    when unset)."""
    uri = urlsplit(row.export_uri or "")
    if uri.scheme not in ("nbd", "nbds"):
        return f"nbd://{nbd_host}:{row.export_port}/{row.export_name}"
    if not nbd_host:
        return row.export_uri  # type: ignore[return-value]
    user = f"{uri.username}@" if uri.username else ""
    port = f":{uri.port}" if uri.port else ""
    return urlunsplit(uri._replace(netloc=f"{user}{nbd_host}{port}"))


def schedule(f: Follow, moved: bool, sent: float, settings: Any) -> None:
    """When the poll sent at `sent` makes the next: every `vma_poll_interval` while the job moves
    (bytes or state); each quiet poll doubles the wait, up to QUIET_BACKOFF intervals and at most a
    quarter of `vma_stall_after` (a stall is still seen in time). Progress that advances in big
    steps, a VMA that does not answer, cost fewer polls."""
    base = settings.vma_poll_interval
    f.idle = 0 if moved else f.idle + 1
    wait = min(base * 2 ** min(f.idle, 8), base * QUIET_BACKOFF, settings.vma_stall_after / 4)
    f.due = sent + max(base, wait) - base / 2  # half an interval early: the round that comes polls it


class VmaDriver:
    def __init__(self, jobs: Any, pm: Any):
        self.jobs = jobs
        self.settings = jobs.settings
        self.log = jobs.log
        self.vma = get_backend(pm, "vma", "http")
        self._clients: dict[str, VmaClient] = {}
        self._follow: dict[str, Follow] = {}
        self._reach: dict[str, tuple[bool, float]] = {}  # appliance -> (reachable, when told auth)
        self._loop: asyncio.Task | None = None
        self._nudged: set[str] = set()
        # Jobs whose start is in flight here: start-up recovery's resume() can meet a job that
        # became ready meanwhile, and two /replicate calls for one job make the VMA refuse one,
        # which failed the job the other had started.
        self._starting: set[str] = set()

    # -- hooks (service.py) ------------------------------------------------------------------

    def ready(self, job_id: str) -> None:
        """A job's exports are ready: start its sync when a VMA reaches its VM."""
        self.jobs.spawn(self.start(job_id))

    async def stop(self, job_id: str, status: str) -> None:
        """DELETE of a running job: the VMA stops its copy (`POST /cleanup`) before volumes go."""
        follow = self._follow.pop(job_id, None)
        if status not in (REPLICATING, STALLED):
            return
        try:
            client = follow.client if follow else (await self._connection(await self._job(job_id)))[1]
            if client is not None:
                await client.cleanup(CleanupRequest(job_id=job_id, action="cleanup_all"))
        except errors.OmaError as exc:  # the copy dies with its exports anyway
            self.log.warning("VMA cleanup failed", extra={"job_id": job_id, "reason": error_text(exc)})
        self._gauges()

    async def resume(self) -> None:
        """After a restart: follow every job running on a VMA; start the ready ones not yet started."""
        async with self.jobs.sessions() as db:
            rows = (await db.execute(select(ReplicationJob.job_id, ReplicationJob.status).where(
                ReplicationJob.status.in_((READY, REPLICATING, STALLED))))).all()
        for job_id, status in rows:
            try:
                if status == READY:
                    await self.start(job_id, resumed=True)
                else:
                    job = await self._job(job_id)
                    appliance, client, _ = await self._connection(job)
                    if client is not None:
                        self._watch(Follow(job_id, appliance, client, bytes=job.bytes_transferred,
                                           stalled=status == STALLED))
            except Exception as exc:  # noqa: BLE001 - one job's trouble never stops the others
                self.log.warning("could not resume following a job", extra={"job_id": job_id,
                                                                             "reason": error_text(exc)})

    async def close(self) -> None:
        if self._loop is not None:
            self._loop.cancel()
            await asyncio.gather(self._loop, return_exceptions=True)
        for client in self._clients.values():
            await client.close()

    # -- starting ----------------------------------------------------------------------------

    async def _job(self, job_id: str) -> ReplicationJob:
        job, _ = await self.jobs.load(job_id)
        return job

    async def _connection(self, job: ReplicationJob) -> tuple[str, VmaClient | None, dict[str, Any]]:
        """(appliance id, client, vCenter connection) of the job's VMA; no client when none reaches it."""
        return await self._vma_of(job.vcenter_host or views.source_vm(job).get("vcenter"))

    async def cbt_enabled(self, vm: dict[str, Any]) -> bool | None:
        """CBT of a source VM as its VMA reads it from vCenter (preflight); None when no VMA reaches it."""
        _, client, conn = await self._vma_of(vm.get("vcenter"))
        if client is None or not vm.get("path"):
            return None
        creds = VCenterCredentials(vcenter=vcenter_address(conn["host"], conn.get("port")),
                                   username=conn["username"], password=conn["password"])
        return (await client.cbt_status(vm["path"], creds)).cbt_enabled

    async def _vma_of(self, vcenter: str | None) -> tuple[str, VmaClient | None, dict[str, Any]]:
        if not vcenter:
            return "", None, {}
        try:
            conn = (await self.jobs.call(Inventory.CONNECTION, {"vcenter": vcenter}))["connection"]
        except errors.NotFound:
            return "", None, {}
        if not conn.get("appliance_id"):
            return "", None, conn
        url = conn["api_url"]
        if url not in self._clients:
            self._clients[url] = self.vma.factory(url, self.settings)
        return conn["appliance_id"], self._clients[url], conn

    async def start(self, job_id: str, *, resumed: bool = False) -> None:
        """`resumed`: after a restart, the VMA may already run (or have finished) the sync a killed
        process asked for before it could record `replicating`: then it is followed, not started again.
        A start of a job already starting, or followed, in this process does nothing."""
        if job_id in self._starting or job_id in self._follow:
            return
        self._starting.add(job_id)
        try:
            await self._start(job_id, resumed)
        finally:
            self._starting.discard(job_id)

    async def _start(self, job_id: str, resumed: bool) -> None:
        try:
            job, rows = await self.jobs.load(job_id)
            if job.status != READY or job.start_sync is False:
                return
            appliance, client, conn = await self._connection(job)
            if client is None:
                if job.start_sync:  # asked for, but nothing can do it
                    await self.fail(job_id, f"start_sync: no VMA reaches vCenter "
                                            f"{job.vcenter_host or views.source_vm(job).get('vcenter')}")
                return
            request = self._replicate_request(job, rows, conn)
            if resumed and await self._known(client, job_id):
                self.log.info("sync already started on the VMA before a restart; following it",
                              extra={"job_id": job_id, "appliance_id": appliance})
            else:
                try:
                    await client.replicate(request)
                except VmaError as exc:
                    if "answered 409" not in (exc.details or ""):  # 409: already running (a restart between)
                        raise
                self.log.info("sync started on the VMA", extra={"job_id": job_id, "appliance_id": appliance,
                                                                "disks": len(rows)})
            await self.jobs.progress(job_id, ProgressReport(status=REPLICATING,
                                                            current_operation="Sync started on the VMA"))
            self._watch(Follow(job_id, appliance, client))
        except Exception as exc:  # noqa: BLE001 - the job says why; its volumes stay for a retry
            await self.fail(job_id, f"could not start the sync on the VMA: {error_text(exc)}")

    @staticmethod
    async def _known(client: VmaClient, job_id: str) -> bool:
        """Whether the VMA has a sync of this job, running or finished (its progress answers)."""
        try:
            await client.progress(job_id)
        except VmaNotFound:
            return False
        return True

    def _replicate_request(self, job: ReplicationJob, rows: list[JobVolume], conn: dict[str, Any]) -> ReplicateRequest:
        targets = []
        for r in rows:
            key = r.disk_id.removeprefix("disk-")
            if not key.isdigit():
                raise errors.BadRequest("Disk without a VMware key", f"disk {r.disk_id}: expected disk-<key>")
            targets.append(NbdTarget(device_path=device_uri(r, self.settings.nbd_host), vmware_disk_key=key,
                                     previous_change_id=r.previous_change_id))
        return ReplicateRequest(job_id=job.job_id, vcenter=vcenter_address(conn["host"], conn.get("port")),
                                username=conn["username"], password=conn["password"],
                                vm_paths=[views.source_vm(job)["path"]], oma_url=self.settings.oma_url,
                                nbd_targets=targets)

    # -- following ---------------------------------------------------------------------------

    def _watch(self, follow: Follow) -> None:
        self._follow[follow.job_id] = follow
        if self._loop is None or self._loop.done():
            self._loop = asyncio.create_task(self._run())
        self._gauges()

    async def _run(self) -> None:
        while self._follow:
            started = time.monotonic()
            try:
                due = [f for f in self._follow.values() if f.due <= started]
                if due:
                    await self.poll_once(due)
            except Exception:  # noqa: BLE001 - keep following; the next round tries again
                self.log.exception("progress poll failed")
            await asyncio.sleep(max(0.0, self.settings.vma_poll_interval - (time.monotonic() - started)))


    def nudge(self, job_id: str) -> None:
        """The copier recorded a change id: its sync ends within moments, so that job is polled soon
        (a few short tries) rather than at the next round, up to `vma_poll_interval` later."""
        if job_id in self._follow and job_id not in self._nudged:
            self._nudged.add(job_id)
            self.jobs.spawn(self._poll_soon(job_id))

    async def _poll_soon(self, job_id: str) -> None:
        try:
            for delay in NUDGE_DELAYS:
                await asyncio.sleep(delay)
                follow = self._follow.get(job_id)
                if follow is None:
                    return
                await self.poll_once([follow])
        except Exception:  # noqa: BLE001 - the regular round follows the job anyway
            self.log.exception("progress poll failed")
        finally:
            self._nudged.discard(job_id)

    async def poll_once(self, follows: list[Follow] | None = None) -> None:
        follows = list(self._follow.values()) if follows is None else follows
        async with self.jobs.sessions() as db:  # one query: jobs finished meanwhile (push route, DELETE)
            state = dict((await db.execute(select(ReplicationJob.job_id, ReplicationJob.status).where(
                ReplicationJob.job_id.in_([f.job_id for f in follows])))).all())
        for f in follows:
            if state.get(f.job_id) in FINISHED or f.job_id not in state:
                self._follow.pop(f.job_id, None)
        live = [f for f in follows if f.job_id in self._follow]
        sent = time.monotonic()
        answers = await asyncio.gather(*(f.client.progress(f.job_id) for f in live), return_exceptions=True)
        now = time.monotonic()
        for f, answer in zip(live, answers):
            before = (f.bytes, f.status)
            try:
                if isinstance(answer, VmaNotFound):  # answering, but the job is gone (a VMA restart)
                    await self.fail(f.job_id, f"the VMA no longer knows the sync: {error_text(answer)}")
                elif isinstance(answer, BaseException):
                    f.error = error_text(answer) if isinstance(answer, errors.OmaError) else repr(answer)
                    await self._check_stall(f, state.get(f.job_id), now)
                else:
                    f.error = None
                    await self._apply(f, answer, state.get(f.job_id), now)
            except Exception as exc:  # noqa: BLE001
                self.log.warning("could not apply VMA progress", extra={"job_id": f.job_id, "reason": repr(exc)})
            schedule(f, (f.bytes, f.status) != before, sent, self.settings)
        await self._report_reachability(live)
        self._gauges()

    async def _apply(self, f: Follow, p: ProgressResponse, status: str | None, now: float) -> None:
        if f.job_id not in self._follow:  # dropped meanwhile: completed by a nudged poll, deleted
            return
        if p.status == "completed":
            self._follow.pop(f.job_id, None)
            await self.jobs.progress(f.job_id, await self._completion(f.job_id, p))
            self.log.info("sync completed", extra={"job_id": f.job_id, "bytes": p.bytes_transferred})
        elif p.status in ("failed", "cancelled"):
            self._follow.pop(f.job_id, None)
            await self.fail(f.job_id, f"the VMA reports the sync {p.status}: {p.last_error or 'no reason given'}")
        else:
            moved = p.bytes_transferred > f.bytes
            if moved:
                f.moved = now
            if moved or p.status != f.status:
                f.bytes, f.status = p.bytes_transferred, p.status
                if f.stalled or status == STALLED:
                    f.stalled = False
                    await self._set_stalled(f.job_id, False)
                await self.jobs.progress(f.job_id, ProgressReport(
                    status=REPLICATING, current_operation=(p.current_operation or p.phase or None),
                    bytes_transferred=p.bytes_transferred, total_bytes=p.total_bytes or None))
            else:
                await self._check_stall(f, status, now)

    async def _completion(self, job_id: str, p: ProgressResponse) -> ProgressReport:
        """The completed report: per disk its bytes and the change id the copier recorded."""
        _, rows = await self.jobs.load(job_id)
        by_disk = {d.disk_id: d for d in p.disk_progresses}
        disks = [DiskProgress(unit_number=r.unit_number, change_id=r.change_id,
                              bytes_transferred=by_disk[r.disk_id].bytes_transferred if r.disk_id in by_disk else None,
                              total_bytes=by_disk[r.disk_id].total_bytes or None if r.disk_id in by_disk else None)
                 for r in rows]
        return ProgressReport(status=COMPLETED, current_operation="Completed", bytes_transferred=p.bytes_transferred,
                              total_bytes=p.total_bytes or None, disks=disks)

    async def _check_stall(self, f: Follow, status: str | None, now: float) -> None:
        quiet = now - f.moved  # an unanswered poll moves nothing either
        if quiet >= self.settings.vma_stall_after + self.settings.vma_fail_after:
            self._follow.pop(f.job_id, None)
            why = f"the VMA did not answer for {quiet:.0f} s ({f.error})" if f.error else \
                f"no bytes moved for {quiet:.0f} s"
            await self.fail(f.job_id, f"sync stalled, then failed: {why}")
        elif quiet >= self.settings.vma_stall_after and not f.stalled:
            f.stalled = True
            await self._set_stalled(f.job_id, True, f"the VMA does not answer ({f.error})" if f.error
                                    else f"no bytes moved for {quiet:.0f} s")

    async def _set_stalled(self, job_id: str, stalled: bool, why: str | None = None) -> None:
        async with self.jobs.sessions.begin() as db:
            changed = (await db.execute(update(ReplicationJob).where(
                ReplicationJob.job_id == job_id,
                ReplicationJob.status == (REPLICATING if stalled else STALLED)).values(
                status=STALLED if stalled else REPLICATING, stalled_at=utcnow() if stalled else None,
                current_operation=f"Stalled: {why}"[:255] if stalled else "Sync resumed"))).rowcount
        if changed:
            self.log.warning("sync stalled" if stalled else "sync moving again", extra={"job_id": job_id,
                                                                                         "reason": why})
            await self.jobs.emit(job_id, Replication.EVT_STATUS)

    async def fail(self, job_id: str, error: str) -> None:
        """Failed, volumes and exports kept (no cleanup): a retry of the VM takes them over."""
        self._follow.pop(job_id, None)
        async with self.jobs.sessions.begin() as db:
            changed = (await db.execute(update(ReplicationJob).where(
                ReplicationJob.job_id == job_id, ReplicationJob.status.not_in(FINISHED)).values(
                status=FAILED, error=error[:4000], completed_at=utcnow(), current_operation="Failed",
                stalled_at=None))).rowcount
        if changed:
            self.log.warning("sync failed", extra={"job_id": job_id, "error": error})
            await self.jobs.emit(job_id, Replication.EVT_FAILED)
            await self.jobs.pump()
        self._gauges()

    async def _report_reachability(self, follows: list[Follow]) -> None:
        """Tell auth (appliances' `reachable`, `last_seen`) on a change, else every SEEN_EVERY s."""
        now = time.monotonic()
        for appliance in {f.appliance_id for f in follows}:
            ok = any(f.error is None for f in follows if f.appliance_id == appliance)
            before = self._reach.get(appliance)
            if before is not None and before[0] == ok and now - before[1] < SEEN_EVERY:
                continue
            self._reach[appliance] = (ok, now)
            try:
                await self.jobs.bus.call(Auth.APPLIANCE_SEEN, {"appliance_id": appliance, "reachable": ok})
            except errors.OmaError as exc:
                self.log.info("could not record VMA reachability", extra={"appliance_id": appliance,
                                                                          "reason": error_text(exc)})

    def health(self) -> dict[str, Any]:
        """The `vmas` field of /health: the VMAs whose last poll got no answer, and the jobs waiting."""
        down = sorted(a for a, (ok, _) in self._reach.items() if not ok)
        return {"followed_jobs": len(self._follow), "stalled_jobs": sum(f.stalled for f in self._follow.values()),
                "unreachable": down,
                "waiting_jobs": sum(1 for f in self._follow.values() if f.appliance_id in down)}

    def _gauges(self) -> None:
        FOLLOWED.set(len(self._follow))
        STALLED_JOBS.set(sum(1 for f in self._follow.values() if f.stalled))
        UNREACHABLE.set(sum(1 for ok, _ in self._reach.values() if not ok))
