"""vSphere inventory source: reads VMs, disks and NICs from vCenter through pyvmomi.

pyvmomi is blocking, so every call runs in a worker thread (`asyncio.to_thread`).
Discovery makes one PropertyCollector pass per object type (a ContainerView, then
`RetrievePropertiesEx` + `ContinueRetrievePropertiesEx`, 500 objects a page) and resolves
inventory paths, datacenters, clusters, hosts, datastores and networks locally: there is no
round trip per VM. See docs/vsphere.md for the fields and the quirks handled.
"""
from __future__ import annotations

import asyncio
import http.client
import logging
import math
import socket
import ssl
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, TypeVar

from pyVim.connect import Disconnect, SmartConnect
from pyVim.task import WaitForTask
from pyVmomi import vim, vmodl

from oma.shared.contracts import SourceAuthError, SourceError, SourceUnreachable
from oma.shared.errors import NotFound
from oma.shared.schemas import GIB

log = logging.getLogger("oma.vsphere")

T = TypeVar("T")

PAGE_SIZE = 500

# Properties that vCenter (and vcsim) always set. vcsim 0.24.2 drops the connection when a
# client fetches an unset property, so nothing optional (snapshot, parentVApp...) is read here:
# the snapshots are counted from `layoutEx.snapshot`, set (maybe empty) on every VM.
VM_PROPERTIES = (
    "name", "parent",
    "config.instanceUuid", "config.uuid",
    "config.hardware.numCPU", "config.hardware.memoryMB", "config.hardware.device",
    "config.guestId", "config.guestFullName", "config.firmware",
    "config.changeTrackingEnabled", "config.template",
    "runtime.powerState", "runtime.host", "layoutEx.snapshot",
)
ENTITY_PROPERTIES = ("name", "parent")


class VCenterError(SourceError):
    """vCenter answered with a fault the OMA cannot act on."""
    error = "vCenter error"


class VCenterAuthError(VCenterError, SourceAuthError):
    """vCenter rejected the user name or password."""
    error = "vCenter authentication failed"


class VCenterUnreachable(VCenterError, SourceUnreachable):
    """vCenter could not be reached: refused, unresolvable, TLS failure or timeout."""
    error = "vCenter unreachable"


@dataclass
class VCenterConnection:
    """Where and how to log in to a vCenter. The password never appears in repr()."""
    host: str
    port: int = 443
    username: str = ""
    password: str = field(default="", repr=False)
    datacenter: str | None = None
    verify_tls: bool = True

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


