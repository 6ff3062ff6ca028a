"""A VMA simulator faithful to the API the original OMA drives (shared/reference/vma.md).

Inventory, power state and CBT flags come from a real vCenter API (vcsim or a vCenter) through
pyvmomi, with the credentials of each request, read by the project's own vSphere source. The
VMware disks are simulated (`disks.py`: sparse files with seeded content and a CBT model); the
copy is real: libnbd writes into the NBD targets the request names (`jobs.py`).

    oma-vma-sim --port 8081 --data-dir /var/tmp/vma-sim --insecure-vcenter   # prints its URL
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from pydantic import BaseModel, Field, ValidationError
from pyVmomi import vim, vmodl

from oma.plugins.simserve import Served, loopback_only_control, serve_until_signalled
from oma.plugins.vsphere.source import VCenterAuthError, VCenterConnection, VSphereSource
from oma.plugins.vma.client import redact_url
from oma.shared.errors import BadRequest, Conflict, NotFound, OmaError
from oma.shared.logging import setup_logging
from oma.shared.vma import (API_PREFIX, CbtStatusResponse, CleanupRequest, CleanupResponse, DiscoverRequest,
                        DiscoverResponse, HealthResponse, PowerRequest, PowerResponse, PowerStateResponse,
                        ProgressUpdate, ReplicateRequest, ReplicateResponse, VCenterCredentials, VCenterInfo)

from .disks import DiskImage
from .jobs import DiskTransfer, Faults, OmaReporter, ReplicationJob, now_iso

log = logging.getLogger("oma.vma.sim")

DEFAULT_PORT = 8081  # the original VMA's


class CannotStart(OmaError):
    """The original answers 500 when a replication cannot start (VM or disk not found...)."""
    status, error = 500, "Cannot start replication"


# -- vCenter through the project's vSphere source -----------------------------------------

class VCenter(VSphereSource):
    """The vSphere source plus the few calls a VMA makes besides reading the inventory."""

    @classmethod
    def from_request(cls, creds: VCenterCredentials, *, verify_tls: bool, datacenter: str | None = None,
                     timeout: float = 30.0) -> VCenter:
        host, _, port = creds.vcenter.rpartition(":") if ":" in creds.vcenter else (creds.vcenter, "", "")
        return cls(VCenterConnection(host=host, port=int(port) if port.isdigit() else 443,
                                     username=creds.username, password=creds.password.get_secret_value(),
                                     datacenter=datacenter, verify_tls=verify_tls), timeout=timeout)

    async def power(self, vm_id: str, on: bool, *, force: bool, timeout: int) -> dict[str, Any]:
        return await self._run(lambda si: self._power(si, vm_id, on, force, timeout))

    async def state(self, vm_id: str) -> dict[str, Any]:
        return await self._run(lambda si: _state(_find_vm(si, vm_id)))

    def _power(self, si: vim.ServiceInstance, vm_id: str, on: bool, force: bool, timeout: int) -> dict[str, Any]:
        vm = _find_vm(si, vm_id)
        before = _state(vm)
        started, method = time.monotonic(), None
        wanted = "poweredOn" if on else "poweredOff"
        if before["power_state"] != wanted:
            if on:
                _wait(vm.PowerOnVM_Task(), timeout)
            elif not force and before["tools_status"] == "guestToolsRunning":
                method = "graceful"
                vm.ShutdownGuest()
                deadline = time.monotonic() + timeout
                while vm.runtime.powerState != "poweredOff" and time.monotonic() < deadline:
                    time.sleep(0.2)
                if vm.runtime.powerState != "poweredOff":
                    method = "forced"  # the guest did not shut down in time
                    _wait(vm.PowerOffVM_Task(), timeout)
            else:
                method = "forced"
                _wait(vm.PowerOffVM_Task(), timeout)
        after = _state(vm)
        return {"previous_state": before["power_state"], "new_state": after["power_state"],
                "shutdown_method": method, "tools_status": after["tools_status"],
                "duration_seconds": round(time.monotonic() - started, 3),
                "message": f"already {wanted}" if before["power_state"] == wanted else None}


def _find_vm(si: vim.ServiceInstance, vm_id: str) -> vim.VirtualMachine:
    """A VM by moref id (vm-42), instance UUID or inventory path (/DC0/vm/web01)."""
    index = si.content.searchIndex
    vm = None
    if "/" in vm_id:
        vm = index.FindByInventoryPath(vm_id.lstrip("/"))
    elif len(vm_id) == 36 and vm_id.count("-") == 4:
        vm = index.FindByUuid(None, vm_id, True, True)
    else:
        try:
            vm = vim.VirtualMachine(vm_id, si._stub)
            vm.name  # noqa: B018 - the lookup itself
        except vmodl.fault.ManagedObjectNotFound:
            vm = None
    if not isinstance(vm, vim.VirtualMachine):
        raise NotFound("VM not found", f"vCenter has no VM {vm_id!r} (give a moref id, instance UUID or path)")
    return vm


def _state(vm: vim.VirtualMachine) -> dict[str, Any]:
    runtime = vm.runtime
    boot = runtime.bootTime
    return {"power_state": str(runtime.powerState), "tools_status": vm.guest.toolsRunningStatus,
            "uptime_seconds": int(time.time() - boot.timestamp()) if boot else None}


def _wait(task: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while task.info.state in ("queued", "running"):
        if time.monotonic() > deadline:
            raise OmaError("vCenter task timeout", f"task {task._moId} still running after {timeout} s",
                           status=504)
        time.sleep(0.05)
    if task.info.state == "error":
        raise task.info.error


def vma_vm(vm: dict[str, Any]) -> dict[str, Any]:
    """One VM of the vSphere source in the VMA's discover shape (fields vcsim lacks stay null)."""
    guest = (vm.get("guest_os") or "").lower()
    return {
        "id": vm["id"], "name": vm["name"], "path": vm["path"], "datacenter": vm.get("datacenter"),
        "power_state": vm.get("power_state"), "guest_os": vm.get("guest_os_full_name") or vm.get("guest_os"),
        "memory_mb": vm.get("memory_mb"), "num_cpu": vm.get("cpus"), "cpus": vm.get("cpus"),
        "os_type": "windows" if guest.startswith("win") else "linux" if guest else "other",
        "vmx_version": None, "display_name": vm["name"], "annotation": None,
        "folder_path": vm["path"].rsplit("/", 1)[0], "vmware_tools_status": None, "vmware_tools_version": None,
        "disks": [{"id": d["id"], "label": d.get("label"), "path": d.get("path"), "vmdk_path": d.get("path"),
                   "size_gb": d.get("size_gb") or 0, "capacity_bytes": d.get("capacity_bytes") or 0,
                   "datastore": d.get("datastore"),
                   "provisioning_type": "thin" if d.get("thin_provisioned") else "thick",
                   "unit_number": d.get("unit_number")} for d in vm.get("disks", [])],
        "networks": [{"label": f"Network adapter {i + 1}", "network_name": n.get("network"),
                      "adapter_type": n.get("adapter_type"), "mac_address": n.get("mac_address"),
                      "connected": n.get("connected"), "type": n.get("adapter_type")}
                     for i, n in enumerate(vm.get("nics", []))],
    }


