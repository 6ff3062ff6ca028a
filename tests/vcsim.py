"""A real vCenter simulator (govmomi's vcsim) for tests and benchmarks.

    from tests.vcsim import running_vcsim, create_vm, DiskSpec, NicSpec

    with running_vcsim(username="admin", password="s3cret") as sim:
        with sim.service_instance() as si:
            create_vm(si, "db01", disks=[DiskSpec(40), DiskSpec(8, controller="sata")])
        source = VSphereSource(sim.connection())

`build_vcsim()` compiles ops/vcsim/main.go once (ops/vcsim/build.sh, offline, cached in
${OMA_VCSIM_BIN:-~/.cache/oma/vcsim}). It raises `VcsimError` when it cannot: tests that need
vcsim must fail, never skip, when it is missing. vcsim picks a free loopback port itself
(-listen 127.0.0.1:0) and prints its URL, so there is no port race. Stop it with SIGTERM so it
removes its temporary datastore directories.
"""
from __future__ import annotations

import contextlib
import os
import selectors
import signal
import subprocess
import tempfile
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

REPO = Path(__file__).resolve().parent.parent
BUILD_SCRIPT = REPO / "ops" / "vcsim" / "build.sh"
DEFAULT_BIN = Path(os.environ.get("OMA_VCSIM_BIN") or Path.home() / ".cache" / "oma" / "vcsim")

# 1,000 VMs: dc x (standalone-host + cluster) x vm = 2 x (2 + 2) x 125
THOUSAND_VMS = {"dc": 2, "cluster": 2, "host": 4, "standalone-host": 2, "vm": 125, "pg": 4, "folder": 2}

_build_lock = threading.Lock()


class VcsimError(RuntimeError):
    """vcsim could not be built or started."""


def build_vcsim(output: Path | str | None = None, *, timeout: float = 600) -> Path:
    """Build vcsim when missing or older than its sources; return the binary's path."""
    out = Path(output) if output else DEFAULT_BIN
    with _build_lock:
        try:
            proc = subprocess.run(["bash", str(BUILD_SCRIPT), str(out)], capture_output=True,
                                  text=True, timeout=timeout)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise VcsimError(f"building vcsim with {BUILD_SCRIPT} failed: {exc}") from exc
    if proc.returncode != 0 or not out.is_file():
        raise VcsimError(f"building vcsim with {BUILD_SCRIPT} failed (exit {proc.returncode}):\n"
                         f"{proc.stdout}{proc.stderr}")
    return out


