"""The simulated VMA's copy jobs: a snapshot, one libnbd writer per disk, progress, faults, and the
change-id calls to OMA that the original copier makes.

A full sync writes every data extent of the source and zeroes its holes; an incremental one
writes exactly the blocks changed since the previous change id. Progress is kept in the
original's shape (`oma.shared.vma.ProgressResponse`), per disk too.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp

from oma.shared.vma import (DiskProgress, Phase, ProgressResponse, ProgressUpdate, StatusResponse, Throughput,
                        Timing, VmInfo)

from .disks import DiskImage, UnknownChangeId
from .libnbd import NbdConnection, NbdError

log = logging.getLogger("oma.vma.sim")

CHUNK = 4 << 20  # bytes per step of a throttled copy (its rate is kept per step)
BATCH = 64 << 20  # bytes per step otherwise: one worker-thread call, several requests in flight
ZERO_CHUNK = 64 << 20  # bytes per NBD zero request (holes)
# Every disk of every job copies at once: not asyncio's default pool (cores + 4 threads).
_WRITERS = ThreadPoolExecutor(max_workers=64, thread_name_prefix="vma-sim-nbd")
MB = 1_000_000


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class CopyFault(Exception):
    """An injected failure (fail after N bytes)."""


@dataclass
class Faults:
    """Injected by tests and users through `POST /sim/faults` (see docs/vma-simulator.md)."""
    fail_after_bytes: int | None = None  # a job fails once it has written this many bytes
    hang: bool = False  # copies stop before their next write until cleared
    throttle_bps: int | None = None  # bytes per second, per job
    replicate_delay: float | None = None  # seconds `POST /replicate` holds its answer, the copy running
    released: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    def __post_init__(self) -> None:
        self.released.set()

    def set_hang(self, hang: bool) -> None:
        self.hang = hang
        (self.released.clear if hang else self.released.set)()

    def view(self) -> dict[str, Any]:
        return {"fail_after_bytes": self.fail_after_bytes, "hang": self.hang, "throttle_bps": self.throttle_bps,
                "replicate_delay": self.replicate_delay}


class OmaReporter:
    """Logs in to OMA as this appliance and makes the copier's change-id calls. The routes may be
    missing (404) or OMA unreachable: the answer is recorded in `calls` and, unless `strict`, the
    sync goes on, as there is nothing the copy itself can do about it."""

    def __init__(self, appliance_id: str | None, token: str | None, *, strict: bool = False,
                 timeout: float = 10.0):
        self.appliance_id, self._token = appliance_id, token
        self.strict = strict
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        self.calls: list[dict[str, Any]] = []
        self._sessions: dict[str, str] = {}  # oma_url -> bearer token

    @property
    def enabled(self) -> bool:
        return bool(self.appliance_id and self._token)

    async def lookup_change_id(self, oma_url: str | None, vm_path: str, disk_id: str) -> str | None:
        """`GET /api/v1/replications/changeid?vm_path=&disk_id=`: the previous change id, or None."""
        answer = await self._call(oma_url, "GET", "/api/v1/replications/changeid",
                                  params={"vm_path": vm_path, "disk_id": disk_id})
        return (answer or {}).get("change_id") or None

    async def record_change_id(self, oma_url: str | None, job_id: str, disk_id: str, change_id: str) -> bool:
        """`POST /api/v1/replications/{job_id}/changeid {change_id, disk_id}`; False when not recorded."""
        answer = await self._call(oma_url, "POST", f"/api/v1/replications/{job_id}/changeid",
                                  body={"change_id": change_id, "disk_id": disk_id})
        return answer is not None

    async def _call(self, oma_url: str | None, method: str, path: str, *, params: dict | None = None,
                    body: dict | None = None) -> dict | None:
        entry: dict[str, Any] = {"method": method, "path": path, "params": params, "body": body,
                                 "oma_url": oma_url, "sent": False, "status": None, "outcome": None}
        self.calls.append(entry)
        if not self.enabled or not oma_url:
            entry["outcome"] = "not sent: no OMA URL" if self.enabled else \
                "not sent: no --appliance-id/--appliance-token given"
            return None
        try:
            async with aiohttp.ClientSession(timeout=self.timeout) as http:
                bearer = await self._login(http, oma_url)
                entry["sent"] = True
                async with http.request(method, oma_url.rstrip("/") + path, params=params, json=body,
                                        headers={"Authorization": f"Bearer {bearer}"}) as resp:
                    entry["status"] = resp.status
                    if resp.status == 401:
                        self._sessions.pop(oma_url, None)  # expired: log in again next time
                    if resp.status >= 400:
                        entry["outcome"] = f"OMA answered {resp.status}"
                        return None
                    entry["outcome"] = "ok"
                    return await resp.json(content_type=None) or {}
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
            entry["outcome"] = f"OMA unreachable: {type(exc).__name__}"
            return None
        finally:
            if entry["outcome"] != "ok":
                log.warning("OMA call %s %s not done: %s", method, path, entry["outcome"])

    async def _login(self, http: aiohttp.ClientSession, oma_url: str) -> str:
        if oma_url not in self._sessions:
            async with http.post(oma_url.rstrip("/") + "/api/v1/auth/login",
                                 json={"appliance_id": self.appliance_id, "token": self._token,
                                       "version": "oma-vma-sim"}) as resp:
                if resp.status != 200:
                    raise aiohttp.ClientResponseError(resp.request_info, (), status=resp.status,
                                                      message="login refused")
                self._sessions[oma_url] = (await resp.json())["session_token"]
        return self._sessions[oma_url]


@dataclass
class DiskTransfer:
    disk_id: str  # disk-<key>
    label: str | None
    image: DiskImage
    target: str  # nbd:// URI
    previous_change_id: str | None
    total_bytes: int = 0
    bytes_transferred: int = 0
    status: str = "queued"
    change_id: str | None = None  # the snapshot's, recorded after success
    incremental: bool = False
    runs: list[tuple[int, int, bool]] = field(default_factory=list)  # (offset, length, is_data)
    samples: deque = field(default_factory=lambda: deque(maxlen=64), repr=False)

    def progress(self) -> DiskProgress:
        return DiskProgress(disk_id=self.disk_id, label=self.label, bytes_transferred=self.bytes_transferred,
                            total_bytes=self.total_bytes,
                            percent=100.0 if self.status == "completed" else
                            _percent(self.bytes_transferred, self.total_bytes),
                            throughput_mbps=round(_rate(self.samples) / MB, 3), status=self.status)


@dataclass
class ReplicationJob:
    job_id: str
    vm: dict[str, Any]  # the VM as the vSphere source reads it
    disks: list[DiskTransfer]
    oma_url: str | None
    reporter: OmaReporter
    faults: Faults
    status: str = "running"
    current_operation: str = "initializing"
    errors: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.time)
    started_iso: str = field(default_factory=now_iso)
    last_update: str = field(default_factory=now_iso)
    phases: dict[str, Phase] = field(default_factory=dict)
    peak_bps: float = 0.0
    task: asyncio.Task | None = field(default=None, repr=False)
    _granted: int = 0  # bytes the faults let through so far
    _next_slot: float = 0.0  # when the throttle lets the next write start (loop time)
    samples: deque = field(default_factory=lambda: deque(maxlen=64), repr=False)

    @property
    def sync_type(self) -> str:
        return "incremental" if self.disks and all(d.incremental for d in self.disks) else "full"

    @property
    def bytes_transferred(self) -> int:
        return sum(d.bytes_transferred for d in self.disks)

    @property
    def total_bytes(self) -> int:
        return sum(d.total_bytes for d in self.disks)

    @property
    def finished(self) -> bool:
        return self.status in ("completed", "failed", "cancelled")

    # -- the work -------------------------------------------------------------------------

    async def run(self) -> None:
        held: list[asyncio.Lock] = []
        try:
            async with self._phase("snapshot"):
                for d in self.disks:
                    await d.image.lock.acquire()  # a guest write (mutate) waits for the copy
                    held.append(d.image.lock)
                await self._plan()
            async with self._phase("transfer"):
                await _all_or_nothing([self._copy(d) for d in self.disks])
            async with self._phase("record_change_ids"):
                for d in self.disks:
                    recorded = await self.reporter.record_change_id(self.oma_url, self.job_id, d.disk_id,
                                                                    d.change_id)
                    if not recorded and self.reporter.strict:
                        raise CopyFault(f"OMA did not record change id of {d.disk_id}")
            async with self._phase("cleanup"):
                pass  # the simulated snapshot has nothing to remove
            self._finish("completed", "completed")
        except asyncio.CancelledError:
            self._finish("cancelled", "cancelled by cleanup")
            raise
        except (CopyFault, NbdError, OSError) as exc:
            self.errors.append(str(exc))
            self._finish("failed", "failed")
            log.warning("job %s failed: %s", self.job_id, exc)
        finally:
            for lock in held:
                lock.release()

    async def _plan(self) -> None:
        """Take the snapshot and work out, per disk, what to write."""
        for d in self.disks:
            previous = d.previous_change_id
            if previous is None:
                previous = await self.reporter.lookup_change_id(self.oma_url, self.vm["path"], d.disk_id)
            runs = None
            if previous:
                try:
                    runs = [(off, n, True) for off, n in d.image.changed_since(previous)]
                except UnknownChangeId as exc:
                    self.errors.append(f"{d.disk_id}: {exc}; full sync instead")
            d.incremental = runs is not None
            d.runs = runs if runs is not None else await asyncio.to_thread(lambda: list(d.image.extents()))
            d.total_bytes = sum(n for _, n, _ in d.runs)
            d.change_id = d.image.snapshot()

    async def _copy(self, d: DiskTransfer) -> None:
        d.status = "running"
        conn = await asyncio.to_thread(NbdConnection, d.target)
        try:
            if conn.size < d.image.size:
                raise CopyFault(f"{d.disk_id}: target {_safe_uri(d.target)} holds {conn.size} bytes, "
                                f"the disk needs {d.image.size}")
            fd = os.open(d.image.path, os.O_RDONLY)
            loop = asyncio.get_running_loop()
            try:
                for offset, length, is_data in d.runs:
                    end = offset + length
                    while offset < end:
                        step = (CHUNK if self.faults.throttle_bps else BATCH) if is_data else ZERO_CHUNK
                        n = await self._gate(min(end - offset, step))
                        await loop.run_in_executor(_WRITERS, _write, conn, fd, offset, n, is_data)
                        self._count(d, n)
                        offset += n
            finally:
                os.close(fd)
            await asyncio.to_thread(conn.flush)
            d.status = "completed"
        except BaseException:
            d.status = "failed"
            raise
        finally:
            await asyncio.to_thread(conn.close)

    async def _gate(self, n: int) -> int:
        """Apply the faults before a write; returns how much may be written now. The disks of a
        job share its byte budget and its rate, so both hold for the job as a whole."""
        await self.faults.released.wait()
        limit = self.faults.fail_after_bytes
        if limit is not None:
            left = limit - self._granted
            if left <= 0:
                await self._drain()
                raise CopyFault(f"injected fault: NBD write failed after {self.bytes_transferred} bytes")
            n = min(n, left)
        self._granted += n
        rate = self.faults.throttle_bps
        if rate:
            loop = asyncio.get_running_loop()
            start = max(loop.time(), self._next_slot)
            self._next_slot = start + n / rate
            await asyncio.sleep(self._next_slot - loop.time())
        return n

    async def _drain(self) -> None:
        """Let writes already granted finish, so the failure reports every byte written."""
        while self.bytes_transferred < self._granted:
            await asyncio.sleep(0.01)

    def _count(self, d: DiskTransfer, n: int) -> None:
        d.bytes_transferred += n
        t = time.monotonic()
        d.samples.append((t, d.bytes_transferred))
        self.samples.append((t, self.bytes_transferred))
        self.peak_bps = max(self.peak_bps, _rate(self.samples))
        self.last_update = now_iso()

    def cancel(self) -> None:
        if self.task is not None and not self.task.done():
            self.task.cancel()

    # -- phases ---------------------------------------------------------------------------

    def _phase(self, name: str) -> _PhaseContext:
        return _PhaseContext(self, name)

    def _finish(self, status: str, operation: str) -> None:
        self.status, self.current_operation, self.last_update = status, operation, now_iso()
        for phase in self.phases.values():
            if phase.status == "running":
                phase.status = "failed" if status != "completed" else "completed"
                phase.end_time = now_iso()

    def apply(self, update: ProgressUpdate) -> None:
        """A report of the copier (`POST /progress/{job_id}/update`), as the original VMA takes it."""
        disk = next((d for d in self.disks if d.disk_id == update.disk_id), None)
        if disk is not None:
            if update.total_bytes is not None:
                disk.total_bytes = update.total_bytes
            disk.bytes_transferred = max(disk.bytes_transferred, update.bytes_transferred)
        self.current_operation = update.stage
        if update.error_message:
            self.errors.append(update.error_message)
        if update.status and update.status.lower() in ("completed", "failed"):
            self._finish(update.status.lower(), update.stage)
        self.last_update = now_iso()

    # -- views ----------------------------------------------------------------------------

    def progress(self) -> ProgressResponse:
        elapsed = time.time() - self.started
        current = _rate(self.samples) if not self.finished else 0.0
        average = self.bytes_transferred / elapsed if elapsed > 0 else 0.0
        left = self.total_bytes - self.bytes_transferred
        running = next((p for p in self.phases.values() if p.status == "running"), None)
        phase_start = running.start_time if running else None
        size = sum(d.image.size for d in self.disks)
        return ProgressResponse(
            job_id=self.job_id, status=self.status, sync_type=self.sync_type,
            phase=running.name if running else self.current_operation,
            percentage=_percent(self.bytes_transferred, self.total_bytes) if self.status != "completed" else 100.0,
            current_operation=self.current_operation,
            bytes_transferred=self.bytes_transferred, total_bytes=self.total_bytes,
            throughput=Throughput(current_mbps=round(current / MB, 3), average_mbps=round(average / MB, 3),
                                  peak_mbps=round(self.peak_bps / MB, 3), last_update=self.last_update),
            timing=Timing(start_time=self.started_iso, last_update=self.last_update, elapsed_ms=int(elapsed * 1000),
                          phase_start=phase_start,
                          phase_elapsed_ms=int((time.time() - _epoch(phase_start)) * 1000) if phase_start else 0,
                          eta_seconds=int(left / current) if current > 0 and left > 0 else None),
            vm_info=VmInfo(name=self.vm.get("name"), path=self.vm.get("path"),
                           disk_size_gb=round(size / 1024 ** 3, 3), disk_size_bytes=size,
                           cbt_enabled=bool(self.vm.get("cbt_enabled"))),
            phases=list(self.phases.values()), errors=list(self.errors),
            last_error=self.errors[-1] if self.errors and self.status == "failed" else None,
            disk_progresses=[d.progress() for d in self.disks])

    def status_view(self) -> StatusResponse:
        p = self.progress()
        return StatusResponse(job_id=self.job_id, status=self.status, progress_percent=p.percentage,
                              current_operation=self.current_operation, start_time=self.started_iso,
                              last_update=self.last_update, vm_path=self.vm.get("path"))


class _PhaseContext:
    def __init__(self, job: ReplicationJob, name: str):
        self.job, self.name = job, name

    async def __aenter__(self) -> None:
        self.job.phases[self.name] = Phase(name=self.name, status="running", start_time=now_iso())
        self.job.current_operation = self.name
        self.started = time.monotonic()

    async def __aexit__(self, exc_type: Any, *exc: Any) -> None:
        phase = self.job.phases[self.name]
        phase.status = "completed" if exc_type is None else "failed"
        phase.end_time = now_iso()
        phase.duration_ms = int((time.monotonic() - self.started) * 1000)


async def _all_or_nothing(coros: list[Any]) -> None:
    """Run the disk copies together; the first failure stops the others and is raised."""
    tasks = [asyncio.create_task(c) for c in coros]
    try:
        done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    for t in done:
        if t.exception() is not None:
            raise t.exception()


def _write(conn: NbdConnection, fd: int, offset: int, n: int, is_data: bool) -> None:
    if is_data:
        conn.copy_from(fd, offset, n)
    else:
        conn.zero(n, offset)


def _rate(samples: deque, window: float = 2.0) -> float:
    """Bytes per second over the last `window` seconds of (time, cumulative bytes) samples."""
    if len(samples) < 2:
        return 0.0
    t1, b1 = samples[-1]
    if time.monotonic() - t1 > window:
        return 0.0
    t0, b0 = next(((t, b) for t, b in samples if t1 - t <= window), samples[0])
    return (b1 - b0) / (t1 - t0) if t1 > t0 else 0.0


def _percent(done: int, total: int) -> float:
    return round(100.0 * done / total, 2) if total else 0.0


def _epoch(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def _safe_uri(uri: str) -> str:
    """An NBD URI without userinfo (nbd URIs may carry a TLS PSK user)."""
    parts = urlsplit(uri)
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
