"""The contract of a VMA client: what OMA asks of the appliance next to vCenter.

Field names and routes are exactly the original VMA's (shared/reference/vma.md), so an
unmodified VMA and `oma-vma-sim` answer the same models. Requests carry the vCenter password
as a `SecretStr`: it is hidden in repr() and logs and revealed only when the body is serialised
for the wire (`wire()`). Responses ignore fields they do not know, as a newer VMA may add some.

Errors: `VmaUnreachable` (no connection, reset, or no answer in time: `VmaTimeout`),
`VmaRejected` (the VMA answered 4xx: a bad request, never retried; `VmaNotFound` for 404) and
`VmaRemoteError` (the VMA answered 5xx: it failed to do what was asked).
"""
from __future__ import annotations

from typing import Any, Literal, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_serializer

from oma.shared.errors import BadGateway, BadRequest, NotFound, UpstreamTimeout

API_PREFIX = "/api/v1"
# Query parameters and body fields whose values never reach a log line.
SECRET_FIELDS = frozenset({"password", "username", "token", "session_token"})


class _Request(BaseModel):
    # Unknown fields are ignored: the original OMA sends a few this contract does not use.
    model_config = ConfigDict(extra="ignore")

    def wire(self) -> dict[str, Any]:
        """The JSON body as sent to the VMA (secrets revealed, unset optionals left out)."""
        return self.model_dump(mode="json", exclude_none=True)


class _Response(BaseModel):
    model_config = ConfigDict(extra="ignore")


def vcenter_address(host: str, port: int | None) -> str:
    """The `vcenter` field the VMA logs in with: host, or host:port when not 443."""
    return host if not port or port == 443 else f"{host}:{port}"


class VCenterCredentials(_Request):
    """The vCenter to act on and how to log in; the original passes these in every call."""
    vcenter: str = Field(min_length=1, description="vCenter host, optionally host:port")
    username: str = Field(min_length=1)
    password: SecretStr

    @field_serializer("password", when_used="json")
    def _reveal(self, value: SecretStr) -> str:
        return value.get_secret_value()

    def query(self) -> dict[str, str]:
        """As query parameters (the original's cbt-status takes them so; never log the URL raw)."""
        return {"vcenter": self.vcenter, "username": self.username,
                "password": self.password.get_secret_value()}


# -- discover -----------------------------------------------------------------------------

class DiscoverRequest(VCenterCredentials):
    datacenter: str | None = None
    filter: str | None = None


class VmaDisk(_Response):
    id: str
    label: str | None = None
    path: str | None = None
    vmdk_path: str | None = None
    size_gb: int = 0
    capacity_bytes: int = 0
    datastore: str | None = None
    provisioning_type: str | None = None
    unit_number: int | None = None


class VmaNetwork(_Response):
    label: str | None = None
    network_name: str | None = None
    adapter_type: str | None = None
    mac_address: str | None = None
    connected: bool | None = None
    type: str | None = None


class VmaVm(_Response):
    id: str
    name: str
    path: str
    datacenter: str | None = None
    power_state: str | None = None
    guest_os: str | None = None
    memory_mb: int | None = None
    num_cpu: int | None = None
    cpus: int | None = None
    os_type: str | None = None
    vmx_version: str | None = None
    display_name: str | None = None
    annotation: str | None = None
    folder_path: str | None = None
    vmware_tools_status: str | None = None
    vmware_tools_version: str | None = None
    disks: list[VmaDisk] = []
    networks: list[VmaNetwork] = []


class VCenterInfo(_Response):
    host: str
    datacenter: str | None = None


class DiscoverResponse(_Response):
    vcenter: VCenterInfo
    vms: list[VmaVm] = []


# -- replicate ----------------------------------------------------------------------------

class NbdTarget(_Request):
    device_path: str = Field(pattern=r"^nbd://[^/]*:\d+/.+$",
                             description='"nbd://host:port/export" (host may be empty)')
    vmware_disk_key: str = Field(pattern=r"^\d+$")
    # Not in the original (its copier asks OMA for it); lets a caller name the base of an incremental.
    previous_change_id: str | None = None


class ReplicateRequest(VCenterCredentials):
    job_id: str = Field(min_length=1, max_length=200)
    vm_paths: list[str] = Field(min_length=1)
    oma_url: str | None = None
    nbd_targets: list[NbdTarget] = Field(min_length=1)


class ReplicateResponse(_Response):
    job_id: str
    status: str
    vm_count: int
    started_at: str


# -- progress and status ------------------------------------------------------------------

JobStatus = Literal["queued", "running", "completed", "failed", "cancelled"]


class Throughput(_Response):
    current_mbps: float = 0.0
    average_mbps: float = 0.0
    peak_mbps: float = 0.0
    last_update: str | None = None


class Timing(_Response):
    start_time: str | None = None
    last_update: str | None = None
    elapsed_ms: int = 0
    phase_start: str | None = None
    phase_elapsed_ms: int = 0
    eta_seconds: int | None = None


class VmInfo(_Response):
    name: str | None = None
    path: str | None = None
    disk_size_gb: float = 0
    disk_size_bytes: int = 0
    cbt_enabled: bool = False