@dataclass
class Vcsim:
    """A running vcsim process."""
    url: str
    process: subprocess.Popen
    username: str
    password: str = field(repr=False)
    log_path: Path | None = None

    @property
    def host(self) -> str:
        return urllib.parse.urlparse(self.url).hostname or "127.0.0.1"

    @property
    def port(self) -> int:
        return urllib.parse.urlparse(self.url).port or 443

    def connection(self, **overrides: Any):
        """A VCenterConnection to this simulator (verify_tls off: its certificate is self-signed)."""
        from oma.plugins.vsphere.source import VCenterConnection
        fields = {"host": self.host, "port": self.port, "username": self.username,
                  "password": self.password, "verify_tls": False, **overrides}
        return VCenterConnection(**fields)

    @contextlib.contextmanager
    def service_instance(self) -> Iterator[Any]:
        """A logged-in pyvmomi ServiceInstance, logged out on exit."""
        from pyVim.connect import Disconnect, SmartConnect
        si = SmartConnect(host=self.host, port=self.port, user=self.username, pwd=self.password,
                          disableSslCertValidation=True)
        try:
            yield si
        finally:
            Disconnect(si)

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout: float = 15) -> None:
        """SIGTERM (vcsim removes its datastore directories), SIGKILL only if it hangs."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stdout:
            self.process.stdout.close()


def _flag_args(flags: Mapping[str, Any] | Sequence[str] | None) -> list[str]:
    if flags is None:
        return []
    if isinstance(flags, Mapping):
        return [f"-{name.lstrip('-')}={value}" for name, value in flags.items()]
    return list(flags)


def start_vcsim(flags: Mapping[str, Any] | Sequence[str] | None = None, *,
                username: str | None = None, password: str | None = None,
                binary: Path | str | None = None, timeout: float = 120) -> Vcsim:
    """Build if needed and start vcsim on a free loopback port; wait for its URL.

    `flags` is a mapping (`{"vm": 5, "dc": 2}`) or a list of raw arguments. Without
    username/password vcsim accepts any non-empty credentials (the Vcsim records user/pass).
    """
    exe = build_vcsim(binary)
    args = [str(exe), "-listen", "127.0.0.1:0", *_flag_args(flags)]
    if username is not None:
        args += ["-username", username, "-password", password or ""]
    log_file = tempfile.NamedTemporaryFile(prefix="oma-vcsim-", suffix=".log", delete=False)
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=log_file, text=True,
                            start_new_session=True)
    log_file.close()
    sim = Vcsim(url="", process=proc, username=username or "user", password=password or "pass",
                log_path=Path(log_file.name))
    try:
        sim.url = _read_url(proc, timeout)
    except BaseException:
        sim.stop()
        raise
    return sim


def _read_url(proc: subprocess.Popen, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while time.monotonic() < deadline:
            if sel.select(timeout=0.2):
                line = proc.stdout.readline().strip()
                if line.startswith("http"):
                    return line
                if not line and proc.poll() is not None:
                    break
            elif proc.poll() is not None:
                break
    raise VcsimError(f"vcsim did not print its URL within {timeout:g} s "
                     f"(exit code {proc.poll()}); see its log for details")


@contextlib.contextmanager
def running_vcsim(flags: Mapping[str, Any] | Sequence[str] | None = None, **kwargs: Any) -> Iterator[Vcsim]:
    """`start_vcsim(...)` as a context manager that always stops it."""
    sim = start_vcsim(flags, **kwargs)
    try:
        yield sim
    finally:
        sim.stop()
        if sim.log_path:
            sim.log_path.unlink(missing_ok=True)


# -- realistic VMs -------------------------------------------------------------------------

@dataclass
class DiskSpec:
    """A disk to create. `controller` is scsi, sata, ide or nvme; `bus` picks (or creates)
    the controller with that bus number; `unit` defaults to the next free unit (skipping 7 on SCSI)."""
    size_gb: float
    controller: str = "scsi"
    bus: int = 0
    unit: int | None = None
    thin: bool = True
    scsi_model: str = "pvscsi"  # pvscsi, lsilogic, lsilogic-sas, buslogic (new SCSI controllers only)
    set_capacity_in_bytes: bool = True  # False: only capacityInKB, like vcsim's default model

    @property
    def capacity_bytes(self) -> int:
        return int(self.size_gb * 1024 ** 3)


@dataclass
class NicSpec:
    """A NIC on a network by name (a DVPG, e.g. DC0_DVPG0, or a standard one, e.g. "VM Network")."""
    network: str = "VM Network"
    adapter: str = "vmxnet3"  # vmxnet3, e1000, e1000e, pcnet32
    mac_address: str | None = None


def _vim():
    from pyVmomi import vim
    return vim


def find_by_name(si: Any, vim_type: Any, name: str | None = None, root: Any = None) -> Any:
    """The first managed object of a type (with that name, when given) below root."""
    content = si.RetrieveContent()
    view = content.viewManager.CreateContainerView(root or content.rootFolder, [vim_type], True)
    try:
        for obj in view.view:
            if name is None or obj.name == name:
                return obj
    finally:
        view.DestroyView()
    raise LookupError(f"no {vim_type.__name__} named {name!r}")


def wait_for_task(task: Any, timeout: float = 60) -> Any:
    """Poll a task to completion; raise its fault when it fails."""
    deadline = time.monotonic() + timeout
    while task.info.state in ("queued", "running"):
        if time.monotonic() > deadline:
            raise TimeoutError(f"task {task._moId} still {task.info.state} after {timeout:g} s")
        time.sleep(0.02)
    if task.info.state == "error":
        raise task.info.error
    return task.info.result


def create_vm(si: Any, name: str, *, disks: Sequence[DiskSpec] = (DiskSpec(16),),
              nics: Sequence[NicSpec] = (), cpus: int = 2, memory_mb: int = 2048,
              guest_id: str = "otherGuest64", firmware: str = "bios", cbt: bool | None = None,
              datacenter: str | None = None, folder: Any = None, host: str | None = None,
              datastore: str | None = None, power_on: bool = False, template: bool = False) -> Any:
    """Create a VM with CreateVM_Task: disks on SCSI/SATA/IDE/NVMe controllers, NICs, CBT
    on/off (None leaves it unset), EFI or BIOS firmware. Returns the vim.VirtualMachine."""
    vim = _vim()
    dc = find_by_name(si, vim.Datacenter, datacenter)
    if host:
        host_obj = find_by_name(si, vim.HostSystem, host, dc)
        pool = host_obj.parent.resourcePool
    else:
        pool = find_by_name(si, vim.ResourcePool, None, dc.hostFolder)
        host_obj = None
    ds_name = datastore or dc.datastore[0].name
    changes = _device_changes(vim, si, dc, name, ds_name, disks, nics)
    spec = vim.vm.ConfigSpec(
        name=name, numCPUs=cpus, memoryMB=memory_mb, guestId=guest_id, firmware=firmware,
        files=vim.vm.FileInfo(vmPathName=f"[{ds_name}] {name}/{name}.vmx"),
        deviceChange=changes)
    if cbt is not None:
        spec.changeTrackingEnabled = cbt
    vm = wait_for_task((folder or dc.vmFolder).CreateVM_Task(config=spec, pool=pool, host=host_obj))
    if power_on:
        wait_for_task(vm.PowerOnVM_Task())
    if template:
        vm.MarkAsTemplate()
    return vm


def snapshot(vm: Any, name: str) -> Any:
    """Take a (memoryless, unquiesced) snapshot of a VM; returns the snapshot's moref."""
    return wait_for_task(vm.CreateSnapshot_Task(name=name, description="", memory=False, quiesce=False))


