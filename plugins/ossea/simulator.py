"""A CloudStack API simulator faithful to what the OMA depends on (shared/reference/cloudstack.md).

It verifies signatures exactly, keeps CloudStack's envelope and error rules, runs async jobs
with a controllable lifetime, models volumes (states, deviceids skipping 3, the data-disk cap,
custom-size offerings, account limits) and offers fault injection, in the spirit of
CloudStack's own `configureSimulator`. With `device_dir`, an attached volume also appears as a
`virtio-<serial>` symlink to a sparse file, standing in for /dev/disk/by-id.

    python -m plugins.ossea.simulator --port 8080 --api-key K --secret-key S   # prints its URL
"""
from __future__ import annotations

import argparse
import asyncio
import ipaddress
import signal
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Self

import orjson
from aiohttp import web

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
    created: datetime = field(default_factory=_now)
    status: int = 0
    resultcode: int = 0
    result: dict[str, Any] | None = None
    completed: datetime | None = None

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


@dataclass
class _Submit:
    """What an async command hands back: the job's work and extra response fields (createVolume's id)."""
    instance_id: str
    work: Callable[[], dict[str, Any]]
    extra: dict[str, Any] = field(default_factory=dict)


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
                 max_volumes: int = 20, max_primary_gb: int = 200, root_disk_gb: int = 8):
        self.api_key = api_key
        self._secret = secret_key
        self.device_dir = Path(device_dir) if device_dir else None
        self.job_latency = job_latency
        self.job_expiry = job_expiry
        self.max_data_disks = max_data_disks
        self.max_volumes = max_volumes
        self.max_primary_gb = max_primary_gb
        self.calls: list[dict[str, Any]] = []
        self.zones = {DEFAULT_ZONE_ID: {
            "id": DEFAULT_ZONE_ID, "name": zone_name, "networktype": "Advanced",
            "allocationstate": "Enabled", "securitygroupsenabled": False,
            "localstorageenabled": False, "dhcpprovider": "VirtualRouter", "tags": []}}
        self.vms = {oma_vm_id: {
            "id": oma_vm_id, "name": oma_vm_name, "displayname": oma_vm_name, "state": "Running",
            "zoneid": DEFAULT_ZONE_ID, "zonename": zone_name, "hypervisor": "KVM",
            "account": "admin", "domainid": DOMAIN_ID, "domain": "ROOT",
            "cpunumber": 4, "memory": 8192, "serviceofferingname": "Large Instance"}}
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
        self._timers: dict[str, asyncio.TimerHandle] = {}  # pending jobs, by job id
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

    # -- lifecycle ------------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(middlewares=[_loopback_only_control])
        app.router.add_route("GET", API_PATH, self._api)
        app.router.add_route("POST", API_PATH, self._api)
        app.router.add_get("/sim/calls", self._ctl_calls)
        app.router.add_delete("/sim/calls", self._ctl_clear_calls)
        app.router.add_get("/sim/volumes", self._ctl_volumes)
        app.router.add_get("/sim/jobs", self._ctl_jobs)
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
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
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
        """Delay every answer to `command` by `seconds` (0 removes the delay)."""
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
        if self.device_dir is None:
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
        work = result.work if fault is None else _failing(fault)
        job = Job(_uuid(), command, result.instance_id, work)
        self.jobs[job.id] = job
        latency = self._job_latency.get(command, self.job_latency)
        self._timers[job.id] = asyncio.get_running_loop().call_later(latency, self._run_job, job)
        return {**result.extra, "jobid": job.id}

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
        self._timers.pop(job.id, None)
        try:
            job.result, job.status = job.work(), 1
        except ApiError as error:
            job.result, job.status, job.resultcode = error.body(), 2, error.errorcode
        except Exception as exc:  # a simulator bug or a broken device_dir: fail the job, as CloudStack would
            error = ApiError(530, f"Internal error executing command: {exc}")
            job.result, job.status, job.resultcode = error.body(), 2, 530
        job.completed = _now()

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

    def _attach_volume(self, args: _Args) -> _Submit:
        volume: Volume = args.entity(self.volumes, "id")
        vm = args.entity(self.vms, "virtualmachineid")
        wanted = args.integer("deviceid")

        def work() -> dict[str, Any]:
            current = self._existing(volume.id)
            if current.vm_id is not None:
                raise ApiError(431, NOT_ATTACHED_TEXT)
            if current.state not in ("Allocated", "Ready"):
                raise ApiError(431, "Volume state must be in Allocated, Ready or in Uploaded state")
            current.device_id = self._device_id(vm["id"], wanted)
            current.vm_id, current.state, current.attached = vm["id"], "Ready", _now()
            self._plug(current)
            return {"volume": self.volume_json(current)}
        return _Submit(volume.id, work)

    def _device_id(self, vm_id: str, wanted: int | None) -> int:
        """VolumeApiServiceImpl.getDeviceId: lowest free of 1, 2, 4, 5, ... (3 is the CD-ROM)."""
        attached = [v for v in self.volumes.values() if v.vm_id == vm_id]
        if sum(v.type == "DATADISK" for v in attached) >= self.max_data_disks:
            raise ApiError(431, f"The specified VM already has the maximum number of data disks "
                                f"({self.max_data_disks}). Please specify another VM.")
        max_device_id = self.max_data_disks + 1  # + root and cdrom, counted from 0
        used = {v.device_id for v in attached}
        if wanted is not None:
            if not 0 < wanted <= max_device_id:
                raise ApiError(431, f"deviceId should be 1 ~ {max_device_id}")
            if wanted == CDROM_DEVICE_ID:
                raise ApiError(431, "deviceId can't be 3")
            if wanted in used:
                raise ApiError(431, f"deviceId {wanted} is used by vm {vm_id}")
            return wanted
        return next(i for i in range(1, max_device_id + 1) if i != CDROM_DEVICE_ID and i not in used)

    def _detach_volume(self, args: _Args) -> _Submit:
        volume: Volume = args.entity(self.volumes, "id")

        def work() -> dict[str, Any]:
            current = self._existing(volume.id)
            if current.type == "ROOT":
                raise ApiError(431, "Please specify a data volume.")
            if current.vm_id is None:
                raise ApiError(431, "The specified volume is not attached to a VM.")
            current.vm_id = current.device_id = current.attached = None
            self._unplug(current)
            return {"volume": self.volume_json(current)}
        return _Submit(volume.id, work)

    def _delete_volume(self, args: _Args) -> dict[str, Any]:
        volume: Volume = args.entity(self.volumes, "id")
        if volume.vm_id is not None:
            raise ApiError(431, NOT_ATTACHED_TEXT)
        del self.volumes[volume.id]
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


