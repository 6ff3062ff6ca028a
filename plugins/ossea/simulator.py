"""A CloudStack API simulator faithful to what the OMA depends on (shared/reference/cloudstack.md).

It verifies signatures exactly, keeps CloudStack's envelope and error rules, runs async jobs
with a controllable lifetime, models volumes (states, deviceids skipping 3, the data-disk cap,
custom-size offerings, account limits) and offers fault injection, in the spirit of
CloudStack's own `configureSimulator`. Like CloudStack, it runs the work of each VM (attach,
detach) one job at a time, VMs in parallel, and reproduces what that allows: a straggler detach
that clears a newer attach elsewhere (apache/cloudstack #14214), recorded as a hazard. With
`device_dir`, a volume attached to the OMA VM also appears as a `virtio-<serial>` symlink to a
sparse file, standing in for /dev/disk/by-id.

    python -m plugins.ossea.simulator --port 8080 --api-key K --secret-key S   # prints its URL
"""
from __future__ import annotations

import argparse
import asyncio
import ipaddress
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Self

import orjson
from aiohttp import web

from plugins.simserve import serve_until_signalled

from .signing import format_date, lookup, verify

DEFAULT_ZONE_NAME = "OSSEA-Zone"
DEFAULT_ZONE_ID = "a1b2c3d4-0000-4000-8000-000000000001"
DEFAULT_VM_ID = "f47ac10b-58cc-4372-a567-0e02b2c3d479"
CUSTOM_OFFERING_ID = "d0000000-0000-4000-8000-00000000000c"
FIXED_OFFERING_ID = "d0000000-0000-4000-8000-000000000014"
DOMAIN_ID = "d1000000-0000-4000-8000-000000000001"
ACCOUNT_ID = "ac000000-0000-4000-8000-000000000001"
GIB = 1024 ** 3
API_PATH = "/client/api"
MAX_PAGE_SIZE = 500
MAX_CUSTOM_GB = 1024  # custom.diskoffering.size.max
CDROM_DEVICE_ID = 3
AUTH_ERROR = "unable to verify user credentials and/or request signature"
NOT_ATTACHED_TEXT = "Please specify a volume that is not attached to any VM."
STRAGGLER_DETACH = "straggler_detach"  # the hazard kind of apache/cloudstack #14214
JOB_CMD_PACKAGE = "org.apache.cloudstack.api.command.user.volume"
ASYNC_COMMANDS = frozenset({"createVolume", "attachVolume", "detachVolume"})
# CSExceptionErrorCode of the Java exception that usually carries each API errorcode.
_CS_ERROR_CODES = {431: 4350, 530: 4250, 531: 4365, 535: 4370}


class ApiError(Exception):
    """A CloudStack error reply: sync (HTTP status = errorcode) or the failure of a job."""

    def __init__(self, errorcode: int, errortext: str, cserrorcode: int | None = None):
        super().__init__(errortext)
        self.errorcode = errorcode
        self.errortext = errortext
        self.cserrorcode = cserrorcode or _CS_ERROR_CODES.get(errorcode, 9999)

    def body(self) -> dict[str, Any]:
        return {"uuidList": [], "errorcode": self.errorcode, "cserrorcode": self.cserrorcode,
                "errortext": self.errortext}


def _now() -> datetime:
    return datetime.now(UTC)


def _uuid() -> str:
    return str(uuid.uuid4())


def disk_serial(volume_id: str) -> str:
    """The virtio serial KVM gives a volume: its UUID without dashes, first 20 characters."""
    return volume_id.replace("-", "")[:20]


@dataclass
class Fault:
    errorcode: int
    errortext: str
    remaining: int
    sync: bool


@dataclass
class Volume:
    id: str
    name: str
    size: int  # bytes
    offering: dict[str, Any] | None
    type: str = "DATADISK"
    state: str = "Allocated"
    vm_id: str | None = None
    device_id: int | None = None
    created: datetime = field(default_factory=_now)
    attached: datetime | None = None


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


def data_disk_limit_text(limit: int) -> str:
    """VolumeApiServiceImpl.checkNumberOfAttachedVolumes (hypervisor_capabilities.max_data_volumes_limit)."""
    return (f"The specified VM already has the maximum number of data disks ({limit}) attached. "
            "Please specify another VM.")


def pci_slots_text(volume_name: str, vm_name: str) -> str:
    """A KVM hot-plug the guest's PCI bus has no slot for: libvirt's error, as the attach job reports it."""
    return (f"Failed to attach volume {volume_name} to VM {vm_name}; org.libvirt.LibvirtException: "
            "internal error: No more available PCI slots")


