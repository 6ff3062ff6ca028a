"""A built-in synthetic vCenter for the VMA simulator: a dozen VMs of different shapes (one to eight
disks on SCSI and SATA controllers, one to three NICs, Linux and Windows guests), answered in the
vSphere source's shape (plugins/vsphere/source.py), with power state kept in memory.

`oma-api -demo` runs the VMA simulator on it (`VmaSimulator(..., inventory=SyntheticInventory(pw))`,
docs/demo.md). It accepts one user name and password, as a vCenter would.
"""
from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass
from typing import Any

from oma.plugins.vsphere.source import VCenterAuthError
from oma.shared.errors import NotFound
from oma.shared.vma import VCenterCredentials

GIB = 1 << 30
HOST = "vcenter.demo.local"
USERNAME = "administrator@vsphere.local"
DATACENTER = "DemoDC"
NETWORKS = ("VM Network", "App Network", "Storage Network")
SCSI_KEY, SATA_KEY = 2000, 16000  # vSphere's first disk keys on a SCSI and a SATA controller

LINUX = ("ubuntu64Guest", "Ubuntu Linux (64-bit)")
RHEL = ("rhel9_64Guest", "Red Hat Enterprise Linux 9 (64-bit)")
DEBIAN = ("debian12_64Guest", "Debian GNU/Linux 12 (64-bit)")
WIN2019 = ("windows2019srv_64Guest", "Microsoft Windows Server 2019 (64-bit)")
WIN2022 = ("windows2019srvNext_64Guest", "Microsoft Windows Server 2022 (64-bit)")


@dataclass(frozen=True)
class Shape:
    name: str
    guest: tuple[str, str]
    cpus: int
    memory_mb: int
    disks: tuple[tuple[str, int], ...]  # (controller, GiB) in unit order
    nics: int = 1
    powered_on: bool = True
    firmware: str = "bios"


# One to eight disks, SCSI and SATA, one to three NICs, Linux and Windows. Units are numbered across
# a VM's controllers (the VMA's discover reports no controller, so a unit number names one disk).
SHAPES = (
    Shape("web01", LINUX, 1, 1024, (("scsi", 8),)),
    Shape("web02", LINUX, 1, 1024, (("scsi", 8),)),
    Shape("db01", RHEL, 2, 4096, (("scsi", 16), ("scsi", 32), ("scsi", 32)), nics=2),
    Shape("app01", WIN2019, 2, 4096, (("scsi", 40), ("sata", 10)), nics=2, firmware="efi"),
    Shape("fs01", WIN2022, 4, 8192, (("scsi", 40),) + (("scsi", 20),) * 5 + (("sata", 10),) * 2, nics=2,
          firmware="efi"),
    Shape("mail01", DEBIAN, 2, 2048, (("sata", 12), ("sata", 24))),
    Shape("dc01", WIN2022, 2, 4096, (("scsi", 40),), firmware="efi"),
    Shape("k8s-node1", LINUX, 4, 8192, (("scsi", 20), ("scsi", 50)), nics=3),
    Shape("k8s-node2", LINUX, 4, 8192, (("scsi", 20), ("scsi", 50)), nics=3),
    Shape("k8s-node3", LINUX, 4, 8192, (("scsi", 20), ("scsi", 50)), nics=3),
    Shape("backup01", RHEL, 2, 4096, (("scsi", 16), ("sata", 64), ("sata", 64), ("sata", 64)), nics=2,
          powered_on=False),
    Shape("legacy-erp", WIN2019, 1, 1024, (("sata", 30), ("sata", 20)), powered_on=False),
)


