"""A CloudStack API simulator faithful to what the OMA depends on (shared/reference/cloudstack.md).

It verifies signatures exactly, keeps CloudStack's envelope and error rules, runs async jobs
with a controllable lifetime, models volumes (states, deviceids skipping 3, the data-disk cap,
custom-size offerings, account limits) and offers fault injection, in the spirit of
CloudStack's own `configureSimulator`. Like CloudStack, it runs the work of each VM (attach,
detach) one job at a time, VMs in parallel, and reproduces what that allows: a straggler detach
that clears a newer attach elsewhere (apache/cloudstack #14214), recorded as a hazard. With
`device_dir`, a volume attached to the OMA VM also appears as a `virtio-<serial>` symlink to a
sparse file, standing in for /dev/disk/by-id.

    python -m oma.plugins.ossea.simulator --port 8080 --api-key K --secret-key S   # prints its URL

The parts, one module each: sim_common (ids, errors, parameters, list envelope), sim_http (the
signed API and the /sim/ control endpoint), sim_jobs (async jobs, VM work queues), sim_faults
(fault injection, hazards), sim_volumes (volumes, devices), sim_vms (VMs, snapshots, networks).
This module puts them together and holds the command line.
"""
from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import Any

from oma.plugins.device import disk_serial  # noqa: F401
from oma.plugins.simserve import serve_until_signalled
from oma.shared.schemas import GIB

from . import sim_vms
from .sim_common import (  # noqa: F401  (re-exported: tests and benchmarks import them from here)
    ACCOUNT_ID,
    CUSTOM_OFFERING_ID,
    DEFAULT_VM_ID,
    DEFAULT_ZONE_ID,
    DEFAULT_ZONE_NAME,
    DOMAIN_ID,
    FIXED_OFFERING_ID,
    ApiError,
    _Args,
    _uuid,
    listing,
)
from .sim_faults import Faults
from .sim_http import API_PATH, AUTH_ERROR, HttpApi  # noqa: F401
from .sim_jobs import Handler, Jobs
from .sim_volumes import (  # noqa: F401
    ASYNC_COMMANDS,
    NOT_ATTACHED_TEXT,
    STRAGGLER_DETACH,
    Volume,
    Volumes,
    data_disk_limit_text,
    pci_slots_text,
)


def _vm_row(vm_id: str, name: str, zone_name: str) -> dict[str, Any]:
    return {"id": vm_id, "name": name, "displayname": name, "state": "Running",
            "zoneid": DEFAULT_ZONE_ID, "zonename": zone_name, "hypervisor": "KVM",
            "account": "admin", "domainid": DOMAIN_ID, "domain": "ROOT",
            "cpunumber": 4, "memory": 8192, "serviceofferingname": "Large Instance"}


class CloudStackSimulator(HttpApi, Jobs, Faults, Volumes):
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
        self._init_faults()
        self._init_jobs()
        self._init_http()
        self._handlers: dict[str, Handler] = {
            "listZones": self._list_zones, "listVirtualMachines": self._list_virtual_machines,
            "listDiskOfferings": self._list_disk_offerings, "listVolumes": self._list_volumes,
            "createVolume": self._create_volume, "attachVolume": self._attach_volume,
            "detachVolume": self._detach_volume, "deleteVolume": self._delete_volume,
            "queryAsyncJobResult": self._query_async_job_result}
        self.async_commands = ASYNC_COMMANDS
        self.lab = sim_vms.install(self)  # the VM lifecycle (failover)
        self.pre_attach(pre_attached)

    def add_vm(self, name: str, vm_id: str | None = None) -> str:
        """Another running KVM VM in the zone (a failover target, a second appliance)."""
        vm_id = vm_id or _uuid()
        self.vms[vm_id] = _vm_row(vm_id, name, self.zones[DEFAULT_ZONE_ID]["name"])
        return vm_id

    def _list_zones(self, args: _Args) -> dict[str, Any]:
        return listing(args, "zone", self.zones, "id", "name")

    def _list_virtual_machines(self, args: _Args) -> dict[str, Any]:
        return listing(args, "virtualmachine", self.vms, "id", "name", "zoneid", "state")


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