def _vm_row(vm_id: str, name: str, zone_name: str) -> dict[str, Any]:
    return {"id": vm_id, "name": name, "displayname": name, "state": "Running",
            "zoneid": DEFAULT_ZONE_ID, "zonename": zone_name, "hypervisor": "KVM",
            "account": "admin", "domainid": DOMAIN_ID, "domain": "ROOT",
            "cpunumber": 4, "memory": 8192, "serviceofferingname": "Large Instance"}


class _Args:
    """The parameters of one call, looked up case-insensitively, with CloudStack's validation errors."""

    def __init__(self, command: str, params: Mapping[str, str]):
        self.command = command.lower()
        self.values = {k.lower(): v for k, v in params.items()}

    def get(self, name: str) -> str | None:
        return self.values.get(name)

    def required(self, name: str) -> str:
        value = self.values.get(name)
        if value is None:
            raise ApiError(431, f"Unable to execute API command {self.command} due to missing "
                                f"parameter {name}", 9999)
        return value

    def invalid(self, name: str) -> ApiError:
        return ApiError(431, f"Unable to execute API command {self.command} due to invalid value. "
                             f"Invalid parameter {name} value={self.values.get(name)} due to incorrect "
                             "long value format, or entity does not exist or due to incorrect "
                             "parameter annotation for the field in api cmd class.", 9999)

    def integer(self, name: str) -> int | None:
        value = self.values.get(name)
        if value is None:
            return None
        try:
            return int(value)
        except ValueError:
            raise self.invalid(name) from None

    def entity(self, table: Mapping[str, Any], name: str, *, required: bool = True) -> Any:
        """Resolve a UUID parameter; an unknown or malformed UUID is 431 with cserrorcode 9999."""
        value = self.required(name) if required else self.values.get(name)
        if value is None:
            return None
        if value not in table:
            raise self.invalid(name)
        return table[value]