def _failing(fault: Fault) -> Callable[[], dict[str, Any]]:
    def work() -> dict[str, Any]:
        raise ApiError(fault.errorcode, fault.errortext)
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

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="oma-cloudstack-sim", description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--api-key", default="sim-api-key")
    p.add_argument("--secret-key", default="sim-secret-key")
    p.add_argument("--zone-name", default=DEFAULT_ZONE_NAME)
    p.add_argument("--oma-vm-id", default=DEFAULT_VM_ID)
    p.add_argument("--device-dir", help="create virtio-<serial> symlinks to sparse files here on attach")
    p.add_argument("--job-latency", type=float, default=0.3, help="seconds a job stays pending")
    p.add_argument("--max-data-disks", type=int, default=32)
    p.add_argument("--max-volumes", type=int, default=20)
    p.add_argument("--max-primary-gb", type=int, default=200)
    return p


async def _serve(args: argparse.Namespace) -> None:
    sim = CloudStackSimulator(
        args.api_key, args.secret_key, zone_name=args.zone_name, oma_vm_id=args.oma_vm_id,
        device_dir=args.device_dir, job_latency=args.job_latency,
        max_data_disks=args.max_data_disks, max_volumes=args.max_volumes,
        max_primary_gb=args.max_primary_gb)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(await sim.start(args.host, args.port), flush=True)  # the ready signal for scripts
    try:
        await stop.wait()
    finally:
        await sim.stop()


def main(argv: list[str] | None = None) -> None:
    asyncio.run(_serve(_parser().parse_args(argv)))


if __name__ == "__main__":
    main()