class VSphereSource:
    """An inventory source backed by one vCenter (implements the `InventorySource` protocol)."""

    name = "vsphere"

    def __init__(self, connection: VCenterConnection, *, timeout: float = 60.0):
        self.connection = connection
        self.timeout = timeout

    def __repr__(self) -> str:
        return f"VSphereSource({self.connection!r}, timeout={self.timeout})"

    async def test(self) -> dict[str, Any]:
        """Log in and count the VMs: `{"api_version", "vm_count", "about"}`."""
        return await self._run(self._test)

    async def discover(self) -> list[dict[str, Any]]:
        """Every VM (of `connection.datacenter` when set) with its disks and NICs."""
        return await self._run(self._discover)

    async def power(self, vm_id: str, on: bool | None, shutdown_timeout: float = 120.0) -> dict[str, Any]:
        """Power a VM (moref) on, or off: a guest shutdown first, a hard power-off after
        `shutdown_timeout` or when the guest cannot shut down; None only reads the state.
        Returns the state before and after."""
        return await self._run(lambda si: self._power(si, vm_id, on, shutdown_timeout))

    # -- plumbing -------------------------------------------------------------------------

    async def _run(self, work: Callable[[vim.ServiceInstance], T]) -> T:
        # The login is bounded as a whole (pyvmomi's version probe has no socket timeout);
        # later calls are bounded per socket operation by httpConnectionTimeout.
        try:
            si = await asyncio.wait_for(asyncio.to_thread(self._guard, self._connect), self.timeout)
        except asyncio.TimeoutError:
            raise VCenterUnreachable(
                details=f"no answer from vCenter {self.connection.address} "
                        f"within {self.timeout:g} s while logging in") from None
        try:
            return await asyncio.to_thread(self._guard, work, si)
        finally:
            await asyncio.to_thread(_disconnect, si)

    def _connect(self) -> vim.ServiceInstance:
        c = self.connection
        started = time.monotonic()
        log.debug("connecting to vCenter %s as %r (verify_tls=%s)", c.address, c.username, c.verify_tls)
        # A plain TCP probe first: refused or unroutable hosts fail fast and clearly.
        try:
            socket.create_connection((c.host, c.port), timeout=self.timeout).close()
        except OSError as exc:
            raise self._unreachable(exc) from None
        if c.verify_tls:
            # pyvmomi silently skips verification for localhost without an explicit context.
            tls = {"sslContext": ssl.create_default_context()}
        else:
            tls = {"disableSslCertValidation": True}
        si = self._guard(lambda: SmartConnect(
            host=c.host, port=c.port, user=c.username, pwd=c.password,
            httpConnectionTimeout=self.timeout, **tls))
        about = si.content.about
        log.info("connected to vCenter %s (%s, API %s) in %.2f s",
                 c.address, about.fullName, about.apiVersion, time.monotonic() - started)
        return si

    def _guard(self, fn: Callable[..., T], *args: Any) -> T:
        """Call fn, turning pyvmomi and socket failures into the OMA error family."""
        try:
            return fn(*args)
        except (VCenterError, NotFound):
            raise
        except vim.fault.InvalidLogin:
            raise VCenterAuthError(
                details=f"vCenter {self.connection.address} rejected the login of user "
                        f"{self.connection.username!r}: check the user name and password") from None
        except (vim.fault.NotAuthenticated, vim.fault.NoPermission) as exc:
            raise VCenterAuthError(
                details=f"user {self.connection.username!r} may not read the inventory of "
                        f"vCenter {self.connection.address}: {_fault_text(exc)}") from None
        except vmodl.MethodFault as exc:
            raise VCenterError(
                details=f"vCenter {self.connection.address}: {_fault_text(exc)}") from None
        except (OSError, http.client.HTTPException) as exc:  # socket, TLS, dropped connection
            raise self._unreachable(exc) from None
        except Exception as exc:  # the server answered, but not as vCenter does (HTML, bad XML, a proxy)
            log.warning("unexpected answer from vCenter %s", self.connection.address, exc_info=True)
            raise VCenterError(
                details=f"vCenter {self.connection.address} answered unexpectedly ({type(exc).__name__}: "
                        f"{str(exc)[:200]}); is it a vCenter or ESXi SDK endpoint?") from None

    def _unreachable(self, exc: BaseException) -> VCenterUnreachable:
        where = f"vCenter {self.connection.address}"
        if isinstance(exc, ssl.SSLCertVerificationError):
            text = (f"TLS certificate of {where} is not trusted ({exc.verify_message}); "
                    f"install its CA or set verify_tls to false")
        elif isinstance(exc, (socket.timeout, TimeoutError)):
            text = f"{where} did not answer within {self.timeout:g} s"
        elif isinstance(exc, ConnectionRefusedError):
            text = f"{where} refused the connection"
        elif isinstance(exc, socket.gaierror):
            text = f"cannot resolve {self.connection.host!r}: {exc.strerror}"
        elif isinstance(exc, (ConnectionResetError, http.client.RemoteDisconnected)):
            text = f"{where} dropped the connection"
        else:
            text = f"cannot reach {where}: {type(exc).__name__}: {exc}"
        return VCenterUnreachable(details=text)

    # -- work in the thread ---------------------------------------------------------------

    def _test(self, si: vim.ServiceInstance) -> dict[str, Any]:
        content = si.RetrieveContent()
        root = self._root(content)
        view = content.viewManager.CreateContainerView(root, [vim.VirtualMachine], True)
        try:
            count = len(view.view)
        finally:
            view.DestroyView()
        return {"api_version": content.about.apiVersion, "vm_count": count,
                "about": content.about.fullName}

    def _power(self, si: vim.ServiceInstance, vm_id: str, on: bool | None, timeout: float) -> dict[str, Any]:
        vm = vim.VirtualMachine(vm_id, si._stub)
        try:
            before = vm.runtime.powerState
        except vmodl.fault.ManagedObjectNotFound:
            raise NotFound("VM not found", f"vCenter {self.connection.address} has no VM {vm_id!r}") from None
        method = "none"
        if on and before != "poweredOn":
            method = "power_on"
            WaitForTask(vm.PowerOnVM_Task())
        elif on is False and before == "poweredOn":
            method = "guest_shutdown"
            try:
                vm.ShutdownGuest()
            except vmodl.MethodFault:  # no tools, or the guest refuses: straight to the hard way
                method = "power_off"
            deadline = time.monotonic() + timeout
            while method == "guest_shutdown" and vm.runtime.powerState != "poweredOff":
                if time.monotonic() > deadline:
                    method = "power_off_after_timeout"
                    break
                time.sleep(0.5)
            if vm.runtime.powerState != "poweredOff":
                WaitForTask(vm.PowerOffVM_Task())
        return {"vm_id": vm_id, "previous_state": before, "power_state": vm.runtime.powerState, "method": method}

    def _root(self, content: vim.ServiceInstanceContent) -> vim.ManagedEntity:
        """The container to read VMs from: the root folder or the configured datacenter."""
        wanted = self.connection.datacenter
        if not wanted:
            return content.rootFolder
        found = _collect(content, content.rootFolder, vim.Datacenter, ("name",))
        for obj, props in found:
            if props.get("name") == wanted:
                return obj
        names = sorted(p.get("name", "?") for _, p in found)
        raise NotFound("Datacenter not found",
                       f"vCenter {self.connection.address} has no datacenter {wanted!r} "
                       f"(datacenters: {', '.join(names) or 'none'})")

    def _discover(self, si: vim.ServiceInstance) -> list[dict[str, Any]]:
        started = time.monotonic()
        content = si.RetrieveContent()
        root = self._root(content)
        everywhere = content.rootFolder

        entities: dict[str, dict[str, Any]] = {}  # moref id -> {name, parent, kind}
        for kind, vim_type in (("folder", vim.Folder), ("datacenter", vim.Datacenter),
                               ("compute", vim.ComputeResource), ("host", vim.HostSystem)):
            found = _collect(content, everywhere, vim_type, ENTITY_PROPERTIES)
            for obj, props in found:
                entities[obj._moId] = {
                    "name": props.get("name"), "parent": _moid(props.get("parent")),
                    "kind": "cluster" if isinstance(obj, vim.ClusterComputeResource) else kind}
            log.debug("read %d %s objects", len(found), kind)
        datastores = {obj._moId: p.get("name") for obj, p in
                      _collect(content, everywhere, vim.Datastore, ("name",))}
        networks = {obj._moId: p.get("name") for obj, p in
                    _collect(content, everywhere, vim.Network, ("name",))}
        portgroups = {p.get("key"): p.get("name") for _, p in
                      _collect(content, everywhere, vim.dvs.DistributedVirtualPortgroup, ("name", "key"))}
        log.debug("read %d datastores, %d networks, %d distributed portgroups",
                  len(datastores), len(networks), len(portgroups))

        resolver = _Resolver(entities, content.rootFolder._moId, datastores, networks, portgroups)
        found = _collect(content, root, vim.VirtualMachine, VM_PROPERTIES)
        vms, skipped = [], 0
        for obj, props in found:
            if props.get("config.instanceUuid") is None and props.get("config.hardware.device") is None:
                skipped += 1  # inaccessible or orphaned: vCenter has no configuration for it
                log.warning("skipping VM %s (%s): no configuration readable", obj._moId, props.get("name"))
                continue
            vms.append(resolver.vm(obj._moId, props))
        vms.sort(key=lambda vm: vm["path"])
        log.info("discovered %d VMs (%d disks, %d NICs%s) on vCenter %s in %.2f s",
                 len(vms), sum(len(v["disks"]) for v in vms), sum(len(v["nics"]) for v in vms),
                 f", {skipped} skipped" if skipped else "", self.connection.address,
                 time.monotonic() - started)
        return vms