class CloudStackSimulator:
    """In-process: `async with CloudStackSimulator(key, secret) as sim: sim.url ...`
    (or `await sim.start(host, port)` ... `await sim.stop()`)."""

    def __init__(self, api_key: str = "sim-api-key", secret_key: str = "sim-secret-key", *,
                 zone_name: str = DEFAULT_ZONE_NAME, oma_vm_id: str = DEFAULT_VM_ID,
                 oma_vm_name: str = "oma-appliance", device_dir: str | Path | None = None,
                 job_latency: float = 0.3, job_expiry: float = 86400.0, max_data_disks: int = 32,
                 pci_slots: int | None = None, pre_attached: int = 0,
                 max_volumes: int = 20, max_primary_gb: int = 200, root_disk_gb: int = 8):
        self.api_key = api_key
        self._secret = secret_key
        self.device_dir = Path(device_dir) if device_dir else None
        self.job_latency = job_latency
        self.job_expiry = job_expiry
        self.max_data_disks = max_data_disks  # per VM, checked before the job queues (431)
        self.pci_slots = pci_slots  # data disks a VM's PCI bus can take, checked by the hypervisor (530)
        self.max_volumes = max_volumes
        self.max_primary_gb = max_primary_gb
        self.oma_vm_id = oma_vm_id
        self.calls: list[dict[str, Any]] = []
        self.hazards: list[dict[str, Any]] = []  # inconsistent states CloudStack would be left in
        self.orphans: dict[str, set[str]] = {}  # vm id -> volumes still in its libvirt domain, not in the DB
        self.zones = {DEFAULT_ZONE_ID: {
            "id": DEFAULT_ZONE_ID, "name": zone_name, "networktype": "Advanced",
            "allocationstate": "Enabled", "securitygroupsenabled": False,
            "localstorageenabled": False, "dhcpprovider": "VirtualRouter", "tags": []}}
        self.vms = {oma_vm_id: _vm_row(oma_vm_id, oma_vm_name, zone_name)}
        self.offerings = {o["id"]: o for o in (
            {"id": FIXED_OFFERING_ID, "name": "Medium", "displaytext": "Medium Disk, 20 GB",
             "disksize": 20, "iscustomized": False, "storagetype": "shared",
             "provisioningtype": "thin"},
            {"id": CUSTOM_OFFERING_ID, "name": "Custom", "displaytext": "Custom Disk",
             "disksize": 0, "iscustomized": True, "storagetype": "shared",
             "provisioningtype": "thin"})}
        root = Volume(_uuid(), f"ROOT-{oma_vm_name}", root_disk_gb * GIB, None, type="ROOT",
                      state="Ready", vm_id=oma_vm_id, device_id=0)
        self.volumes: dict[str, Volume] = {root.id: root}
        self.jobs: dict[str, Job] = {}
        self._faults: dict[str, list[Fault]] = {}
        self._latency: dict[str, float] = {}
        self._job_latency: dict[str, float] = {}
        self._hangs: dict[str, asyncio.Event] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}  # pending jobs, by job id
        self._queues = VmWorkQueues()
        self._running: Job | None = None  # the job whose work is running (work is synchronous)
        self._handlers: dict[str, Callable[[_Args], dict[str, Any] | _Submit]] = {
            "listZones": self._list_zones, "listVirtualMachines": self._list_virtual_machines,
            "listDiskOfferings": self._list_disk_offerings, "listVolumes": self._list_volumes,
            "createVolume": self._create_volume, "attachVolume": self._attach_volume,
            "detachVolume": self._detach_volume, "deleteVolume": self._delete_volume,
            "queryAsyncJobResult": self._query_async_job_result}
        self.async_commands = ASYNC_COMMANDS
        from . import sim_vms  # the VM lifecycle (failover); imported here as it imports this module
        self.lab = sim_vms.install(self)
        self._runner: web.AppRunner | None = None
        self.host = "127.0.0.1"
        self.port = 0
        self.pre_attach(pre_attached)

    # -- lifecycle ------------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(middlewares=[_loopback_only_control])
        app.router.add_route("GET", API_PATH, self._api)
        app.router.add_route("POST", API_PATH, self._api)
        app.router.add_get("/sim/calls", self._ctl_calls)
        app.router.add_delete("/sim/calls", self._ctl_clear_calls)
        app.router.add_get("/sim/volumes", self._ctl_volumes)
        app.router.add_get("/sim/jobs", self._ctl_jobs)
        app.router.add_get("/sim/job-log", self._ctl_job_log)
        app.router.add_get("/sim/hazards", self._ctl_hazards)
        app.router.add_post("/sim/vms", self._ctl_add_vm)
        app.router.add_post("/sim/pre-attach", self._ctl_pre_attach)
        app.router.add_post("/sim/fail", self._ctl_fail)
        app.router.add_post("/sim/latency", self._ctl_latency)
        app.router.add_post("/sim/job-latency", self._ctl_job_latency)
        app.router.add_post("/sim/hang", self._ctl_hang)
        app.router.add_post("/sim/release", self._ctl_release)
        app.router.add_post("/sim/reset", self._ctl_reset)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        self._runner = web.AppRunner(self.app(), access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, host, port).start()
        self.host, self.port = host, self._runner.addresses[0][1]
        return self.url

    async def stop(self) -> None:
        self.release()  # let hung requests answer so the server can shut down
        for task in self._tasks.values():
            task.cancel()
        self._tasks.clear()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def base_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def url(self) -> str:
        return self.base_url + API_PATH

    # -- fault injection (Python API; the /sim/ endpoints call these) ---------------------------

    def fail(self, command: str, count: int = 1, errorcode: int = 530,
             errortext: str = "Internal error executing command, please contact your administrator",
             *, sync: bool = False) -> None:
        """Fail the next `count` calls of `command`. An async command still gets its jobid and its
        job fails (createVolume's volume stays allocated, as on a real cloud) unless `sync`."""
        self._faults.setdefault(command, []).append(
            Fault(errorcode, errortext, count, sync or command not in self.async_commands))

    def set_latency(self, command: str, seconds: float) -> None:
        """Delay every call of `command` by `seconds` before it acts (0 removes the delay), like a slow
        API server: a client that gives up or dies meanwhile does not stop it (createVolume's volume,
        attachVolume's job still appear)."""
        self._latency[command] = seconds

    def set_job_latency(self, seconds: float, command: str | None = None) -> None:
        """How long new jobs (of `command`, or all) stay pending before they run."""
        if command is None:
            self.job_latency = seconds
        else:
            self._job_latency[command] = seconds

    def hang(self, command: str) -> None:
        """Never answer `command` until `release()`."""
        self._hangs.setdefault(command, asyncio.Event())

    def release(self, command: str | None = None) -> None:
        for name in [command] if command else list(self._hangs):
            event = self._hangs.pop(name, None)
            if event is not None:
                event.set()

    def reset_faults(self) -> None:
        self.release()
        self._faults.clear()
        self._latency.clear()
        self._job_latency.clear()

    # -- set-up and records (simulator-only; the /sim/ endpoints call these) ----------------------

    def add_vm(self, name: str, vm_id: str | None = None) -> str:
        """Another running KVM VM in the zone (a failover target, a second appliance)."""
        vm_id = vm_id or _uuid()
        self.vms[vm_id] = _vm_row(vm_id, name, self.zones[DEFAULT_ZONE_ID]["name"])
        return vm_id

    def pre_attach(self, count: int, vm_id: str | None = None, size_gb: int = 1) -> list[Volume]:
        """Attach `count` new Ready data volumes to a VM (the OMA's by default) at once, without a
        job, as if they were there before: they count against every limit like any volume."""
        vm_id = vm_id or self.oma_vm_id
        if vm_id not in self.vms:
            raise ValueError(f"no VM {vm_id}")
        if self._data_disks(vm_id) + count > self.max_data_disks:
            raise ValueError(f"{count} more data disks exceed the limit of {self.max_data_disks}")
        added = []
        for _ in range(count):
            volume = Volume(_uuid(), f"pre-attached-{len(self.volumes)}", size_gb * GIB,
                            self.offerings[CUSTOM_OFFERING_ID], state="Ready", vm_id=vm_id,
                            attached=_now())
            volume.device_id = self._device_id(vm_id, None)
            self.volumes[volume.id] = volume
            self._plug(volume)
            added.append(volume)
        return added

    def job_log(self) -> list[dict[str, Any]]:
        """Every job still known, in submission order, with monotonic submit/start/finish times."""
        return [job.log_entry() for job in self.jobs.values()]

    def _record_hazard(self, kind: str, **detail: Any) -> None:
        job = self._running.id if self._running else None
        self.hazards.append({"kind": kind, "jobid": job, "at": format_date(_now()), **detail})

    # -- devices --------------------------------------------------------------------------------

    def backing_path(self, volume_id: str) -> Path:
        return self._device_dir() / ".backing" / f"{volume_id}.img"

    def device_path(self, volume_id: str) -> Path:
        """Where the attached volume appears, like /dev/disk/by-id/virtio-<serial>."""
        return self._device_dir() / f"virtio-{disk_serial(volume_id)}"

    def _device_dir(self) -> Path:
        if self.device_dir is None:
            raise RuntimeError("the simulator was started without device_dir")
        return self.device_dir

    def _plug(self, volume: Volume) -> None:
        if self.device_dir is None or volume.vm_id != self.oma_vm_id:  # device_dir is the OMA's /dev
            return
        backing = self.backing_path(volume.id)
        backing.parent.mkdir(parents=True, exist_ok=True)
        if not backing.exists():
            with backing.open("wb") as f:
                f.truncate(volume.size)  # sparse
        link = self.device_path(volume.id)
        link.unlink(missing_ok=True)
        link.symlink_to(backing.resolve())

    def _unplug(self, volume: Volume, *, destroy: bool = False) -> None:
        if self.device_dir is None:
            return
        self.device_path(volume.id).unlink(missing_ok=True)
        if destroy:
            self.backing_path(volume.id).unlink(missing_ok=True)

    # -- HTTP: the API --------------------------------------------------------------------------

    async def _api(self, request: web.Request) -> web.Response:
        params: dict[str, str] = dict(request.query)
        if request.method == "POST":
            params.update((k, v) for k, v in (await request.post()).items() if isinstance(v, str))
        command = params.get("command", "")
        call = {"command": command, "method": request.method,
                "params": {k: v for k, v in params.items() if k.lower() != "signature"},
                "status": None}
        self.calls.append(call)
        status, body, description = await self._answer(command, params)
        call["status"] = status
        headers = {"X-Description": description.encode("ascii", "replace").decode()} if description else {}
        return web.Response(status=status, body=orjson.dumps(body), headers=headers,
                            content_type="application/json", charset="utf-8")

    async def _answer(self, command: str, params: dict[str, str]) -> tuple[int, dict[str, Any], str | None]:
        key = f"{command.lower()}response" if command else "errorresponse"
        if lookup(params, "apiKey") != self.api_key or not verify(params, self._secret, _now()):
            return 401, {key: {"uuidList": [], "errorcode": 401, "errortext": AUTH_ERROR}}, AUTH_ERROR
        handler = self._handlers.get(command)
        if handler is None:
            error = ApiError(432, f"The given command:{command} does not exist or it is not "
                                  "available for user", 9999)
            return 432, {"errorresponse": error.body()}, error.errortext
        if command in self._hangs:
            await self._hangs[command].wait()
        if self._latency.get(command):
            await asyncio.sleep(self._latency[command])
        try:
            return 200, {key: self._dispatch(command, handler, _Args(command, params))}, None
        except ApiError as error:
            return error.errorcode, {key: error.body()}, error.errortext

    def _dispatch(self, command: str, handler: Callable[[_Args], dict[str, Any] | _Submit],
                  args: _Args) -> dict[str, Any]:
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

    def _take_fault(self, command: str) -> Fault | None:
        queue = self._faults.get(command)
        if not queue:
            return None
        fault = queue[0]
        fault.remaining -= 1
        if fault.remaining <= 0:
            queue.pop(0)
        return fault

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

    # -- commands -------------------------------------------------------------------------------

    @staticmethod
    def _page(args: _Args, key: str, items: list[dict[str, Any]]) -> dict[str, Any]:
        page, size = args.integer("page"), args.integer("pagesize")
        if page is not None and size is None:
            raise ApiError(431, '"pagesize" parameter is required when "page" is specified')
        if size is not None and not 0 < size <= MAX_PAGE_SIZE:
            raise ApiError(431, f"Page size can't exceed max allowed page size value: {MAX_PAGE_SIZE}")
        total = len(items)
        if size is not None:
            start = (max(page or 1, 1) - 1) * size
            items = items[start:start + size]
        return {"count": total, key: items} if items else {}  # CloudStack: an empty list is {}

    @staticmethod
    def _filtered(args: _Args, rows: list[dict[str, Any]], *names: str) -> list[dict[str, Any]]:
        wanted = {n: args.get(n) for n in names if args.get(n) is not None}
        return [r for r in rows if all(str(r.get(n)) == v for n, v in wanted.items())]

    def _list_zones(self, args: _Args) -> dict[str, Any]:
        args.entity(self.zones, "id", required=False)
        return self._page(args, "zone", self._filtered(args, list(self.zones.values()), "id", "name"))

    def _list_virtual_machines(self, args: _Args) -> dict[str, Any]:
        args.entity(self.vms, "id", required=False)
        rows = self._filtered(args, list(self.vms.values()), "id", "name", "zoneid", "state")
        return self._page(args, "virtualmachine", rows)

    def _list_disk_offerings(self, args: _Args) -> dict[str, Any]:
        args.entity(self.offerings, "id", required=False)
        rows = self._filtered(args, list(self.offerings.values()), "id", "name")
        return self._page(args, "diskoffering", rows)

    def _list_volumes(self, args: _Args) -> dict[str, Any]:
        args.entity(self.volumes, "id", required=False)
        args.entity(self.vms, "virtualmachineid", required=False)
        rows = [self.volume_json(v) for v in self.volumes.values()]
        return self._page(args, "volume", self._filtered(
            args, rows, "id", "virtualmachineid", "name", "type", "zoneid"))

    def _create_volume(self, args: _Args) -> _Submit:
        offering = args.entity(self.offerings, "diskofferingid", required=False)
        if offering is None:
            raise ApiError(431, "Either disk Offering Id or snapshot Id must be passed whilst "
                                "creating volume")
        args.entity(self.zones, "zoneid")
        size_gb = args.integer("size")
        if offering["iscustomized"]:
            if size_gb is None:
                raise ApiError(431, "This disk offering requires a custom size specified")
            if not 1 <= size_gb <= MAX_CUSTOM_GB:
                raise ApiError(431, f"Volume size: {size_gb}GB is out of allowed range. "
                                    f"Max: {MAX_CUSTOM_GB} Min:1")
        elif size_gb is not None:
            raise ApiError(431, "This disk offering does not allow custom size")
        size = (size_gb or offering["disksize"]) * GIB
        self._check_limits(size)
        volume = Volume(_uuid(), args.get("name") or f"volume-{_uuid()[:8]}", size, offering)
        self.volumes[volume.id] = volume

        def work() -> dict[str, Any]:
            return {"volume": self.volume_json(self._existing(volume.id))}
        return _Submit(volume.id, work, {"id": volume.id})

    def _check_limits(self, size: int) -> None:
        if len(self.volumes) >= self.max_volumes:
            raise ApiError(535, self._limit_text("volume"))
        if sum(v.size for v in self.volumes.values()) + size > self.max_primary_gb * GIB:
            raise ApiError(535, self._limit_text("primary_storage"))

    @staticmethod
    def _limit_text(resource: str) -> str:
        return (f"Maximum number of resources of type '{resource}' for account name: admin "
                "in domain id=1 has been exceeded.")

    # attach and detach run as CloudStack does: the API job checks the request at once (and fails
    # without queueing), then the VM work job runs on the VM's queue and re-reads the volume.

    def _attach_volume(self, args: _Args) -> _Submit:
        volume: Volume = args.entity(self.volumes, "id")
        vm = args.entity(self.vms, "virtualmachineid")
        wanted = args.integer("deviceid")
        refusal = self._attach_refusal(volume, vm["id"], wanted)
        if refusal is not None:
            return _Submit(volume.id, _raising(refusal))

        def work() -> dict[str, Any]:
            current = self._existing(volume.id)
            if current.vm_id is not None:  # orchestrateAttachVolumeToVM: attached meanwhile
                raise ApiError(530, "This volume is already attached to a VM.")
            current.state = "Ready"  # created on primary storage before the hypervisor is asked
            device_id = self._device_id(vm["id"], wanted)
            if self.pci_slots is not None and self._domain_disks(vm["id"]) >= self.pci_slots:
                raise ApiError(530, pci_slots_text(current.name, vm["name"]))
            current.vm_id, current.device_id, current.attached = vm["id"], device_id, _now()
            self._plug(current)
            return {"volume": self.volume_json(current)}
        return _Submit(volume.id, work, vm_id=vm["id"])

    def _attach_refusal(self, volume: Volume, vm_id: str, wanted: int | None) -> ApiError | None:
        """VolumeApiServiceImpl.attachVolumeToVM's checks, made before the job joins the VM's queue:
        concurrent attaches all pass the count check, the surplus then runs out of device ids."""
        if volume.vm_id is not None:
            return ApiError(431, NOT_ATTACHED_TEXT)
        if volume.state not in ("Allocated", "Ready"):
            return ApiError(431, "Volume state must be in Allocated, Ready or in Uploaded state")
        if wanted != 0 and self._data_disks(vm_id) >= self.max_data_disks:
            return ApiError(431, data_disk_limit_text(self.max_data_disks))
        return None

    def _data_disks(self, vm_id: str) -> int:
        """The VM's data disks as the database has them (what the count limit checks)."""
        return sum(v.vm_id == vm_id and v.type == "DATADISK" for v in self.volumes.values())

    def _domain_disks(self, vm_id: str) -> int:
        """The data disks in the VM's libvirt domain: the database's plus any orphaned there."""
        return self._data_disks(vm_id) + len(self.orphans.get(vm_id, ()))

    def _device_id(self, vm_id: str, wanted: int | None) -> int:
        """VolumeApiServiceImpl.getDeviceId: lowest free of 1, 2, 4, 5, ... (3 is the CD-ROM)."""
        max_device_id = self.max_data_disks + 1  # + root and cdrom, counted from 0
        used = {v.device_id for v in self.volumes.values() if v.vm_id == vm_id}
        if wanted is not None:
            if not 0 < wanted <= max_device_id:
                raise ApiError(431, f"deviceId should be 1 ~ {max_device_id}")
            if wanted == CDROM_DEVICE_ID:
                raise ApiError(431, "deviceId can't be 3")
            if wanted in used:
                raise ApiError(431, f"deviceId {wanted} is used by vm {vm_id}")
            return wanted
        free = [i for i in range(1, max_device_id + 1) if i != CDROM_DEVICE_ID and i not in used]
        if not free:
            raise ApiError(530, f"All device Ids are used by vm {vm_id}")
        return free[0]

    def _detach_volume(self, args: _Args) -> _Submit:
        volume: Volume = args.entity(self.volumes, "id")
        if volume.type == "ROOT":
            return _Submit(volume.id, _raising(ApiError(431, "Please specify a data volume.")))
        if volume.vm_id is None:
            error = ApiError(431, "The specified volume is not attached to a VM.")
            return _Submit(volume.id, _raising(error))
        vm_id, asked = volume.vm_id, _now()  # the job detaches from this VM, whenever its turn comes

        def work() -> dict[str, Any]:
            current = self._existing(volume.id)
            if current.attached is not None and current.attached > asked:  # attached after we were asked
                self._straggler(current, vm_id)
            if current.vm_id == vm_id:
                self._unplug(current)  # elsewhere, the disk stays plugged where it is
            current.vm_id = current.device_id = current.attached = None  # VolumeDao.detachVolume
            return {"volume": self.volume_json(current)}
        return _Submit(volume.id, work, vm_id=vm_id)

    def _straggler(self, volume: Volume, detached_from: str) -> None:
        """apache/cloudstack #14214: a detach queued on VM A runs after the volume was detached and
        attached to VM B. CloudStack sends the detach to A (nothing to do there) and clears the
        volume's attachment in its database: B's attach is forgotten while B's libvirt domain
        still holds the disk (an orphan). The job succeeds; the simulator does the same, and
        records the hazard. (On A itself the FIFO queue runs a newer attach after the detach.)"""
        attached_to = volume.vm_id
        assert attached_to is not None
        if attached_to != detached_from:
            self.orphans.setdefault(attached_to, set()).add(volume.id)
        self._record_hazard(STRAGGLER_DETACH, volume_id=volume.id, detached_from=detached_from,
                            attached_to=attached_to, device_id=volume.device_id,
                            detail=f"a detach queued on VM {detached_from} before the volume was "
                                   f"attached to VM {attached_to} cleared that attachment")

    def _delete_volume(self, args: _Args) -> dict[str, Any]:
        volume: Volume = args.entity(self.volumes, "id")
        if volume.vm_id is not None:
            raise ApiError(431, NOT_ATTACHED_TEXT)
        del self.volumes[volume.id]
        for orphaned in self.orphans.values():
            orphaned.discard(volume.id)
        self._unplug(volume, destroy=True)
        return {"success": True}

    def _query_async_job_result(self, args: _Args) -> dict[str, Any]:
        self._expire_jobs()
        job: Job = args.entity(self.jobs, "jobid")
        return job.to_json()

    def _expire_jobs(self) -> None:
        now = _now()
        for job in [j for j in self.jobs.values() if j.completed]:
            if (now - job.completed).total_seconds() > self.job_expiry:
                del self.jobs[job.id]

    def _existing(self, volume_id: str) -> Volume:
        volume = self.volumes.get(volume_id)
        if volume is None:
            raise ApiError(431, f"Unable to find volume with ID: {volume_id}")
        return volume

    # -- views ----------------------------------------------------------------------------------

    def volume_json(self, volume: Volume) -> dict[str, Any]:
        zone = self.zones[DEFAULT_ZONE_ID]
        body: dict[str, Any] = {
            "id": volume.id, "name": volume.name, "zoneid": zone["id"], "zonename": zone["name"],
            "type": volume.type, "size": volume.size, "state": volume.state,
            "created": format_date(volume.created), "account": "admin", "domainid": DOMAIN_ID,
            "domain": "ROOT", "storagetype": "shared", "destroyed": False, "isextractable": True}
        if volume.offering is not None:
            body.update(diskofferingid=volume.offering["id"], diskofferingname=volume.offering["name"],
                        diskofferingdisplaytext=volume.offering["displaytext"],
                        provisioningtype=volume.offering["provisioningtype"])
        if volume.state != "Allocated":
            body.update(hypervisor="KVM", storage="ossea-primary-01")
        if volume.vm_id is not None:
            vm = self.vms[volume.vm_id]
            body.update(virtualmachineid=vm["id"], vmname=vm["name"], vmdisplayname=vm["displayname"],
                        vmstate=vm["state"], deviceid=volume.device_id)
            if volume.attached:
                body["attached"] = format_date(volume.attached)
        return body

    # -- HTTP: the control endpoint -------------------------------------------------------------

    async def _ctl_calls(self, request: web.Request) -> web.Response:
        return web.json_response(self.calls)

    async def _ctl_clear_calls(self, request: web.Request) -> web.Response:
        self.calls.clear()
        return web.json_response({"ok": True})

    async def _ctl_volumes(self, request: web.Request) -> web.Response:
        return web.json_response([self.volume_json(v) for v in self.volumes.values()])

    async def _ctl_jobs(self, request: web.Request) -> web.Response:
        return web.json_response([j.to_json() for j in self.jobs.values()])

    async def _ctl_job_log(self, request: web.Request) -> web.Response:
        return web.json_response(self.job_log())

    async def _ctl_hazards(self, request: web.Request) -> web.Response:
        return web.json_response(self.hazards)

    async def _ctl_add_vm(self, request: web.Request) -> web.Response:
        spec = await _json_body(request, "name")
        return web.json_response({"id": self.add_vm(str(spec["name"]), spec.get("id"))})

    async def _ctl_pre_attach(self, request: web.Request) -> web.Response:
        spec = await _json_body(request, "count")
        try:
            added = self.pre_attach(int(spec["count"]), spec.get("vm_id"))
        except ValueError as exc:
            raise web.HTTPBadRequest(text=str(exc)) from None
        return web.json_response([self.volume_json(v) for v in added])

    async def _ctl_fail(self, request: web.Request) -> web.Response:
        spec = await _json_body(request, "command")
        self.fail(spec["command"], int(spec.get("count", 1)), int(spec.get("errorcode", 530)),
                  **({"errortext": spec["errortext"]} if "errortext" in spec else {}),
                  sync=bool(spec.get("sync", False)))
        return web.json_response({"ok": True})

    async def _ctl_latency(self, request: web.Request) -> web.Response:
        spec = await _json_body(request, "command", "seconds")
        self.set_latency(spec["command"], float(spec["seconds"]))
        return web.json_response({"ok": True})

    async def _ctl_job_latency(self, request: web.Request) -> web.Response:
        spec = await _json_body(request, "seconds")
        self.set_job_latency(float(spec["seconds"]), spec.get("command"))
        return web.json_response({"ok": True})

    async def _ctl_hang(self, request: web.Request) -> web.Response:
        self.hang((await _json_body(request, "command"))["command"])
        return web.json_response({"ok": True})

    async def _ctl_release(self, request: web.Request) -> web.Response:
        spec = await _json_body(request) if request.can_read_body else {}
        self.release(spec.get("command"))
        return web.json_response({"ok": True})

    async def _ctl_reset(self, request: web.Request) -> web.Response:
        self.reset_faults()
        return web.json_response({"ok": True})


