"""The CloudStack simulator's async jobs: each async command hands back its work, which runs as a
job with a controllable lifetime on its VM's work queue (one job at a time per VM, VMs in
parallel, as CloudStack's VmWorkJobDispatcher does); `queryAsyncJobResult` reads it."""
from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from .signing import format_date
from .sim_common import ACCOUNT_ID, ApiError, _Args, _now, _uuid
from .sim_faults import Fault

JOB_CMD_PACKAGE = "org.apache.cloudstack.api.command.user.volume"


@dataclass
class Job:
    id: str
    command: str
    instance_id: str
    work: Callable[[], dict[str, Any]]  # runs when the job completes; returns jobresult or raises
    vm_id: str | None = None  # the VM whose work queue runs it; None: runs at once
    created: datetime = field(default_factory=_now)
    status: int = 0
    resultcode: int = 0
    result: dict[str, Any] | None = None
    completed: datetime | None = None
    # monotonic seconds: submitted, its turn on the VM's queue came, done (the job log)
    submitted_at: float = field(default_factory=time.monotonic)
    started_at: float | None = None
    finished_at: float | None = None

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "accountid": ACCOUNT_ID, "jobid": self.id,
            "cmd": f"{JOB_CMD_PACKAGE}.{self.command[0].upper()}{self.command[1:]}Cmd",
            "jobstatus": self.status, "jobprocstatus": 0, "jobresultcode": self.resultcode,
            "jobinstancetype": "Volume", "jobinstanceid": self.instance_id,
            "created": format_date(self.created)}
        if self.status:
            body.update(jobresulttype="object", jobresult=self.result,
                        completed=format_date(self.completed or self.created))
        return body

    def log_entry(self) -> dict[str, Any]:
        """The simulator-only view of the job's life, for ordering and overlap checks."""
        return {"jobid": self.id, "command": self.command, "instance_id": self.instance_id,
                "vm_id": self.vm_id, "jobstatus": self.status, "submitted": self.submitted_at,
                "started": self.started_at, "finished": self.finished_at}


@dataclass
class _Submit:
    """What an async command hands back: the job's work, the VM whose work queue runs it (None:
    no VM, or refused before queueing) and extra response fields (createVolume's id)."""
    instance_id: str
    work: Callable[[], dict[str, Any]]
    extra: dict[str, Any] = field(default_factory=dict)
    vm_id: str | None = None


Handler = Callable[[_Args], dict[str, Any] | _Submit]


class VmWorkQueues:
    """CloudStack's VM work job queue: the jobs of one VM run one at a time, in submission order,
    each holding the VM for its whole duration; jobs of different VMs run in parallel
    (VmWorkJobDispatcher; "serialized per VM, not per volume", apache/cloudstack #14214)."""

    def __init__(self) -> None:
        self._locks: dict[str, asyncio.Lock] = {}

    @asynccontextmanager
    async def turn(self, vm_id: str | None) -> AsyncIterator[None]:
        if vm_id is None:
            yield
            return
        async with self._locks.setdefault(vm_id, asyncio.Lock()):  # asyncio.Lock is FIFO
            yield


def _raising(error: ApiError) -> Callable[[], dict[str, Any]]:
    """The work of a job that fails with `error` (an injected fault, a refused request)."""
    def work() -> dict[str, Any]:
        raise error
    return work


class Jobs:
    """Mixed into CloudStackSimulator (with Faults); `_init_jobs` sets its state up."""

    job_latency: float
    job_expiry: float
    _job_latency: dict[str, float]
    _take_fault: Callable[[str], Fault | None]  # from Faults

    def _init_jobs(self) -> None:
        self.jobs: dict[str, Job] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}  # pending jobs, by job id
        self._queues = VmWorkQueues()
        self._running: Job | None = None  # the job whose work is running (work is synchronous)

    def job_log(self) -> list[dict[str, Any]]:
        """Every job still known, in submission order, with monotonic submit/start/finish times."""
        return [job.log_entry() for job in self.jobs.values()]

    def _dispatch(self, command: str, handler: Handler, args: _Args) -> dict[str, Any]:
        fault = self._take_fault(command)
        if fault is not None and fault.sync:
            raise ApiError(fault.errorcode, fault.errortext)
        result = handler(args)
        if not isinstance(result, _Submit):
            return result
        work = result.work if fault is None else _raising(ApiError(fault.errorcode, fault.errortext))
        job = Job(_uuid(), command, result.instance_id, work, vm_id=result.vm_id)
        self.jobs[job.id] = job
        latency = self._job_latency.get(command, self.job_latency)
        self._tasks[job.id] = asyncio.get_running_loop().create_task(self._execute(job, latency))
        return {**result.extra, "jobid": job.id}

    async def _execute(self, job: Job, latency: float) -> None:
        """Wait for the job's turn on its VM's queue, hold the VM for the job's latency, then run it."""
        try:
            async with self._queues.turn(job.vm_id):
                job.started_at = time.monotonic()
                await asyncio.sleep(latency)
                self._run_job(job)
        finally:
            self._tasks.pop(job.id, None)

    def _run_job(self, job: Job) -> None:
        self._running = job
        try:
            job.result, job.status = job.work(), 1
        except ApiError as error:
            job.result, job.status, job.resultcode = error.body(), 2, error.errorcode
        except Exception as exc:  # a simulator bug or a broken device_dir: fail the job, as CloudStack would
            error = ApiError(530, f"Internal error executing command: {exc}")
            job.result, job.status, job.resultcode = error.body(), 2, 530
        finally:
            self._running = None
        job.completed, job.finished_at = _now(), time.monotonic()

    def _cancel_jobs(self) -> None:
        for task in self._tasks.values():
            task.cancel()
        self._tasks.clear()

    def _query_async_job_result(self, args: _Args) -> dict[str, Any]:
        self._expire_jobs()
        job: Job = args.entity(self.jobs, "jobid")
        return job.to_json()

    def _expire_jobs(self) -> None:
        now = _now()
        for job in [j for j in self.jobs.values() if j.completed]:
            if (now - job.completed).total_seconds() > self.job_expiry:
                del self.jobs[job.id]
