"""The CloudStack simulator's volumes: states, device ids skipping 3, the data-disk cap and the PCI
slots, custom-size offerings, account limits, and a straggler detach that clears a newer attach
elsewhere (apache/cloudstack #14214), recorded as a hazard. With `device_dir`, a volume attached
to the OMA VM also appears as a `virtio-<serial>` symlink to a sparse file, standing in for
/dev/disk/by-id."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from oma.plugins.device import disk_serial  # the OMA VM's /dev/disk/by-id name of a volume
from oma.shared.schemas import GIB

from .signing import format_date
from .sim_common import (
    CUSTOM_OFFERING_ID,
    DEFAULT_ZONE_ID,
    DOMAIN_ID,
    ApiError,
    _Args,
    _now,
    _uuid,
    filtered,
    listing,
    page,
)
from .sim_jobs import _raising, _Submit

MAX_CUSTOM_GB = 1024  # custom.diskoffering.size.max
CDROM_DEVICE_ID = 3
NOT_ATTACHED_TEXT = "Please specify a volume that is not attached to any VM."
STRAGGLER_DETACH = "straggler_detach"  # the hazard kind of apache/cloudstack #14214
ASYNC_COMMANDS = frozenset({"createVolume", "attachVolume", "detachVolume"})


def data_disk_limit_text(limit: int) -> str:
    """VolumeApiServiceImpl.checkNumberOfAttachedVolumes (hypervisor_capabilities.max_data_volumes_limit)."""
    return (f"The specified VM already has the maximum number of data disks ({limit}) attached. "
            "Please specify another VM.")


def pci_slots_text(volume_name: str, vm_name: str) -> str:
    """A KVM hot-plug the guest's PCI bus has no slot for: libvirt's error, as the attach job reports it."""
    return (f"Failed to attach volume {volume_name} to VM {vm_name}; org.libvirt.LibvirtException: "
            "internal error: No more available PCI slots")


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


class Volumes:
    """Mixed into CloudStackSimulator; the volume commands and the OMA VM's devices.

    Attach and detach run as CloudStack does: the API job checks the request at once (and fails
    without queueing), then the VM work job runs on the VM's queue and re-reads the volume."""

    device_dir: Path | None
    max_data_disks: int
    pci_slots: int | None
    max_volumes: int
    max_primary_gb: int
    oma_vm_id: str
    zones: dict[str, dict[str, Any]]
    vms: dict[str, dict[str, Any]]
    offerings: dict[str, dict[str, Any]]
    volumes: dict[str, Volume]
    orphans: dict[str, set[str]]  # vm id -> volumes still in its libvirt domain, not in the DB
    _record_hazard: Callable[..., None]  # from Faults

    # -- set-up (simulator-only; the /sim/ endpoints call it) -----------------------------------

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

    # -- commands -------------------------------------------------------------------------------

    def _list_disk_offerings(self, args: _Args) -> dict[str, Any]:
        return listing(args, "diskoffering", self.offerings, "id", "name")

    def _list_volumes(self, args: _Args) -> dict[str, Any]:
        args.entity(self.volumes, "id", required=False)
        args.entity(self.vms, "virtualmachineid", required=False)
        rows = [self.volume_json(v) for v in self.volumes.values()]
        return page(args, "volume", filtered(
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