def _vm(index: int, shape: Shape) -> dict[str, Any]:
    moref = f"vm-{101 + index}"
    instance = str(uuid.uuid5(uuid.NAMESPACE_DNS, f"{shape.name}.{HOST}"))
    disks = []
    for unit, (controller, gib) in enumerate(shape.disks):
        key = (SCSI_KEY if controller == "scsi" else SATA_KEY) + unit
        folder = f"[datastore{1 + index % 2}] {shape.name}"
        disks.append({
            "id": f"disk-{key}", "key": key, "label": f"Hard disk {unit + 1}", "unit_number": unit,
            "controller_key": 1000 if controller == "scsi" else 15000, "controller_bus_number": 0,
            "controller_type": controller,
            "controller_class": "VirtualLsiLogicSASController" if controller == "scsi" else "VirtualAHCIController",
            "path": f"{folder}/{shape.name}{'' if unit == 0 else f'_{unit}'}.vmdk",
            "size_gb": math.ceil(gib), "capacity_bytes": gib * GIB, "datastore": f"datastore{1 + index % 2}",
            "thin_provisioned": True, "backing": "VirtualDiskFlatVer2BackingInfo", "change_id": None})
    nics = [{"key": 4000 + n, "network": NETWORKS[n], "mac_address": f"00:50:56:9d:{index:02x}:{n + 1:02x}",
             "adapter_type": "vmxnet3" if n == 0 else "e1000e", "connected": True} for n in range(shape.nics)]
    return {
        "id": moref, "uuid": instance, "bios_uuid": str(uuid.uuid5(uuid.NAMESPACE_URL, instance)),
        "name": shape.name, "path": f"/{DATACENTER}/vm/{shape.name}", "datacenter": DATACENTER,
        "cluster": "DemoCluster", "host": f"esx{1 + index % 3:02d}.demo.local", "cpus": shape.cpus,
        "memory_mb": shape.memory_mb, "guest_os": shape.guest[0], "guest_os_full_name": shape.guest[1],
        "power_state": "poweredOn" if shape.powered_on else "poweredOff", "cbt_enabled": True,
        "firmware": shape.firmware, "template": False, "disks": disks, "nics": nics}


class SyntheticInventory:
    """The VMs of the demo vCenter; the VMA simulator asks `session(credentials)` per request."""

    def __init__(self, password: str, username: str = USERNAME, host: str = HOST):
        self.host, self.username, self.password = host, username, password
        self.vms = [_vm(i, shape) for i, shape in enumerate(SHAPES)]

    def session(self, creds: VCenterCredentials, datacenter: str | None = None) -> SyntheticVCenter:
        address = creds.vcenter.rsplit(":", 1)[0] if creds.vcenter.endswith(":443") else creds.vcenter
        if address != self.host or creds.username != self.username \
                or creds.password.get_secret_value() != self.password:
            raise VCenterAuthError(details=f"vCenter {creds.vcenter} rejected the login of user {creds.username!r}")
        return SyntheticVCenter(self, datacenter)

    def find(self, vm_id: str) -> dict[str, Any]:
        """By moref (vm-101), instance UUID or inventory path, as the simulator's vCenter lookup."""
        for vm in self.vms:
            if vm_id in (vm["id"], vm["uuid"], vm["path"], "/" + vm_id.lstrip("/")):
                return vm
        raise NotFound("VM not found", f"vCenter has no VM {vm_id!r} (give a moref id, instance UUID or path)")


class SyntheticVCenter:
    """What the VMA simulator calls on a vCenter (plugins/vma/simulator.py `VCenter`)."""

    def __init__(self, inventory: SyntheticInventory, datacenter: str | None):
        self.inventory, self.datacenter = inventory, datacenter

    async def discover(self) -> list[dict[str, Any]]:
        if self.datacenter and self.datacenter != DATACENTER:
            raise NotFound("Datacenter not found", f"vCenter has no datacenter {self.datacenter!r} "
                                                   f"(datacenters: {DATACENTER})")
        return [{**vm, "disks": [dict(d) for d in vm["disks"]], "nics": [dict(n) for n in vm["nics"]]}
                for vm in self.inventory.vms]

    async def state(self, vm_id: str) -> dict[str, Any]:
        vm = self.inventory.find(vm_id)
        on = vm["power_state"] == "poweredOn"
        return {"power_state": vm["power_state"], "tools_status": "guestToolsRunning" if on else "guestToolsNotRunning",
                "uptime_seconds": 3600 if on else None}

    async def power(self, vm_id: str, on: bool, *, force: bool, timeout: int) -> dict[str, Any]:
        vm = self.inventory.find(vm_id)
        started, before = time.monotonic(), vm["power_state"]
        wanted = "poweredOn" if on else "poweredOff"
        vm["power_state"] = wanted
        method = None if on or before == wanted else "forced" if force else "graceful"
        return {"previous_state": before, "new_state": wanted, "shutdown_method": method,
                "tools_status": "guestToolsRunning" if on else "guestToolsNotRunning",
                "duration_seconds": round(time.monotonic() - started, 3),
                "message": f"already {wanted}" if before == wanted else None}