def _raising(error: ApiError) -> Callable[[], dict[str, Any]]:
    """The work of a job that fails with `error` (an injected fault, a refused request)."""
    def work() -> dict[str, Any]:
        raise error
    return work


async def _json_body(request: web.Request, *required: str) -> dict[str, Any]:
    try:
        spec = await request.json()
    except ValueError:
        raise web.HTTPBadRequest(text="expected a JSON object") from None
    missing = [k for k in required if not isinstance(spec, dict) or k not in spec]
    if missing:
        raise web.HTTPBadRequest(text=f"missing field(s): {', '.join(missing)}")
    return spec


@web.middleware
async def _loopback_only_control(request: web.Request, handler: Callable[..., Any]) -> web.StreamResponse:
    """The control endpoint is unsigned, so only the local machine may use it."""
    if request.path.startswith("/sim/"):
        remote = request.remote or ""
        try:
            local = ipaddress.ip_address(remote).is_loopback
        except ValueError:
            local = False
        if not local:
            raise web.HTTPForbidden(text="the /sim/ control endpoint answers loopback clients only")
    return await handler(request)


# -- command line -------------------------------------------------------------------------------

_EPILOG = """\
Attach and detach jobs run on their VM's work queue, one at a time per VM (each holds the VM for
--job-latency seconds), VMs in parallel, as CloudStack does. Simulator-only endpoints (unsigned,
loopback only): GET /sim/calls, /sim/volumes, /sim/jobs, /sim/job-log (submit/start/finish times),
/sim/hazards (e.g. a straggler detach that cleared a newer attach); POST /sim/vms {"name"},
/sim/pre-attach {"count", "vm_id"?}, /sim/fail, /sim/latency, /sim/job-latency, /sim/hang,
/sim/release, /sim/reset. See docs/cloudstack-simulator.md."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="oma-cloudstack-sim", description=__doc__.split("\n\n")[0],
                                epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1", help="listen address (default: %(default)s)")
    p.add_argument("--port", type=int, default=8080, help="0 picks a free port (default: %(default)s)")
    p.add_argument("--api-key", default="sim-api-key")
    p.add_argument("--secret-key", default="sim-secret-key")
    p.add_argument("--zone-name", default=DEFAULT_ZONE_NAME)
    p.add_argument("--oma-vm-id", default=DEFAULT_VM_ID, help="the appliance VM volumes attach to")
    p.add_argument("--device-dir", help="create virtio-<serial> symlinks to sparse files here on attach")
    p.add_argument("--job-latency", type=float, default=0.3,
                   help="seconds a job runs; jobs of one VM queue behind each other (default: %(default)s)")
    p.add_argument("--max-data-disks", type=int, default=32,
                   help="data disks per VM, its own included (hypervisor_capabilities."
                        "max_data_volumes_limit; default: %(default)s); more -> 431 \"... (N) attached\"")
    p.add_argument("--pci-slots", type=int, default=None,
                   help="data disks a VM's PCI bus can hot-plug (default: no cap); more -> 530 "
                        "\"No more available PCI slots\"")
    p.add_argument("--pre-attached", type=int, default=0,
                   help="data volumes already attached to the OMA VM at start (default: %(default)s)")
    p.add_argument("--max-volumes", type=int, default=20, help="account volume limit (default: %(default)s)")
    p.add_argument("--max-primary-gb", type=int, default=200,
                   help="account primary storage limit in GiB (default: %(default)s)")
    p.add_argument("--latency", action="append", default=[], metavar="COMMAND=SECONDS",
                   help="delay every call of COMMAND (e.g. createVolume=6, attachVolume=3); repeatable")
    return p


def _latencies(specs: list[str]) -> dict[str, float]:
    out = {}
    for spec in specs:
        command, _, seconds = spec.partition("=")
        try:
            out[command] = float(seconds)
        except ValueError:
            raise SystemExit(f"--latency: expected COMMAND=SECONDS, got {spec!r}") from None
    return out


async def _serve(args: argparse.Namespace) -> None:
    sim = CloudStackSimulator(
        args.api_key, args.secret_key, zone_name=args.zone_name, oma_vm_id=args.oma_vm_id,
        device_dir=args.device_dir, job_latency=args.job_latency,
        max_data_disks=args.max_data_disks, pci_slots=args.pci_slots, pre_attached=args.pre_attached,
        max_volumes=args.max_volumes, max_primary_gb=args.max_primary_gb)
    for command, seconds in _latencies(args.latency).items():
        sim.set_latency(command, seconds)
    await serve_until_signalled(sim, args.host, args.port)


def main(argv: list[str] | None = None) -> None:
    asyncio.run(_serve(_parser().parse_args(argv)))


if __name__ == "__main__":
    main()