_SCSI_MODELS = {"pvscsi": "ParaVirtualSCSIController", "lsilogic": "VirtualLsiLogicController",
                "lsilogic-sas": "VirtualLsiLogicSASController", "buslogic": "VirtualBusLogicController"}
_NIC_MODELS = {"vmxnet3": "VirtualVmxnet3", "e1000": "VirtualE1000", "e1000e": "VirtualE1000e",
               "pcnet32": "VirtualPCNet32"}
_PCI_KEY, _IDE_KEYS = 100, {0: 200, 1: 201}  # present in every new vcsim VM


def _device_changes(vim: Any, si: Any, dc: Any, name: str, ds_name: str,
                    disks: Sequence[DiskSpec], nics: Sequence[NicSpec]) -> list[Any]:
    add = vim.vm.device.VirtualDeviceSpec.Operation.add
    changes: list[Any] = []
    controllers: dict[tuple[str, int], int] = {("ide", b): k for b, k in _IDE_KEYS.items()}
    used: dict[int, set[int]] = {}
    next_key = -100

    def controller_key(kind: str, bus: int, scsi_model: str) -> int:
        nonlocal next_key
        if (kind, bus) in controllers:
            return controllers[(kind, bus)]
        if kind == "scsi":
            ctl = getattr(vim.vm.device, _SCSI_MODELS[scsi_model])(
                busNumber=bus, sharedBus=vim.vm.device.VirtualSCSIController.Sharing.noSharing)
        elif kind == "sata":
            ctl = vim.vm.device.VirtualAHCIController(busNumber=bus)
        elif kind == "nvme":
            ctl = vim.vm.device.VirtualNVMEController(busNumber=bus)
        else:
            raise ValueError(f"unknown controller {kind!r} (bus {bus})")
        ctl.key, ctl.controllerKey = next_key, _PCI_KEY
        next_key -= 1
        changes.append(vim.vm.device.VirtualDeviceSpec(operation=add, device=ctl))
        controllers[(kind, bus)] = ctl.key
        return ctl.key

    for index, d in enumerate(disks):
        ckey = controller_key(d.controller, d.bus, d.scsi_model)
        taken = used.setdefault(ckey, set())
        unit = d.unit
        if unit is None:
            unit = 0
            while unit in taken or (d.controller == "scsi" and unit == 7):
                unit += 1
        taken.add(unit)
        suffix = "" if index == 0 else f"_{index}"
        disk = vim.vm.device.VirtualDisk(
            key=next_key, controllerKey=ckey, unitNumber=unit,
            capacityInKB=d.capacity_bytes // 1024,
            backing=vim.vm.device.VirtualDisk.FlatVer2BackingInfo(
                fileName=f"[{ds_name}] {name}/{name}{suffix}.vmdk", diskMode="persistent",
                thinProvisioned=d.thin, eagerlyScrub=not d.thin))
        if d.set_capacity_in_bytes:
            disk.capacityInBytes = d.capacity_bytes
        next_key -= 1
        changes.append(vim.vm.device.VirtualDeviceSpec(
            operation=add, fileOperation=vim.vm.device.VirtualDeviceSpec.FileOperation.create,
            device=disk))

    for n in nics:
        nic = getattr(vim.vm.device, _NIC_MODELS[n.adapter])(key=next_key)
        next_key -= 1
        net = find_by_name(si, vim.Network, n.network, dc)
        if isinstance(net, vim.dvs.DistributedVirtualPortgroup):
            nic.backing = vim.vm.device.VirtualEthernetCard.DistributedVirtualPortBackingInfo(
                port=vim.dvs.PortConnection(portgroupKey=net.key,
                                            switchUuid=net.config.distributedVirtualSwitch.uuid))
        else:
            nic.backing = vim.vm.device.VirtualEthernetCard.NetworkBackingInfo(
                deviceName=net.name, network=net)
        if n.mac_address:
            nic.addressType, nic.macAddress = "manual", n.mac_address
        nic.connectable = vim.vm.device.VirtualDevice.ConnectInfo(startConnected=True, connected=True)
        changes.append(vim.vm.device.VirtualDeviceSpec(operation=add, device=nic))
    return changes