def _collect(content: vim.ServiceInstanceContent, root: vim.ManagedEntity, vim_type: type,
             paths: Iterable[str]) -> list[tuple[Any, dict[str, Any]]]:
    """One PropertyCollector pass: `paths` of every `vim_type` object below `root`."""
    pc = content.propertyCollector
    view = content.viewManager.CreateContainerView(root, [vim_type], True)
    try:
        spec = vmodl.query.PropertyCollector.FilterSpec(
            objectSet=[vmodl.query.PropertyCollector.ObjectSpec(
                obj=view, skip=True,
                selectSet=[vmodl.query.PropertyCollector.TraversalSpec(
                    name="view", path="view", skip=False, type=vim.view.ContainerView)])],
            propSet=[vmodl.query.PropertyCollector.PropertySpec(
                type=vim_type, all=False, pathSet=list(paths))])
        out: list[tuple[Any, dict[str, Any]]] = []
        result = pc.RetrievePropertiesEx([spec], vmodl.query.PropertyCollector.RetrieveOptions(
            maxObjects=PAGE_SIZE))
        while result is not None:
            for oc in result.objects:
                out.append((oc.obj, {p.name: p.val for p in oc.propSet}))
                for missing in oc.missingSet or ():
                    log.debug("%s: property %s missing (%s)", oc.obj._moId, missing.path,
                              type(missing.fault).__name__)
            if not result.token:
                break
            result = pc.ContinueRetrievePropertiesEx(result.token)
        return out
    finally:
        view.DestroyView()


