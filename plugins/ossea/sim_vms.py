"""The CloudStack simulator's VM lifecycle: what failover needs (shared/reference/failover.md section 5).

VMs with states and transitions, `deployVirtualMachine` (with `startvm=false` a Stopped VM and an
Allocated stub ROOT from the template), ROOT/DATADISK rules (attach at device 0 only on a Stopped VM
without ROOT, the type flips; a ROOT detaches only from a Stopped VM; hot attach/detach of data disks
only), volume snapshots (`createSnapshot`, `createVolume snapshotid`, `revertSnapshot` with a
per-storage support flag, `deleteSnapshot`, `listSnapshots`), `destroyVirtualMachine` with `expunge`
and `volumeids`, networks and NICs (`networkids` vs `iptonetworklist`, MAC format and duplicates, NIC
order, the default NIC), templates, service offerings and `listCapabilities`.

It plugs into `CloudStackSimulator` through `install(sim)`: new commands are added to its dispatch and
the volume commands that gain rules (attach, detach, createVolume) are wrapped, the data-disk path still
running the simulator's own code. Fault injection, latency and hangs apply to every command here.
With `device_dir`, snapshots and clones copy the volume's backing file (sparse), so a clone's content
can be checked.
"""
from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from oma.shared.schemas import GIB

from .signing import format_date
from .sim_common import ACCOUNT_ID, DEFAULT_ZONE_ID, DOMAIN_ID, ApiError, _Args, _now, _uuid, filtered, listing, page
from .sim_jobs import _Submit
from .sim_volumes import Volume, Volumes

ASYNC_COMMANDS = frozenset({
    "deployVirtualMachine", "startVirtualMachine", "stopVirtualMachine", "destroyVirtualMachine",
    "expungeVirtualMachine", "createSnapshot", "deleteSnapshot", "revertSnapshot"})
VERSION = "4.20.1.0"
STUB_TEMPLATE_ID = "7e000000-0000-4000-8000-000000000001"
SMALL_OFFERING_ID = "5e000000-0000-4000-8000-000000000001"
MEDIUM_OFFERING_ID = "5e000000-0000-4000-8000-000000000002"
PROD_NETWORK_IDS = ("0e000000-0000-4000-8000-000000000001", "0e000000-0000-4000-8000-000000000002")
TEST_NETWORK_IDS = ("0e000000-0000-4000-8000-000000000011", "0e000000-0000-4000-8000-000000000012")
MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
IP_TO_NETWORK = re.compile(r"^iptonetworklist\[(\d+)\]\.(\w+)$")
HOSTNAME = re.compile(r"^[A-Za-z]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")
# VirtualMachine.State. The moves happen when the job runs, so a job that fails (fault injection)
# leaves the VM where it was, as CloudStack's state machine does.
STOPPED, RUNNING, DESTROYED = "Stopped", "Running", "Destroyed"


@dataclass
class Snapshot:
    id: str
    name: str
    volume_id: str
    volume_name: str
    volume_type: str
    size: int
    state: str = "BackedUp"
    created: datetime = field(default_factory=_now)