def read_vm_direct(vm: Any) -> dict[str, Any]:
    """What pyvmomi reports for one VM through plain attribute access (one round trip per
    property): the reference that bulk discovery is compared against."""
    vim = _vim()
    devices = list(vm.config.hardware.device)
    by_key = {d.key: d for d in devices}
    disks = []
    for d in devices:
        if isinstance(d, vim.vm.device.VirtualDisk):
            ctl = by_key.get(d.controllerKey)
            disks.append({
                "key": d.key, "unit_number": d.unitNumber, "controller_key": d.controllerKey,
                "controller_bus_number": ctl.busNumber if ctl else None,
                "path": d.backing.fileName,
                "capacity_bytes": d.capacityInBytes or d.capacityInKB * 1024,
                "datastore": d.backing.datastore.name if d.backing.datastore else None,
                "thin_provisioned": bool(getattr(d.backing, "thinProvisioned", False)),
            })
    nics = [{"key": d.key, "mac_address": d.macAddress} for d in devices
            if isinstance(d, vim.vm.device.VirtualEthernetCard)]
    return {"id": vm._moId, "uuid": vm.config.instanceUuid, "bios_uuid": vm.config.uuid,
            "name": vm.name, "cpus": vm.config.hardware.numCPU,
            "memory_mb": vm.config.hardware.memoryMB, "host": vm.runtime.host.name,
            "disks": disks, "nics": nics}