class _Resolver:
    """Turns raw VM properties into the inventory dict, resolving names from local maps."""

    def __init__(self, entities: dict[str, dict[str, Any]], root_id: str,
                 datastores: dict[str, str], networks: dict[str, str], portgroups: dict[str, str]):
        self.entities = entities
        self.root_id = root_id
        self.datastores = datastores
        self.networks = networks
        self.portgroups = portgroups
        self._paths: dict[str, tuple[str, str | None]] = {}

    def _folder_path(self, moid: str | None) -> tuple[str, str | None]:
        """(inventory path, datacenter name) of a folder/datacenter, memoised."""
        if moid is None or moid == self.root_id or moid not in self.entities:
            return "", None
        if moid not in self._paths:
            entity = self.entities[moid]
            path, dc = self._folder_path(entity["parent"])
            if entity["kind"] == "datacenter":
                dc = entity["name"]
            self._paths[moid] = (f"{path}/{entity['name']}", dc)
        return self._paths[moid]

    def vm(self, moid: str, p: dict[str, Any]) -> dict[str, Any]:
        path, datacenter = self._folder_path(_moid(p.get("parent")))
        host_id = _moid(p.get("runtime.host"))
        host = self.entities.get(host_id) if host_id else None
        compute = self.entities.get(host["parent"]) if host else None
        devices = p.get("config.hardware.device") or []
        by_key = {d.key: d for d in devices}
        firmware = p.get("config.firmware") or "bios"
        return {
            "id": moid,
            "uuid": p.get("config.instanceUuid"),
            "bios_uuid": p.get("config.uuid"),
            "name": p.get("name"),
            "path": f"{path}/{p.get('name')}",
            "datacenter": datacenter,
            "cluster": compute["name"] if compute and compute["kind"] == "cluster" else None,
            "host": host["name"] if host else None,
            "cpus": p.get("config.hardware.numCPU"),
            "memory_mb": p.get("config.hardware.memoryMB"),
            "guest_os": p.get("config.guestId"),
            "guest_os_full_name": p.get("config.guestFullName"),
            "power_state": str(p.get("runtime.powerState")) if p.get("runtime.powerState") else None,
            "cbt_enabled": bool(p.get("config.changeTrackingEnabled")),
            # None when vCenter did not return it (unknown), never a guessed 0
            "snapshot_count": len(p["layoutEx.snapshot"] or ()) if "layoutEx.snapshot" in p else None,
            "firmware": "efi" if str(firmware).lower() == "efi" else "bios",
            "template": bool(p.get("config.template")),
            "disks": [self.disk(d, by_key) for d in devices if isinstance(d, vim.vm.device.VirtualDisk)],
            "nics": [self.nic(d) for d in devices if isinstance(d, vim.vm.device.VirtualEthernetCard)],
        }

    def disk(self, d: vim.vm.device.VirtualDisk, by_key: dict[int, Any]) -> dict[str, Any]:
        backing = d.backing
        capacity = d.capacityInBytes or (d.capacityInKB or 0) * 1024
        file_name = getattr(backing, "fileName", None)
        ds_id = _moid(getattr(backing, "datastore", None))
        datastore = self.datastores.get(ds_id) if ds_id else None
        if datastore is None and file_name and file_name.startswith("["):
            datastore = file_name[1:file_name.index("]")] if "]" in file_name else None
        controller = by_key.get(d.controllerKey)
        return {
            "id": f"disk-{d.key}",
            "key": d.key,
            "label": d.deviceInfo.label if d.deviceInfo else None,
            "unit_number": d.unitNumber,
            "controller_key": d.controllerKey,
            "controller_bus_number": getattr(controller, "busNumber", None),
            "controller_type": _controller_type(controller),
            "controller_class": _class_name(controller) if controller else None,
            "path": file_name,
            "size_gb": math.ceil(capacity / GIB),
            "capacity_bytes": capacity,
            "datastore": datastore,
            "thin_provisioned": bool(getattr(backing, "thinProvisioned", False)),
            "backing": _class_name(backing) if backing else None,
            "change_id": getattr(backing, "changeId", None),
        }

    def nic(self, d: vim.vm.device.VirtualEthernetCard) -> dict[str, Any]:
        backing = d.backing
        network = None
        if isinstance(backing, vim.vm.device.VirtualEthernetCard.DistributedVirtualPortBackingInfo):
            key = backing.port.portgroupKey if backing.port else None
            network = self.portgroups.get(key, key)
        elif isinstance(backing, vim.vm.device.VirtualEthernetCard.NetworkBackingInfo):
            net_id = _moid(backing.network)
            network = self.networks.get(net_id) if net_id else None
            network = network or backing.deviceName
        elif isinstance(backing, vim.vm.device.VirtualEthernetCard.OpaqueNetworkBackingInfo):
            network = backing.opaqueNetworkId
        return {
            "key": d.key,
            "network": network,
            "mac_address": d.macAddress,
            "adapter_type": _adapter_type(d),
            "connected": bool(d.connectable.connected) if d.connectable else None,
        }