def _sparse_copy(src: Path, dst: Path, size: int) -> None:
    """Copy only the data extents (SEEK_DATA/SEEK_HOLE), so a 1 GiB mostly-empty disk copies in ms."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    with open(dst, "wb") as out:
        out.truncate(size)
        if not src.exists():
            return
        with open(src, "rb") as inp:
            fd, end, pos = inp.fileno(), os.fstat(inp.fileno()).st_size, 0
            while pos < end:
                try:
                    pos = os.lseek(fd, pos, os.SEEK_DATA)
                except OSError:  # ENXIO: no data after pos
                    break
                hole = os.lseek(fd, pos, os.SEEK_HOLE)
                inp.seek(pos)
                out.seek(pos)
                while pos < hole:
                    chunk = inp.read(min(1 << 20, hole - pos))
                    out.write(chunk)
                    pos += len(chunk)


class VmLab:
    """The VM side of one simulator. Tests reach it as `sim.lab`."""

    def __init__(self, sim: Volumes):  # the whole simulator; typed by the part it works on
        self.sim = sim
        self.kvm_snapshot_enabled = True      # global setting kvm.snapshot.enabled
        self.snapshot_revert_supported = True  # storage support for revertSnapshot
        self.version = VERSION
        self.snapshots: dict[str, Snapshot] = {}
        self.templates = {STUB_TEMPLATE_ID: {
            "id": STUB_TEMPLATE_ID, "name": "oma-failover-stub", "displaytext": "Stub for failover",
            "hypervisor": "KVM", "ostypename": "Other PV Virtio-SCSI (64-bit)", "format": "QCOW2",
            "size": 1 * GIB, "isready": True, "ispublic": True, "templatetype": "USER",
            "zoneid": DEFAULT_ZONE_ID}}
        self.service_offerings = {o["id"]: o for o in (
            {"id": SMALL_OFFERING_ID, "name": "Small Instance", "cpunumber": 1, "cpuspeed": 1000,
             "memory": 1024, "iscustomized": False, "storagetype": "shared"},
            {"id": MEDIUM_OFFERING_ID, "name": "Medium Instance", "cpunumber": 2, "cpuspeed": 2000,
             "memory": 4096, "iscustomized": False, "storagetype": "shared"})}
        self.networks: dict[str, dict[str, Any]] = {}
        for i, net_id in enumerate(PROD_NETWORK_IDS):
            self.add_network(f"prod-net-{i + 1}", f"10.{i + 1}.0.0/24", net_id)
        for i, net_id in enumerate(TEST_NETWORK_IDS):
            self.add_network(f"test-net-{i + 1}", f"10.10{i + 1}.0.0/24", net_id)
        self.nics: dict[str, list[dict[str, Any]]] = {}  # vm id -> NICs in order

    def add_network(self, name: str, cidr: str, net_id: str | None = None) -> dict[str, Any]:
        net = {"id": net_id or _uuid(), "name": name, "displaytext": name, "cidr": cidr,
               "type": "Isolated", "state": "Implemented", "zoneid": DEFAULT_ZONE_ID,
               "traffictype": "Guest", "_next_ip": 10}
        self.networks[net["id"]] = net
        return net

    def handlers(self) -> dict[str, Callable[[_Args], Any]]:
        sim = self.sim
        attach, detach, create = (sim._handlers["attachVolume"], sim._handlers["detachVolume"],
                                  sim._handlers["createVolume"])
        return {
            "listCapabilities": self._list_capabilities, "listTemplates": self._list_templates,
            "listServiceOfferings": self._list_service_offerings, "listNetworks": self._list_networks,
            "listNics": self._list_nics, "listSnapshots": self._list_snapshots,
            "deployVirtualMachine": self._deploy, "startVirtualMachine": self._start,
            "stopVirtualMachine": self._stop, "destroyVirtualMachine": self._destroy,
            "expungeVirtualMachine": self._expunge, "createSnapshot": self._create_snapshot,
            "deleteSnapshot": self._delete_snapshot, "revertSnapshot": self._revert_snapshot,
            "attachVolume": lambda a: self._attach(a, attach),
            "detachVolume": lambda a: self._detach(a, detach),
            "createVolume": lambda a: self._create_volume(a, create),
            "listVirtualMachines": self._list_virtual_machines, "listAccounts": self._list_accounts}

    # -- helpers --------------------------------------------------------------------------------

    def _vm(self, vm_id: str) -> dict[str, Any]:
        vm = self.sim.vms.get(vm_id)
        if vm is None:
            raise ApiError(431, f"Unable to find virtual machine with id {vm_id}")
        return vm

    def _attached(self, vm_id: str) -> list[Volume]:
        return sorted((v for v in self.sim.volumes.values() if v.vm_id == vm_id),
                      key=lambda v: v.device_id or 0)

    def _root(self, vm_id: str) -> Volume | None:
        return next((v for v in self._attached(vm_id) if v.type == "ROOT"), None)

    def _require_state(self, vm: dict[str, Any], *states: str, action: str) -> None:
        if vm["state"] not in states:
            raise ApiError(431, f"Unable to {action} VM {vm['name']}: it is in state {vm['state']}, "
                                f"expected {' or '.join(states)}")

    def _vm_json(self, vm: dict[str, Any]) -> dict[str, Any]:
        body = {k: v for k, v in vm.items() if not k.startswith("_")}
        if vm["id"] in self.nics:
            body["nic"] = list(self.nics[vm["id"]])
        return body

    def _submit_vm(self, vm_id: str, work: Callable[[], dict[str, Any]], **extra: Any) -> _Submit:
        # CloudStack serialises the work on one VM (its VmWork job queue): the simulator's per-VM
        # queue runs the job in its turn.
        return _Submit(vm_id, work, extra, vm_id=vm_id)

    # -- reads ----------------------------------------------------------------------------------

    def _list_capabilities(self, args: _Args) -> dict[str, Any]:
        return {"capability": {"cloudstackversion": self.version, "kvmsnapshotenabled":
                               self.kvm_snapshot_enabled, "supportELB": "false", "apilimitinterval": 1}}

    def _list_accounts(self, args: _Args) -> dict[str, Any]:
        """The one account with its volume and primary storage limits as CloudStack reports them
        (numbers as strings; what createVolume's limit check counts). Preflight reads it."""
        sim = self.sim
        used_gb = sum(v.size for v in sim.volumes.values()) // GIB
        row = {"id": ACCOUNT_ID, "name": "admin", "domainid": DOMAIN_ID, "accounttype": 1,
               "volumelimit": str(sim.max_volumes), "volumetotal": len(sim.volumes),
               "volumeavailable": str(max(sim.max_volumes - len(sim.volumes), 0)),
               "primarystoragelimit": str(sim.max_primary_gb), "primarystoragetotal": used_gb,
               "primarystorageavailable": str(max(sim.max_primary_gb - used_gb, 0))}
        return page(args, "account", filtered(args, [row], "id", "name"))

    def _list_templates(self, args: _Args) -> dict[str, Any]:
        args.required("templatefilter")
        return listing(args, "template", self.templates, "id", "name", "zoneid")

    def _list_service_offerings(self, args: _Args) -> dict[str, Any]:
        return listing(args, "serviceoffering", self.service_offerings, "id", "name")

    def _list_networks(self, args: _Args) -> dict[str, Any]:
        rows = [{k: v for k, v in n.items() if not k.startswith("_")} for n in self.networks.values()]
        return listing(args, "network", self.networks, "id", "name", "zoneid", rows=rows)

    def _list_nics(self, args: _Args) -> dict[str, Any]:
        vm = args.entity(self.sim.vms, "virtualmachineid")
        return page(args, "nic", list(self.nics.get(vm["id"], [])))

    def _list_snapshots(self, args: _Args) -> dict[str, Any]:
        rows = [self.snapshot_json(s) for s in self.snapshots.values()]
        return listing(args, "snapshot", self.snapshots, "id", "volumeid", "name", rows=rows)

    def _list_virtual_machines(self, args: _Args) -> dict[str, Any]:
        rows = [self._vm_json(v) for v in self.sim.vms.values()]
        return listing(args, "virtualmachine", self.sim.vms, "id", "name", "zoneid", "state", rows=rows)

    # -- deploy ---------------------------------------------------------------------------------

    def _nic_specs(self, args: _Args) -> list[dict[str, Any]]:
        """`networkids` (order = NIC order) or `iptonetworklist[n].networkid/ip/mac`, never both."""
        indexed: dict[int, dict[str, str]] = {}
        for name, value in args.values.items():
            m = IP_TO_NETWORK.match(name)
            if m:
                indexed.setdefault(int(m.group(1)), {})[m.group(2)] = value
        ids = args.get("networkids")
        if ids and indexed:
            raise ApiError(431, "networkIds can't be specified along with ipToNetworkMap")
        if indexed:
            specs = [indexed[i] for i in sorted(indexed)]
        elif ids:
            specs = [{"networkid": n} for n in ids.split(",") if n]
        else:
            raise ApiError(431, "Can't deploy a VM in an Advanced zone without a network: "
                                "specify networkids or iptonetworklist")
        if args.get("macaddress"):
            specs[0].setdefault("mac", args.get("macaddress"))
        for spec in specs:
            if spec.get("networkid") not in self.networks:
                raise ApiError(431, f"Unable to find network by id {spec.get('networkid')}", 9999)
            mac = spec.get("mac")
            if mac is not None:
                if not MAC.match(mac.lower()):
                    raise ApiError(431, f"Mac address is not valid: {mac}")
                spec["mac"] = mac.lower()
                if self._mac_in_use(spec["networkid"], spec["mac"]) or \
                        sum(s.get("mac") == spec["mac"] for s in specs) > 1:
                    raise ApiError(431, f"Mac address {mac} is already in use on network "
                                        f"{self.networks[spec['networkid']]['name']}")
        return specs

    def _mac_in_use(self, network_id: str, mac: str) -> bool:
        return any(n["networkid"] == network_id and n["macaddress"] == mac
                   for nics in self.nics.values() for n in nics)

    def _new_mac(self) -> str:
        used = {n["macaddress"] for nics in self.nics.values() for n in nics}
        while True:
            mac = "02:00:" + ":".join(_uuid()[i:i + 2] for i in (0, 2, 4, 6))
            if mac not in used:
                return mac

    def _nic(self, spec: dict[str, Any], index: int, vm_id: str) -> dict[str, Any]:
        net = self.networks[spec["networkid"]]
        ip = spec.get("ip")
        if ip is None:
            ip = net["cidr"].rsplit(".", 1)[0] + f".{net['_next_ip']}"
            net["_next_ip"] += 1
        return {"id": _uuid(), "networkid": net["id"], "networkname": net["name"], "ipaddress": ip,
                "macaddress": spec.get("mac") or self._new_mac(), "isdefault": index == 0,
                "deviceid": str(index), "type": net["type"], "traffictype": "Guest",
                "virtualmachineid": vm_id}

    def _deploy(self, args: _Args) -> _Submit:
        zone = args.entity(self.sim.zones, "zoneid")
        offering = args.entity(self.service_offerings, "serviceofferingid")
        template = args.entity(self.templates, "templateid")
        name = args.get("name") or f"VM-{_uuid()}"
        if not HOSTNAME.match(name):
            raise ApiError(431, f"Invalid name. Vm name can contain ASCII letters 'a' through 'z', the "
                                f"digits '0' through '9', and the hyphen ('-'), must be between 1 and 63 "
                                f"characters long, and can't start or end with \"-\" and can't start "
                                f"with digit: {name}")
        if any(v["name"].lower() == name.lower() for v in self.sim.vms.values()):
            raise ApiError(431, f"The vm with hostName {name} already exists in the network domain")
        specs = self._nic_specs(args)
        boottype = args.get("boottype")
        if boottype is not None and boottype not in ("BIOS", "UEFI"):
            raise ApiError(431, f"Invalid boottype: {boottype}, expected BIOS or UEFI")
        self.sim._check_limits(template["size"])
        start = (args.get("startvm") or "true").lower() != "false"
        vm_id = _uuid()
        vm = {"id": vm_id, "name": name, "displayname": args.get("displayname") or name,
              "state": STOPPED, "zoneid": zone["id"], "zonename": zone["name"],
              "hypervisor": "KVM", "account": "admin", "domainid": DOMAIN_ID, "domain": "ROOT",
              "cpunumber": offering["cpunumber"], "memory": offering["memory"],
              "serviceofferingid": offering["id"], "serviceofferingname": offering["name"],
              "templateid": template["id"], "templatename": template["name"],
              "boottype": boottype or "BIOS", "created": format_date(_now())}
        self.sim.vms[vm_id] = vm
        self.nics[vm_id] = [self._nic(s, i, vm_id) for i, s in enumerate(specs)]
        root = Volume(_uuid(), f"ROOT-{name}", template["size"], None, type="ROOT",
                      vm_id=vm_id, device_id=0, attached=_now())
        self.sim.volumes[root.id] = root

        def work() -> dict[str, Any]:
            if start:
                self._boot(vm)
            return {"virtualmachine": self._vm_json(vm)}
        return self._submit_vm(vm_id, work, id=vm_id)

    def _boot(self, vm: dict[str, Any]) -> None:
        if self._root(vm["id"]) is None:
            vm["state"] = STOPPED
            raise ApiError(530, f"Unable to start VM {vm['name']}: it has no ROOT volume")
        for volume in self._attached(vm["id"]):
            volume.state = "Ready"  # storage is allocated at first start
        vm["state"] = RUNNING

    # -- power ----------------------------------------------------------------------------------

    def _start(self, args: _Args) -> _Submit:
        vm = args.entity(self.sim.vms, "id")
        self._require_state(vm, STOPPED, action="start")
        if self._root(vm["id"]) is None:
            raise ApiError(431, f"Unable to start VM {vm['name']}: it has no ROOT volume")

        def work() -> dict[str, Any]:
            self._boot(vm)
            return {"virtualmachine": self._vm_json(vm)}
        return self._submit_vm(vm["id"], work)

    def _stop(self, args: _Args) -> _Submit:
        vm = args.entity(self.sim.vms, "id")
        self._require_state(vm, RUNNING, STOPPED, action="stop")

        def work() -> dict[str, Any]:
            vm["state"] = STOPPED
            return {"virtualmachine": self._vm_json(vm)}
        return self._submit_vm(vm["id"], work)

    def _destroy(self, args: _Args) -> _Submit:
        vm = args.entity(self.sim.vms, "id")
        self._require_state(vm, RUNNING, STOPPED, action="destroy")
        expunge = (args.get("expunge") or "false").lower() == "true"
        listed = [v for v in (args.get("volumeids") or "").split(",") if v]
        for volume_id in listed:
            volume = self.sim.volumes.get(volume_id)
            if volume is None or volume.vm_id != vm["id"] or volume.type != "DATADISK":
                raise ApiError(431, f"Please specify volumes that belong to the VM {vm['name']} and "
                                    f"are data disks: {volume_id}")

        def work() -> dict[str, Any]:
            for volume in self._attached(vm["id"]):
                # The ROOT goes with the VM, listed data disks are deleted, the others detached.
                self.sim._unplug(volume, destroy=volume.type == "ROOT" or volume.id in listed)
                if volume.type == "ROOT" or volume.id in listed:
                    del self.sim.volumes[volume.id]
                else:
                    volume.vm_id = volume.device_id = volume.attached = None
            vm["state"] = DESTROYED
            if expunge:
                self._remove(vm)
            return {"virtualmachine": self._vm_json(vm)}
        return self._submit_vm(vm["id"], work)

    def _expunge(self, args: _Args) -> _Submit:
        vm = args.entity(self.sim.vms, "id")
        self._require_state(vm, DESTROYED, action="expunge")

        def work() -> dict[str, Any]:
            self._remove(vm)
            return {"success": True}
        return self._submit_vm(vm["id"], work)

    def _remove(self, vm: dict[str, Any]) -> None:
        self.sim.vms.pop(vm["id"], None)
        self.nics.pop(vm["id"], None)

    # -- volumes: the rules failover meets -------------------------------------------------------

    def _attach(self, args: _Args, data_attach: Callable[[_Args], _Submit]) -> _Submit:
        volume: Volume = args.entity(self.sim.volumes, "id")
        vm = args.entity(self.sim.vms, "virtualmachineid")
        self._require_state(vm, RUNNING, STOPPED, action="attach a volume to")
        if args.integer("deviceid") != 0:
            submitted = data_attach(args)  # the simulator's data-disk rules (deviceids, the cap)
            return self._submit_vm(vm["id"], submitted.work, **submitted.extra)

        def work() -> dict[str, Any]:
            current = self.sim._existing(volume.id)
            if vm["state"] != STOPPED:
                raise ApiError(431, "Root volume attach is only allowed when the VM is Stopped")
            if self._root(vm["id"]) is not None:
                raise ApiError(431, "Vm already has root volume attached to it")
            if current.vm_id is not None:
                raise ApiError(431, "Please specify a volume that is not attached to any VM.")
            if current.state not in ("Allocated", "Ready"):
                raise ApiError(431, "Volume state must be in Allocated, Ready or in Uploaded state")
            current.type, current.device_id, current.vm_id, current.attached = "ROOT", 0, vm["id"], _now()
            return {"volume": self.sim.volume_json(current)}
        return self._submit_vm(vm["id"], work)

    def _detach(self, args: _Args, data_detach: Callable[[_Args], _Submit]) -> _Submit:
        volume: Volume = args.entity(self.sim.volumes, "id")
        vm = self.sim.vms.get(volume.vm_id or "")
        if vm is None or vm["id"] == self.sim_oma_vm_id():
            return data_detach(args)  # the appliance's own data disks: unchanged rules
        self._require_state(vm, RUNNING, STOPPED, action="detach a volume from")
        if volume.type != "ROOT":
            submitted = data_detach(args)
            return self._submit_vm(vm["id"], submitted.work, **submitted.extra)

        def work() -> dict[str, Any]:
            current = self.sim._existing(volume.id)
            if vm["state"] != STOPPED:
                raise ApiError(431, "Root volume detach is only allowed when the VM is Stopped")
            if current.vm_id != vm["id"]:
                raise ApiError(431, "The specified volume is not attached to a VM.")
            self.sim._unplug(current)
            current.type = "DATADISK"  # VolumeDaoImpl.detachVolume
            current.vm_id = current.device_id = current.attached = None
            return {"volume": self.sim.volume_json(current)}
        return self._submit_vm(vm["id"], work)

    def sim_oma_vm_id(self) -> str:
        return next(iter(self.sim.vms))  # the appliance VM is the first the simulator knows

    def _create_volume(self, args: _Args, plain_create: Callable[[_Args], _Submit]) -> _Submit:
        snapshot_id = args.get("snapshotid")
        if snapshot_id is None:
            return plain_create(args)
        snapshot: Snapshot = args.entity(self.snapshots, "snapshotid")
        if snapshot.state != "BackedUp":
            raise ApiError(431, f"Snapshot {snapshot.id} is not in BackedUp state yet and can't be "
                                "used for volume creation")
        self.sim._check_limits(snapshot.size)
        volume = Volume(_uuid(), args.get("name") or f"volume-{_uuid()[:8]}", snapshot.size, None)
        self.sim.volumes[volume.id] = volume

        def work() -> dict[str, Any]:
            current = self.sim._existing(volume.id)
            if self.sim.device_dir is not None:
                _sparse_copy(self._snapshot_path(snapshot.id), self.sim.backing_path(volume.id),
                             snapshot.size)
            current.state = "Ready"
            return {"volume": self.sim.volume_json(current)}
        return _Submit(volume.id, work, {"id": volume.id})

    # -- snapshots ------------------------------------------------------------------------------

    def _snapshot_path(self, snapshot_id: str) -> Path:
        return self.sim._device_dir() / ".snapshots" / f"{snapshot_id}.img"

    def _create_snapshot(self, args: _Args) -> _Submit:
        volume: Volume = args.entity(self.sim.volumes, "volumeid")
        vm = self.sim.vms.get(volume.vm_id or "")
        if vm is not None and vm["state"] == RUNNING and not self.kvm_snapshot_enabled:
            raise ApiError(431, "KVM Snapshot is not supported for Running VMs. It is disabled by "
                                "default due to a possible volume corruption in certain cases. To "
                                "enable it set global settings kvm.snapshot.enabled to True. See the "
                                "documentation for more details.")
        if volume.state != "Ready":
            raise ApiError(431, f"VolumeId: {volume.id} is not in Ready state but {volume.state}. "
                                "Cannot take snapshot.")
        name = args.get("name") or f"{volume.name}_{_now():%Y%m%d%H%M%S}"
        snap = Snapshot(_uuid(), name, volume.id, volume.name, volume.type, volume.size, state="Creating")
        self.snapshots[snap.id] = snap

        def work() -> dict[str, Any]:
            if self.sim.device_dir is not None:
                _sparse_copy(self.sim.backing_path(volume.id), self._snapshot_path(snap.id), snap.size)
            snap.state = "BackedUp"
            return {"snapshot": self.snapshot_json(snap)}
        return _Submit(snap.id, work, {"id": snap.id})

    def _delete_snapshot(self, args: _Args) -> _Submit:
        snap: Snapshot = args.entity(self.snapshots, "id")

        def work() -> dict[str, Any]:
            if self.snapshots.pop(snap.id, None) is None:
                raise ApiError(431, f"Unable to find snapshot with id {snap.id}")
            if self.sim.device_dir is not None:
                self._snapshot_path(snap.id).unlink(missing_ok=True)
            return {"success": True}
        return _Submit(snap.id, work)

    def _revert_snapshot(self, args: _Args) -> _Submit:
        snap: Snapshot = args.entity(self.snapshots, "id")
        if not self.snapshot_revert_supported:
            raise ApiError(431, "Revert snapshot is not supported on this hypervisor and storage "
                                "combination")
        volume = self.sim._existing(snap.volume_id)
        vm = self.sim.vms.get(volume.vm_id or "")
        if vm is not None and vm["state"] != STOPPED:
            raise ApiError(431, "The VM the specified disk is attached to is not in the right state "
                                "to revert snapshot")

        def work() -> dict[str, Any]:
            if self.sim.device_dir is not None:
                _sparse_copy(self._snapshot_path(snap.id), self.sim.backing_path(volume.id), volume.size)
            return {"snapshot": self.snapshot_json(snap)}
        return _Submit(snap.id, work)

    def snapshot_json(self, snap: Snapshot) -> dict[str, Any]:
        return {"id": snap.id, "name": snap.name, "volumeid": snap.volume_id, "volumename": snap.volume_name,
                "volumetype": snap.volume_type, "state": snap.state, "snapshottype": "MANUAL",
                "intervaltype": "MANUAL", "virtualsize": snap.size, "physicalsize": snap.size,
                "zoneid": DEFAULT_ZONE_ID, "created": format_date(snap.created), "account": "admin",
                "domainid": DOMAIN_ID, "revertable": self.snapshot_revert_supported,
                "locationtype": "PRIMARY"}


def install(sim: Volumes) -> VmLab:
    lab = VmLab(sim)
    sim._handlers.update(lab.handlers())
    sim.async_commands = sim.async_commands | ASYNC_COMMANDS
    return lab