# -- the simulator ------------------------------------------------------------------------

class MutateRequest(BaseModel):
    vm: str = Field(min_length=1, description="VM inventory path, as replicated")
    disk: str = Field(min_length=1, description='"2000" or "disk-2000"')
    percent: float = Field(gt=0, le=100)
    vcenter: str | None = None


class FaultsRequest(BaseModel):
    fail_after_bytes: int | None = Field(default=None, ge=0)
    hang: bool = False
    throttle_bps: int | None = Field(default=None, gt=0)
    replicate_delay: float | None = Field(default=None, gt=0, le=3600)
    refuse_seconds: float | None = Field(default=None, gt=0, le=3600)


class VmaSimulator(Served):
    def __init__(self, data_dir: Path | str | None = None, *, disk_scale: Fraction | float = 1,
                 disk_size: int | None = None, density: float = 0.5, verify_tls: bool = True,
                 appliance_id: str | None = None, appliance_token: str | None = None,
                 strict_change_ids: bool = False, nbd_host: str = "127.0.0.1", vcenter_timeout: float = 30.0,
                 inventory: Any = None):
        self._tmp = None if data_dir else tempfile.TemporaryDirectory(prefix="oma-vma-sim-")
        self.data_dir = Path(data_dir or self._tmp.name)
        self.disk_scale, self.disk_size, self.density = Fraction(disk_scale), disk_size, density
        self.verify_tls, self.nbd_host, self.vcenter_timeout = verify_tls, nbd_host, vcenter_timeout
        self.inventory = inventory  # a synthetic vCenter (synthetic.py) instead of a real one, when given
        self.reporter = OmaReporter(appliance_id, appliance_token, strict=strict_change_ids)
        self.faults = Faults()
        self.jobs: dict[str, ReplicationJob] = {}
        self.replicate_calls: Counter[str] = Counter()  # job id -> POST /replicate received (tests)
        self._opening: set[str] = set()  # job ids whose /replicate is being set up
        self._disks: dict[Path, DiskImage] = {}
        self._sessions: dict[str, VCenterCredentials] = {}  # vcenter -> last credentials (power-state)
        self._vm_vcenter: dict[str, str] = {}  # vm id or path -> vcenter it was last seen on
        # vcenter -> (fresh until, its VMs): one walk of the inventory serves a burst of replicate calls
        self._listed: dict[str, tuple[float, list[dict[str, Any]]]] = {}
        self._listing: dict[str, asyncio.Lock] = {}
        self._started = time.time()
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self._refuse_timer: asyncio.TimerHandle | None = None
        self.host, self.port = "127.0.0.1", 0

    # -- lifecycle ------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(middlewares=[loopback_only_control, _errors])
        r, p = app.router, API_PREFIX
        r.add_post(f"{p}/discover", self._discover)
        r.add_post(f"{p}/replicate", self._replicate)
        r.add_get(f"{p}/progress/{{job_id}}", self._progress)
        r.add_post(f"{p}/progress/{{job_id}}/update", self._progress_update)
        r.add_get(f"{p}/status/{{job_id}}", self._status)
        r.add_post(f"{p}/cleanup", self._cleanup)
        r.add_get(f"{p}/vms/{{vm_path:.+}}/cbt-status", self._cbt_status)
        r.add_post(f"{p}/vm/{{vm_id}}/power-off", self._power_off)
        r.add_post(f"{p}/vm/{{vm_id}}/power-on", self._power_on)
        r.add_get(f"{p}/vm/{{vm_id}}/power-state", self._power_state)
        r.add_get(f"{p}/health", self._health)
        r.add_get("/health", self._health)
        r.add_post("/sim/mutate", self._ctl_mutate)
        r.add_get("/sim/faults", self._ctl_faults)
        r.add_post("/sim/faults", self._ctl_set_faults)
        r.add_delete("/sim/faults", self._ctl_clear_faults)
        r.add_get("/sim/oma-calls", self._ctl_oma_calls)
        r.add_get("/sim/disks", self._ctl_disks)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        self._runner = web.AppRunner(self.app(), access_log_class=_RedactingAccessLogger)
        await self._runner.setup()
        self.host = host
        self.port = port
        await self._listen()
        return self.url

    async def _listen(self) -> None:
        self._site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True)
        await self._site.start()
        self.port = self._runner.addresses[0][1]  # the chosen port when 0; kept when listening again

    async def stop(self) -> None:
        self.faults.set_hang(False)
        for job in self.jobs.values():
            job.cancel()
        await asyncio.gather(*(j.task for j in self.jobs.values() if j.task), return_exceptions=True)
        if self._refuse_timer:
            self._refuse_timer.cancel()
        await self._close()
        if self._tmp:
            self._tmp.cleanup()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    # -- faults ---------------------------------------------------------------------------

    async def refuse(self, seconds: float | None = None) -> None:
        """Stop listening (clients get ECONNREFUSED); listen again after `seconds` or `accept()`."""
        if self._site is not None:
            await self._site.stop()
            self._site = None
        if self._runner is not None and self._runner.server is not None:
            for handler in self._runner.server.connections:  # a dropped tunnel drops them too
                handler.force_close()
        if seconds:
            loop = asyncio.get_running_loop()
            self._refuse_timer = loop.call_later(seconds, lambda: asyncio.ensure_future(self.accept()))

    async def accept(self) -> None:
        if self._site is None and self._runner is not None:
            await self._listen()

    # -- disks ----------------------------------------------------------------------------

    def disk_path(self, vcenter: str, vm_path: str, key: int | str) -> Path:
        return self.data_dir / quote(vcenter, safe="") / quote(vm_path, safe="") / f"disk-{key}.img"

    def disk_size_for(self, capacity: int) -> int:
        return self.disk_size or int(capacity * self.disk_scale)

    async def source_disk(self, vcenter: str, vm: dict[str, Any], disk: dict[str, Any]) -> DiskImage:
        """The simulated disk of a VM as the vSphere source reads it, created on first use."""
        path = self.disk_path(vcenter, vm["path"], disk["key"])
        if path not in self._disks:
            seed = f"{vm.get('uuid') or vm['path']}/{disk['key']}"
            self._disks[path] = await asyncio.to_thread(
                DiskImage.open, path, self.disk_size_for(disk.get("capacity_bytes") or 0), seed, self.density)
        return self._disks[path]

    def _known_image(self, vcenter: str | None, vm_path: str, disk: str) -> DiskImage:
        key = disk.removeprefix("disk-")
        roots = [self.data_dir / quote(vcenter, safe="")] if vcenter else \
            [p for p in self.data_dir.iterdir() if p.is_dir()] if self.data_dir.is_dir() else []  # no disk yet
        found = [r / quote(vm_path, safe="") / f"disk-{key}.img" for r in roots]
        found = [p for p in found if p.exists()]
        if len(found) != 1:
            raise NotFound("Disk not found" if not found else "Disk ambiguous",
                           f"no single simulated disk {disk} of VM {vm_path!r}: a disk exists once a "
                           f"replication of its VM has started" + ("; give vcenter" if found else ""))
        if found[0] not in self._disks:
            self._disks[found[0]] = DiskImage.open(found[0], 0, "")  # existing: reads its state
        return self._disks[found[0]]

    # -- handlers -------------------------------------------------------------------------

    def _vcenter(self, creds: VCenterCredentials, datacenter: str | None = None) -> VCenter:
        self._sessions[creds.vcenter] = creds
        if self.inventory is not None:
            return self.inventory.session(creds, datacenter)
        return VCenter.from_request(creds, verify_tls=self.verify_tls, datacenter=datacenter,
                                    timeout=self.vcenter_timeout)

    async def _vms(self, creds: VCenterCredentials, fresh_for: float = 2.0) -> list[dict[str, Any]]:
        """The vCenter's VMs for a replicate call. A walk of the whole inventory costs a second of
        pyVmomi on a large vCenter: 100 jobs started at once share one walk (2 s old at most; a
        discovery starts afresh)."""
        hit = self._listed.get(creds.vcenter)
        if hit is None or hit[0] < time.monotonic():
            async with self._listing.setdefault(creds.vcenter, asyncio.Lock()):
                hit = self._listed.get(creds.vcenter)
                if hit is None or hit[0] < time.monotonic():
                    vms = await self._vcenter(creds).discover()
                    hit = self._listed[creds.vcenter] = (time.monotonic() + fresh_for, vms)
        return hit[1]

    async def _discover(self, request: web.Request) -> web.Response:
        body = await _parse(request, DiscoverRequest)
        self._listed.pop(body.vcenter, None)
        vms = await self._vcenter(body, body.datacenter).discover()
        if body.filter:
            vms = [vm for vm in vms if body.filter.lower() in f"{vm['name']} {vm['path']}".lower()]
        for vm in vms:
            self._vm_vcenter[vm["id"]] = self._vm_vcenter[vm["path"]] = body.vcenter
        answer = DiscoverResponse(vcenter=VCenterInfo(host=body.vcenter, datacenter=body.datacenter),
                                  vms=[vma_vm(vm) for vm in vms])
        return _json(answer)

    async def _replicate(self, request: web.Request) -> web.Response:
        body = await _parse(request, ReplicateRequest)
        if len(body.vm_paths) != 1:
            raise BadRequest("One VM per job", "the simulator copies one VM per job, as the original OMA sends")
        self.replicate_calls[body.job_id] += 1
        old = self.jobs.get(body.job_id)
        running = old is not None and not old.finished
        if running or body.job_id in self._opening:
            raise Conflict("Job running", f"job {body.job_id!r} is still {old.status if running else 'starting'}")
        self._opening.add(body.job_id)  # a second call while this one awaits: 409, as a running job
        try:
            return await self._open(body)
        finally:
            self._opening.discard(body.job_id)

    async def _open(self, body: ReplicateRequest) -> web.Response:
        path = body.vm_paths[0]
        vms = await self._vms(body)
        vm = next((v for v in vms if v["path"] == path), None)
        if vm is None:
            raise CannotStart(details=f"vCenter {body.vcenter} has no VM at {path!r}")
        self._vm_vcenter[vm["id"]] = self._vm_vcenter[path] = body.vcenter
        by_key = {str(d["key"]): d for d in vm["disks"]}
        missing = [t.vmware_disk_key for t in body.nbd_targets if t.vmware_disk_key not in by_key]
        if missing:
            raise CannotStart(details=f"VM {path!r} has no disk with key {', '.join(missing)} "
                                      f"(its disks: {', '.join(by_key) or 'none'})")
        disks = []
        for t in body.nbd_targets:
            d = by_key[t.vmware_disk_key]
            disks.append(DiskTransfer(disk_id=d["id"], label=d.get("label"),
                                      image=await self.source_disk(body.vcenter, vm, d),
                                      target=self._target(t.device_path), previous_change_id=t.previous_change_id))
        job = ReplicationJob(body.job_id, vm, disks, body.oma_url, self.reporter, self.faults)
        self.jobs[body.job_id] = job
        job.task = asyncio.create_task(job.run(), name=f"vma-sim-{body.job_id}")
        log.info("job %s: %s, %d disk(s) -> %s", body.job_id, path, len(disks),
                 ", ".join(redact_url(d.target) for d in disks))
        if self.faults.replicate_delay:  # a slow tunnel: the copy runs, the answer is late
            await asyncio.sleep(self.faults.replicate_delay)
        return _json(ReplicateResponse(job_id=body.job_id, status="started", vm_count=1,
                                       started_at=job.started_iso))

    def _target(self, uri: str) -> str:
        """The hostless form nbd://:port/export is OMA's own host: reached here at --nbd-host."""
        parts = urlsplit(uri)
        if not parts.hostname:
            return urlunsplit(parts._replace(netloc=f"{self.nbd_host}{parts.netloc}"))
        return uri

    def _job(self, request: web.Request) -> ReplicationJob:
        job_id = request.match_info["job_id"]
        if job_id not in self.jobs:
            raise NotFound("Job not found", f"no replication job {job_id!r} on this VMA")
        return self.jobs[job_id]

    async def _progress(self, request: web.Request) -> web.Response:
        return _json(self._job(request).progress())

    async def _progress_update(self, request: web.Request) -> web.Response:
        job = self._job(request)
        job.apply(await _parse(request, ProgressUpdate))
        return web.json_response({"success": True, "job_id": job.job_id})

    async def _status(self, request: web.Request) -> web.Response:
        return _json(self._job(request).status_view())

    async def _cleanup(self, request: web.Request) -> web.Response:
        body = await _parse(request, CleanupRequest)
        job = self.jobs.get(body.job_id)
        if job is None:
            raise NotFound("Job not found", f"no replication job {body.job_id!r} on this VMA")
        was = job.status
        job.cancel()
        if job.task is not None:
            await asyncio.gather(job.task, return_exceptions=True)
        return _json(CleanupResponse(job_id=job.job_id, action=body.action, status="cleaned",
                                     message=f"job was {was}; snapshot removed"))

    async def _cbt_status(self, request: web.Request) -> web.Response:
        creds = _parse_data(dict(request.query), VCenterCredentials)
        vm_path = "/" + request.match_info["vm_path"].lstrip("/")
        vms = await self._vcenter(creds).discover()
        vm = next((v for v in vms if v["path"] == vm_path), None)
        if vm is None:
            raise NotFound("VM not found", f"vCenter {creds.vcenter} has no VM at {vm_path!r}")
        return _json(CbtStatusResponse(vm_path=vm_path, cbt_enabled=vm["cbt_enabled"],
                                       power_state=vm.get("power_state")))

    async def _power_off(self, request: web.Request) -> web.Response:
        return await self._power(request, on=False)

    async def _power_on(self, request: web.Request) -> web.Response:
        return await self._power(request, on=True)

    async def _power(self, request: web.Request, on: bool) -> web.Response:
        data = await _body(request)
        data["vm_id"] = request.match_info["vm_id"]  # the route names the VM
        body = _parse_data(data, PowerRequest)
        self._vm_vcenter[body.vm_id] = body.vcenter
        done = await self._vcenter(body).power(body.vm_id, on, force=body.force, timeout=body.timeout)
        return _json(PowerResponse(success=True, vm_id=body.vm_id, operation="power-on" if on else "power-off",
                                   timestamp=now_iso(), **done))

    async def _power_state(self, request: web.Request) -> web.Response:
        vm_id = request.match_info["vm_id"]
        if "vcenter" in request.query:
            creds = _parse_data(dict(request.query), VCenterCredentials)
        else:  # as the original: the session of an earlier call
            vcenter = self._vm_vcenter.get(vm_id) or (next(iter(self._sessions)) if len(self._sessions) == 1 else None)
            if vcenter is None or vcenter not in self._sessions:
                raise BadRequest("No vCenter session", "no earlier call named this VM's vCenter: give vcenter, "
                                                       "username and password as query parameters")
            creds = self._sessions[vcenter]
        state = await self._vcenter(creds).state(vm_id)
        return _json(PowerStateResponse(vm_id=vm_id, power_state=state["power_state"],
                                        tools_status=state["tools_status"],
                                        uptime_seconds=state["uptime_seconds"], timestamp=now_iso()))

    async def _health(self, request: web.Request) -> web.Response:
        return _json(HealthResponse(status="healthy", timestamp=now_iso(),
                                    uptime=round(time.time() - self._started, 1)))

    # -- control (/sim/, loopback only) ---------------------------------------------------

    async def mutate(self, vm: str, disk: str, percent: float, vcenter: str | None = None) -> dict[str, Any]:
        image = self._known_image(vcenter, vm, disk)
        async with image.lock:
            written = await asyncio.to_thread(image.mutate, percent)
        return {"vm": vm, "disk": f"disk-{disk.removeprefix('disk-')}", "bytes_written": written,
                "blocks_written": written // (64 * 1024), "disk_size": image.size, "change_id": image.change_id}

    async def _ctl_mutate(self, request: web.Request) -> web.Response:
        body = await _parse(request, MutateRequest)
        return web.json_response(await self.mutate(body.vm, body.disk, body.percent, body.vcenter))

    async def set_faults(self, fail_after_bytes: int | None = None, hang: bool = False,
                         throttle_bps: int | None = None, refuse_seconds: float | None = None,
                         replicate_delay: float | None = None) -> None:
        self.faults.fail_after_bytes, self.faults.throttle_bps = fail_after_bytes, throttle_bps
        self.faults.replicate_delay = replicate_delay
        self.faults.set_hang(hang)
        if refuse_seconds:
            await self.refuse(refuse_seconds)

    async def clear_faults(self) -> None:
        await self.set_faults()
        await self.accept()

    async def _ctl_faults(self, request: web.Request) -> web.Response:
        return web.json_response(self.faults.view())

    async def _ctl_set_faults(self, request: web.Request) -> web.Response:
        body = await _parse(request, FaultsRequest)
        view = {**self.faults.view(), **body.model_dump(exclude={"refuse_seconds"})}
        # Answer before refusing, so the caller learns the fault is set.
        asyncio.get_running_loop().call_later(0.05, lambda: asyncio.ensure_future(
            self.set_faults(**body.model_dump())))
        return web.json_response(view)

    async def _ctl_clear_faults(self, request: web.Request) -> web.Response:
        await self.clear_faults()
        return web.json_response(self.faults.view())

    async def _ctl_oma_calls(self, request: web.Request) -> web.Response:
        return web.json_response(self.reporter.calls)

    async def _ctl_disks(self, request: web.Request) -> web.Response:
        return web.json_response([{"path": str(p), "size": d.size, "change_id": d.change_id}
                                  for p, d in self._disks.items()])


# -- HTTP plumbing ------------------------------------------------------------------------

async def _body(request: web.Request) -> dict[str, Any]:
    try:
        data = await request.json()
    except ValueError:
        raise BadRequest("Invalid JSON", "the body is not a JSON object") from None
    if not isinstance(data, dict):
        raise BadRequest("Invalid JSON", "the body is not a JSON object")
    return data


async def _parse(request: web.Request, model: type[BaseModel]) -> Any:
    return _parse_data(await _body(request), model)


def _parse_data(data: dict[str, Any], model: type[BaseModel]) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:  # never echo the input: it may hold the password
        raise BadRequest("Invalid request", [{"loc": list(e["loc"]), "msg": e["msg"]} for e in
                                             exc.errors(include_input=False, include_url=False)]) from None


def _json(model: BaseModel) -> web.Response:
    return web.json_response(model.model_dump(mode="json"))


@web.middleware
async def _errors(request: web.Request, handler: Callable[..., Any]) -> web.StreamResponse:
    """Every failure in the seed's shape `{success, error, details}`; unexpected ones as 500."""
    try:
        return await handler(request)
    except web.HTTPException:
        raise
    except VCenterAuthError as exc:  # the caller's credentials: 401, not a gateway failure to retry
        return web.json_response(exc.body(), status=401)
    except OmaError as exc:
        return web.json_response(exc.body(), status=exc.status)
    except vmodl.MethodFault as exc:  # a vCenter task failed
        return web.json_response(OmaError("vCenter error", getattr(exc, "msg", None) or type(exc).__name__,
                                          status=502).body(), status=502)
    except Exception as exc:
        log.exception("%s %s failed", request.method, redact_url(request.rel_url))
        return web.json_response(OmaError(details=type(exc).__name__).body(), status=500)


class _RedactingAccessLogger(AbstractAccessLogger):
    """aiohttp's access log would print the cbt-status query with the vCenter password."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        self.logger.info("%s %s %d %.3fs", request.method, redact_url(request.rel_url), response.status, time)


# -- command line -------------------------------------------------------------------------

def _size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    text = text.strip().lower().removesuffix("ib").removesuffix("b")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="oma-vma-sim", description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="0 picks a free port")
    p.add_argument("--data-dir", help="where the simulated disks live (default: a temporary directory)")
    p.add_argument("--disk-scale", type=Fraction, default=Fraction(1),
                   help="simulated size = vCenter capacity x this, e.g. 1/1024")
    p.add_argument("--disk-size", type=_size, help="every simulated disk this size (e.g. 64M), overrides the scale")
    p.add_argument("--density", type=float, default=0.5, help="share of blocks holding data at creation")
    p.add_argument("--insecure-vcenter", action="store_true", help="do not verify vCenter's TLS certificate")
    p.add_argument("--appliance-id", help="log in to OMA as this appliance to record change ids")
    p.add_argument("--appliance-token", help="its token (or set OMA_VMA_SIM_TOKEN)")
    p.add_argument("--strict-change-ids", action="store_true",
                   help="fail a sync when OMA does not record its change ids, as the original copier does")
    p.add_argument("--nbd-host", default="127.0.0.1", help="host for hostless targets nbd://:port/export")
    p.add_argument("--debug", action="store_true")
    return p


async def _serve(args: argparse.Namespace) -> None:
    setup_logging(debug=args.debug)
    sim = VmaSimulator(args.data_dir, disk_scale=args.disk_scale, disk_size=args.disk_size, density=args.density,
                       verify_tls=not args.insecure_vcenter, appliance_id=args.appliance_id,
                       appliance_token=args.appliance_token or os.environ.get("OMA_VMA_SIM_TOKEN"),
                       strict_change_ids=args.strict_change_ids, nbd_host=args.nbd_host)
    await serve_until_signalled(sim, args.host, args.port)


def main(argv: list[str] | None = None) -> None:
    asyncio.run(_serve(_parser().parse_args(argv)))


if __name__ == "__main__":
    main()