class Phase(_Response):
    name: str
    status: str
    start_time: str | None = None
    end_time: str | None = None
    duration_ms: int | None = None


class DiskProgress(_Response):
    disk_id: str
    label: str | None = None
    bytes_transferred: int = 0
    total_bytes: int = 0
    percent: float = 0.0
    throughput_mbps: float = 0.0
    status: str = "queued"


class ProgressResponse(_Response):
    job_id: str
    status: str
    sync_type: str | None = None  # full / incremental
    phase: str | None = None
    percentage: float = 0.0
    current_operation: str | None = None
    bytes_transferred: int = 0
    total_bytes: int = 0
    throughput: Throughput = Throughput()
    timing: Timing = Timing()
    vm_info: VmInfo = VmInfo()
    phases: list[Phase] = []
    errors: list[str] = []
    last_error: str | None = None
    disk_progresses: list[DiskProgress] = []


class ProgressUpdate(_Request):
    """What the copier reports to its own VMA (`POST /progress/{job_id}/update`)."""
    stage: str
    status: str | None = None
    bytes_transferred: int = Field(ge=0)
    total_bytes: int | None = Field(default=None, ge=0)
    throughput_bps: float = Field(default=0, ge=0)
    percent: float | None = Field(default=None, ge=0, le=100)
    disk_id: str | None = None
    sync_type: str | None = None
    error_message: str | None = None


class StatusResponse(_Response):
    job_id: str
    status: str
    progress_percent: float = 0.0
    current_operation: str | None = None
    start_time: str | None = None
    last_update: str | None = None
    vm_path: str | None = None


# -- cleanup, CBT, power ------------------------------------------------------------------

class CleanupRequest(_Request):
    job_id: str = Field(min_length=1)
    action: Literal["delete_snapshot", "cleanup_all"] = "cleanup_all"


class CleanupResponse(_Response):
    job_id: str
    action: str
    status: str
    message: str | None = None


class CbtStatusResponse(_Response):
    vm_path: str
    cbt_enabled: bool
    power_state: str | None = None


class PowerRequest(VCenterCredentials):
    vm_id: str = Field(min_length=1)
    force: bool = False
    timeout: int = Field(default=300, ge=1, le=3600)
    wait_for_tools: bool = False
    wait_for_shutdown: bool = True


class PowerResponse(_Response):
    success: bool
    vm_id: str
    previous_state: str
    new_state: str  # poweredOn / poweredOff / suspended
    operation: str
    shutdown_method: str | None = None  # graceful / forced
    tools_status: str | None = None
    duration_seconds: float = 0.0
    timestamp: str
    message: str | None = None


class PowerStateResponse(_Response):
    vm_id: str
    power_state: str
    tools_status: str | None = None
    last_state_change: str | None = None
    uptime_seconds: int | None = None
    timestamp: str


class HealthResponse(_Response):
    status: str
    timestamp: str
    uptime: float | str | None = None


# -- errors -------------------------------------------------------------------------------

class VmaError(BadGateway):
    """The VMA failed a call. `retryable` tells a transient failure from a permanent one."""
    error = "VMA error"
    retryable = False


class VmaUnreachable(VmaError):
    """No connection to the VMA (refused, reset, unresolvable): the tunnel may be down."""
    error = "VMA unreachable"
    retryable = True


class VmaTimeout(VmaUnreachable):
    """The VMA did not answer within the client's timeout."""
    error = "VMA timeout"
    status = UpstreamTimeout.status


class VmaRejected(VmaError):
    """The VMA answered 4xx: the request is wrong and repeating it cannot help."""
    error = "VMA rejected the request"
    status = BadRequest.status


class VmaNotFound(VmaRejected):
    """The VMA does not know the job or VM (404)."""
    error = "Not found on the VMA"
    status = NotFound.status


class VmaRemoteError(VmaError):
    """The VMA answered 5xx: it tried and failed (vCenter refused, the copy could not start...)."""
    error = "VMA failed the request"


# -- the contract -------------------------------------------------------------------------

@runtime_checkable
class VmaClient(Protocol):
    """One VMA's API (built by the factory of an `oma_register_vma_clients` plugin)."""

    base_url: str

    async def discover(self, request: DiscoverRequest) -> DiscoverResponse: ...

    async def replicate(self, request: ReplicateRequest) -> ReplicateResponse: ...

    async def progress(self, job_id: str) -> ProgressResponse: ...

    async def status(self, job_id: str) -> StatusResponse: ...

    async def cleanup(self, request: CleanupRequest) -> CleanupResponse: ...

    async def cbt_status(self, vm_path: str, credentials: VCenterCredentials) -> CbtStatusResponse: ...

    async def power_off(self, request: PowerRequest) -> PowerResponse: ...

    async def power_on(self, request: PowerRequest) -> PowerResponse: ...

    async def power_state(self, vm_id: str, credentials: VCenterCredentials | None = None
                          ) -> PowerStateResponse: ...

    async def health(self) -> HealthResponse: ...

    async def close(self) -> None: ...