_CONTROLLER_TYPES = (
    (vim.vm.device.VirtualSCSIController, "scsi"),
    (vim.vm.device.VirtualSATAController, "sata"),  # includes VirtualAHCIController
    (vim.vm.device.VirtualIDEController, "ide"),
)


def _controller_type(controller: Any) -> str | None:
    if controller is None:
        return None
    for cls, name in _CONTROLLER_TYPES:
        if isinstance(controller, cls):
            return name
    nvme = getattr(vim.vm.device, "VirtualNVMEController", None)
    if nvme is not None and isinstance(controller, nvme):
        return "nvme"
    return _class_name(controller)


def _adapter_type(nic: Any) -> str:
    """vmxnet3, e1000, e1000e, pcnet32, vmxnet2, sriov... from the device class."""
    name = _class_name(nic)
    name = name[len("Virtual"):] if name.startswith("Virtual") else name
    return {"SriovEthernetCard": "sriov"}.get(name, name.lower())


def _class_name(obj: Any) -> str:
    """'ParaVirtualSCSIController' for vim.vm.device.ParaVirtualSCSIController."""
    return type(obj).__name__.rsplit(".", 1)[-1]


def _moid(ref: Any) -> str | None:
    return ref._moId if ref is not None else None


def _fault_text(exc: BaseException) -> str:
    return getattr(exc, "msg", None) or type(exc).__name__


def _disconnect(si: vim.ServiceInstance) -> None:
    try:
        Disconnect(si)
    except Exception as exc:  # logging out is best effort; the session expires anyway
        log.debug("logout failed: %s", type(exc).__name__)
