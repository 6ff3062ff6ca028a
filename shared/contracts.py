"""What a plugin must do: the typed contracts services call, and the errors they may raise.

Services import from here, never from `plugins.*`: a backend selected by name (`cloud_backend`,
`inventory_source`, `export_backend`, `device_resolver`) is reached only through these Protocols, and
its failures are told apart only by these error classes (plugins subclass them). shared/vma.py is the
contract of the VMA client. See docs/plugins.md.
"""
from __future__ import annotations

import os
import re
from typing import Any, Protocol, runtime_checkable

from oma.shared.errors import BadGateway, BadRequest, NotFound, UpstreamTimeout

# -- cloud ------------------------------------------------------------------------------------------


class CloudError(BadGateway):
    """The cloud refused or failed a request. `details` is written for a person to act on;
    `retryable` says whether the same request may succeed later; `resource_id` names what a failed
    async job was working on (e.g. the volume createVolume had allocated), for cleanup."""
    error = "OSSEA API error"
    retryable = False

    def __init__(self, errortext: str, *, errorcode: int | None = None, command: str | None = None,
                 cserrorcode: int | None = None, retryable: bool | None = None,
                 details: str | None = None, job_id: str | None = None,
                 resource_id: str | None = None):
        self.errorcode = errorcode
        self.errortext = errortext
        self.command = command
        self.cserrorcode = cserrorcode
        self.job_id = job_id
        self.resource_id = resource_id
        if retryable is not None:
            self.retryable = retryable
        if details is None:
            code = f" (errorcode {errorcode})" if errorcode is not None else ""
            details = f"{command}: {errortext}{code}" if command else f"{errortext}{code}"
        super().__init__(self.error, details)


class CloudAuthError(CloudError):
    error = "OSSEA authentication failed"


class CloudParamError(CloudError):
    """A parameter refused, or an id the cloud does not know (CloudStack answers those with 431)."""
    error = "OSSEA rejected a parameter"


class CloudUnreachable(CloudError):
    error = "OSSEA unreachable"
    retryable = True


class CloudTimeout(CloudError, UpstreamTimeout):
    status, error = 504, "OSSEA request timed out"
    retryable = True


class CloudConfigError(CloudError):
    """The configuration names something the cloud does not have (zone, appliance VM)."""
    status, error = BadRequest.status, "OSSEA configuration invalid"


class CloudCapacityError(CloudParamError):
    """The VM can take no more data disks (data-volume limit, device ids or PCI slots used up).
    `limit` is the data-disk count the cloud named ("... maximum number of data disks (N) attached"),
    None when the refusal names none. Replication learns the appliance VM's real capacity from it."""
    error = "OSSEA VM has no free disk slot"

    def __init__(self, errortext: str, *, limit: int | None = None, **kw: Any):
        super().__init__(errortext, **kw)
        self.limit = limit


@runtime_checkable
class CloudClient(Protocol):
    """A client for one cloud configuration: `factory(credentials, settings)` of a cloud backend.
    Volumes are dicts as CloudStack's listVolumes shows them (`id`, `name`, `virtualmachineid`,
    `deviceid`, ...). Async work (create, attach, detach) waits for the cloud's job."""

    async def close(self) -> None: ...
    async def test_connection(self, zone: str | None, oma_vm_id: str | None) -> dict[str, Any]: ...
    async def list_zones(self) -> list[dict[str, Any]]: ...
    async def list_disk_offerings(self) -> list[dict[str, Any]]: ...
    async def list_volumes(self, **filters: Any) -> list[dict[str, Any]]: ...
    async def start_create_volume(self, name: str, zone_id: str, disk_offering_id: str,
                                  size_gb: int) -> dict[str, Any]: ...  # {"id", "jobid"}: not waited for
    async def wait_for_job(self, job_id: str, *, command: str | None = None,
                           resource_id: str | None = None) -> dict[str, Any]: ...
    async def attach_volume(self, volume_id: str, virtual_machine_id: str) -> dict[str, Any]: ...
    async def detach_volume(self, volume_id: str) -> dict[str, Any]: ...
    async def start_detach_volume(self, volume_id: str) -> dict[str, Any]: ...  # {"jobid"}: not waited for
    async def delete_volume(self, volume_id: str) -> None: ...
    # Optional (not in the runtime check): `list_accounts()` and `list_virtual_machines(name=...)` let
    # preflight (shared/preflight.py) read the account's volume limit and the target names; a backend
    # without them gets a `warn` for those checks.


# -- inventory source -------------------------------------------------------------------------------


class SourceError(BadGateway):
    """The source hypervisor answered with a fault the OMA cannot act on."""
    error = "vCenter error"


class SourceAuthError(SourceError):
    error = "vCenter authentication failed"


class SourceUnreachable(SourceError):
    error = "vCenter unreachable"


@runtime_checkable
class InventorySource(Protocol):
    """`factory(connection, settings)` of an inventory source: reads one source hypervisor."""

    async def test(self) -> dict[str, Any]: ...
    async def discover(self) -> list[dict[str, Any]]: ...


# -- exporter, device resolver ----------------------------------------------------------------------


@runtime_checkable
class Exporter(Protocol):
    """What the export_manager service needs from an NBD backend (`factory(settings)`)."""
    name: str                    # backend name: "nbdkit", "nbd-server"
    port: int
    host: str
    reloads: int                 # configuration reloads performed (nbdkit: always 0)
    restarts: int                # watchdog restarts of a server that died
    last_reload_seconds: float   # duration of the last reload, until the server accepted again

    async def start(self) -> None: ...
    async def stop(self, keep_running: bool = False) -> None: ...
    async def add_export(self, name: str, device_path: str) -> bool: ...
    async def remove_export(self, name: str) -> bool: ...
    def list_exports(self) -> dict[str, str]: ...
    async def check_export(self, name: str) -> int: ...
    def uri(self, name: str, *, client: bool = False) -> str: ...
    async def serving_error(self, handshake: bool = True) -> str | None: ...
    def state(self) -> dict[str, Any]: ...


def validate_device_path(device_path: str | os.PathLike) -> str:
    """A device an export may serve: an absolute path (one line) that exists; else 400 or 404."""
    path = os.fspath(device_path) if isinstance(device_path, (str, os.PathLike)) else None
    if not path or not os.path.isabs(path) or "\n" in path:
        raise BadRequest("Device path must be absolute", {"device_path": str(device_path)})
    if not os.path.exists(path):
        raise NotFound("Device not found", {"device_path": path})
    return path


@runtime_checkable
class DeviceResolver(Protocol):
    """`factory(settings)` of a device resolver: the block device of a volume attached to this VM."""

    async def resolve(self, volume_id: str, timeout: float) -> str: ...


def safe_name(text: str, limit: int) -> str:
    """A CloudStack VM name (a hostname): letters, digits and hyphens, starting with a letter.
    Failover names its VMs with it; preflight checks the name it will take."""
    name = re.sub(r"[^A-Za-z0-9-]+", "-", text).strip("-") or "vm"
    if not name[0].isalpha():
        name = "vm-" + name
    return name[:limit].rstrip("-")
