"""The inventory source `vma`: discovery through the VMA's `POST /api/v1/discover`, for a vCenter
that OMA reaches only through the VMA's tunnel. It answers the VMs in the shape the direct vSphere
source gives (plugins/vsphere/source.py), so the inventory stores the same fields either way: VMs,
disks with their unit numbers and keys, NICs with their MACs. What the VMA does not report
(instance UUID, controllers, CBT flag) stays empty; the VM is then keyed by its moref.
"""
from __future__ import annotations

from typing import Any

from oma.plugins.vma.client import factory as client_factory
from oma.shared.settings import Settings
from oma.shared.vma import DiscoverRequest, PowerRequest, VCenterCredentials, VmaDisk, VmaNetwork, VmaVm, vcenter_address


def _disk(d: VmaDisk) -> dict[str, Any]:
    key = d.id.removeprefix("disk-")
    return {"id": d.id, "key": int(key) if key.isdigit() else None, "label": d.label,
            "unit_number": d.unit_number, "path": d.vmdk_path or d.path, "size_gb": d.size_gb,
            "capacity_bytes": d.capacity_bytes or None, "datastore": d.datastore,
            "thin_provisioned": d.provisioning_type == "thin"}


def _nic(n: VmaNetwork) -> dict[str, Any]:
    return {"network": n.network_name, "mac_address": n.mac_address, "adapter_type": n.adapter_type,
            "connected": n.connected}


def inventory_vm(vm: VmaVm) -> dict[str, Any]:
    return {"id": vm.id, "name": vm.name, "path": vm.path, "datacenter": vm.datacenter,
            "cpus": vm.num_cpu or vm.cpus, "memory_mb": vm.memory_mb, "guest_os_full_name": vm.guest_os,
            "power_state": vm.power_state, "disks": [_disk(d) for d in vm.disks],
            "nics": [_nic(n) for n in vm.networks]}


class VmaSource:
    """Discovers one vCenter through one VMA, and powers its VMs (failover's cutover and rollback)
    through the VMA's power routes. `connection`: host, port, username, password, datacenter and the
    VMA's `api_url`."""

    def __init__(self, connection: dict[str, Any], settings: Settings | None = None):
        self.connection = connection
        self._client = lambda: client_factory(connection.get("api_url"), settings)

    def _credentials(self) -> dict[str, Any]:
        c = self.connection
        return {"vcenter": vcenter_address(c["host"], c.get("port")), "username": c["username"],
                "password": c["password"]}

    def _request(self) -> DiscoverRequest:
        return DiscoverRequest(**self._credentials(), datacenter=self.connection.get("datacenter"))

    async def discover(self) -> list[dict[str, Any]]:
        async with self._client() as client:
            found = await client.discover(self._request())
        return sorted((inventory_vm(vm) for vm in found.vms), key=lambda vm: vm["path"])

    async def test(self) -> dict[str, Any]:
        async with self._client() as client:
            found = await client.discover(self._request())
        return {"api_version": None, "vm_count": len(found.vms), "about": f"through the VMA at {client.base_url}"}

    async def power(self, vm_id: str, on: bool | None, shutdown_timeout: float = 120.0) -> dict[str, Any]:
        """As the vSphere source's `power` (failover's cutover and rollback), through the VMA's power
        routes: a guest shutdown, forced after `shutdown_timeout`; None only reads the state."""
        async with self._client() as client:
            if on is None:
                state = await client.power_state(vm_id, VCenterCredentials(**self._credentials()))
                return {"vm_id": vm_id, "previous_state": state.power_state, "power_state": state.power_state,
                        "method": "none"}
            request = PowerRequest(**self._credentials(), vm_id=vm_id,
                                   timeout=max(1, min(3600, round(shutdown_timeout))))
            done = await (client.power_on(request) if on else client.power_off(request))
        method = "none" if done.previous_state == done.new_state else \
            "power_on" if on else {"graceful": "guest_shutdown"}.get(done.shutdown_method or "", "power_off")
        return {"vm_id": vm_id, "previous_state": done.previous_state, "power_state": done.new_state,
                "method": method}


def factory(connection: dict[str, Any], settings: Any = None) -> VmaSource:
    return VmaSource(connection, settings)
