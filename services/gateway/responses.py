"""The success bodies of every route, as OpenAPI documents them (docs only: the gateway passes each
service's reply through as bytes, these models never parse it).

They mirror the services' views (services/*/service.py, services/replication/views.py) so a client
generator gets types. Extra keys are allowed: a service may add a field before this module names it.
tests/test_openapi_contract.py checks real replies against them.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Stamp = Field(description="UTC time, RFC 3339 (`2025-08-12T08:08:02Z`)")
# Fields the original appliance's GUI reads where the seed is silent (docs/vm-contexts.md).
GUI = "Read by the original GUI. "


class Body(BaseModel):
    model_config = ConfigDict(extra="allow")


class Ok(Body):
    success: Literal[True] = True


class Message(Ok):
    message: str


# --- health ------------------------------------------------------------------------------------
class ServiceHealth(Body):
    status: str = Field(description="`up`, or `down` with a `reason`")
    database: str | None = None
    instances: int = Field(0, description="instances answering `$SRV.PING`")
    reason: str | None = None
    warning: str | None = None
    vmas: dict | None = Field(None, description="replication only: followed_jobs, stalled_jobs, unreachable "
                              "(VMA appliance ids whose last poll got no answer), waiting_jobs")


class Health(Body):
    model_config = ConfigDict(extra="allow", json_schema_extra={"examples": [{
        "status": "healthy", "timestamp": "2025-08-06T11:18:06Z", "database": "connected", "version": "1.0.0"}]})
    status: Literal["healthy", "degraded"]
    timestamp: str
    database: str
    version: str
    bus: str | None = None
    services: dict[str, ServiceHealth] | None = None
    check_ms: float | None = None
    warnings: list[str] | None = None
    down: list[str] | None = None
    reasons: list[str] | None = None


# --- OSSEA and vCenter configurations (the `action` endpoints) ---------------------------------
class OsseaConfiguration(Body):
    id: int
    name: str
    api_url: str
    api_key: str
    secret_key: Literal["[REDACTED]"] = "[REDACTED]"
    domain: str
    zone: str
    oma_vm_id: str | None = None
    is_active: bool
    created_at: str = Stamp
    updated_at: str = Stamp


class OsseaTestDetails(Body):
    zones_found: int
    zone_verified: str | None = None
    api_accessible: bool


class OsseaConfigResult(Ok):
    """`get` gives `configurations` (or `configuration` with an id); `create`/`update` give
    `message` and `configuration`; `delete` gives `message` and `id`; `test` gives `message` and `details`."""
    message: str | None = None
    configuration: OsseaConfiguration | None = None
    configurations: list[OsseaConfiguration] | None = None
    id: int | None = None
    details: OsseaTestDetails | None = None


class VCenterConfiguration(Body):
    id: int
    name: str
    host: str
    port: int
    username: str
    password: Literal["[REDACTED]"] = "[REDACTED]"
    datacenter: str | None = None
    verify_tls: bool
    appliance_id: str | None = Field(None, description="the VMA this vCenter is reached through")
    created_at: str = Stamp
    updated_at: str = Stamp


class VCenterTestDetails(Body):
    host: str
    api_version: str | None = None
    vm_count: int
    about: str | None = None


class VCenterConfigResult(Ok):
    """As for OSSEA: which keys come depends on the `action`."""
    message: str | None = None
    configuration: VCenterConfiguration | None = None
    configurations: list[VCenterConfiguration] | None = None
    id: int | None = None
    details: VCenterTestDetails | None = None


# --- inventory ----------------------------------------------------------------------------------
class InventoryDisk(Body):
    id: str
    key: int | None = None
    label: str | None = None
    unit_number: int | None = None
    controller_key: int | None = None
    controller_bus_number: int | None = None
    controller_type: str | None = None
    controller_class: str | None = None
    path: str | None = None
    size_gb: int | None = None
    capacity_bytes: int | None = None
    datastore: str | None = None
    thin_provisioned: bool | None = None
    backing: str | None = None
    change_id: str | None = None


class InventoryNic(Body):
    key: int | None = None
    network: str | None = None
    mac_address: str | None = None
    adapter_type: str | None = None
    connected: bool | None = None


class InventoryVm(Body):
    """The seed's `source_vm` field names (post it as `source_vm` as it is), plus what vSphere told."""
    id: str = Field(description="moref, e.g. `vm-42`")
    uuid: str = Field(description="instance UUID")
    name: str
    path: str | None = None
    datacenter: str | None = None
    bios_uuid: str | None = None
    cluster: str | None = None
    host: str | None = None
    cpus: int | None = None
    memory_mb: int | None = None
    guest_os: str | None = None
    guest_os_full_name: str | None = None
    power_state: str | None = None
    firmware: str | None = None
    cbt_enabled: bool | None = None
    snapshot_count: int | None = Field(None, description="snapshots of the VM in vSphere; null when the "
                                                         "source did not report them (discovery through a VMA)")
    template: bool | None = None
    vcenter: str | None = None
    status: str | None = Field(None, description="`present` or `gone`")
    first_seen: str | None = None
    last_seen: str | None = None
    gone_at: str | None = None
    disks: list[InventoryDisk] | None = None
    nics: list[InventoryNic] | None = None
    change: str | None = Field(None, description="discovery only: new, changed or unchanged")


class DiscoverySummary(Body):
    found: int
    new: int
    changed: int
    gone: int
    unchanged: int
    seconds: float


class Discovery(Ok):
    vcenter: str
    vms: list[InventoryVm]
    summary: DiscoverySummary
    vms_detail: str | None = Field(None, description="set when the VMs are listed briefly (a very large inventory)")


class Page(Ok):
    total: int
    limit: int
    offset: int


class VmList(Page):
    vms: list[InventoryVm]


class VmDetail(Ok):
    vm: InventoryVm


# --- replication ----------------------------------------------------------------------------------
class EchoedDisk(Body):
    id: str
    path: str | None = None
    size_gb: float
    datastore: str | None = None
    capacity_bytes: int | None = None
    unit_number: int | None = None


class JobVm(Body):
    """The seed's `source_vm` fields of a job's VM."""
    id: str | None = None
    uuid: str | None = None
    name: str | None = None
    path: str | None = None
    datacenter: str | None = None
    cpus: int | None = None
    memory_mb: int | None = None


class EchoedSourceVm(JobVm):
    """The request's `source_vm`, as it was sent (unknown keys kept)."""
    id: str
    name: str
    disks: list[EchoedDisk]


class CreatedVolume(Body):
    volume_id: str
    volume_name: str | None = None
    size_gb: int
    status: Literal["created", "reused"]


class MountedVolume(Body):
    ossea_volume_id: str
    device_path: str | None = None
    mount_point: str | None = Field(None, description="always null: OMA exports block devices, it mounts nothing")
    status: str = Field(description="the disk's status (`ready` once exported)")
    disk_unit_number: int


class NbdExport(Body):
    export_name: str
    device_path: str | None = None
    port: int | None = None
    reused: bool
    vm_id: str
    disk_unit_number: int


class ReplicationCreated(Body):
    """The seed's reply: `ready_for_sync` (201), or `queued`/`provisioning` (202)."""
    model_config = ConfigDict(extra="allow", json_schema_extra={"examples": [{
        "job_id": "job-20250812-080802", "status": "ready_for_sync", "progress_percent": 100.0,
        "source_vm": {"id": "vm-143233", "name": "PGWINTESTBIOS", "disks": [{"id": "disk-001", "size_gb": 40}]},
        "created_volumes": [{"volume_id": "vol-123456", "volume_name": "migration-pgtest2-pgtest2-disk-0",
                             "size_gb": 40, "status": "created"}],
        "mounted_volumes": [{"ossea_volume_id": "vol-123456", "device_path": "/dev/vdc", "mount_point": None,
                             "status": "ready", "disk_unit_number": 0}],
        "nbd_exports": [{"export_name": "migration-vm-4205784a-098a-40f1-1f1e-a5cd2597fd59-disk0",
                         "device_path": "/dev/vdc", "port": 10809, "reused": True,
                         "vm_id": "4205784a-098a-40f1-1f1e-a5cd2597fd59", "disk_unit_number": 0}],
        "started_at": "2025-08-12T08:08:02Z",
        "message": "Migration workflow started - VM export reused without SIGHUP operation"}]})
    job_id: str
    status: str
    progress_percent: float
    source_vm: EchoedSourceVm
    created_volumes: list[CreatedVolume]
    mounted_volumes: list[MountedVolume] = Field(description=GUI + "One per volume the job holds.")
    nbd_exports: list[NbdExport]
    started_at: str | None = None
    message: str | None = None


class JobDisk(Body):
    unit_number: int
    disk_id: str
    path: str | None = None
    size_gb: int
    capacity_bytes: int | None = None
    datastore: str | None = None
    volume_id: str | None = None
    volume_name: str | None = None
    device_id: int | None = None
    device_path: str | None = None
    export_name: str | None = None
    export_port: int | None = None
    reused: bool
    created_by_job: bool
    attached: bool
    status: str
    error: str | None = None
    previous_change_id: str | None = None
    change_id: str | None = None
    bytes_transferred: int
    total_bytes: int | None = None


class JobSummary(Body):
    job_id: str
    vm: JobVm
    vm_name: str
    replication_type: str
    ossea_config_id: int
    status: str
    progress_percent: float
    current_operation: str | None = None
    vma_throughput_mbps: float | None = None
    vma_eta_seconds: int | None = None
    bytes_transferred: int
    total_bytes: int | None = None
    created_at: str | None = None
    started_at: str | None = None
    ready_at: str | None = None
    completed_at: str | None = None
    error: str | None = None
    vma_sync_type: Literal["full", "incremental"] = Field(
        description=GUI + "`incremental` when every disk copies a CBT delta from a base change id")
    vcenter_host: str | None = Field(None, description="sent by the original GUI (`vcenter_host`), as the "
                                     "inventory names that vCenter")
    target_network: str | None = Field(None, description="sent by the original GUI: the VM's default network mapping")
    change_id: str | None = Field(None, description="sent by the original GUI")
    previous_change_id: str | None = Field(None, description="sent by the original GUI: the delta's base for "
                                           "disks that carry none")
    snapshot_id: str | None = Field(None, description="sent by the original GUI")
    schedule_execution_id: str | None = Field(None, description="sent by the original scheduler")
    vm_group_id: str | None = Field(None, description="sent by the original scheduler")
    scheduled_by: str | None = Field(None, description="sent by the original scheduler")
    existing_context_id: str | None = Field(None, description="sent by the original scheduler")
    disks: list[JobDisk]


class JobList(Page):
    jobs: list[JobSummary]


class JobDetail(JobSummary, ReplicationCreated):
    """The summary, the seed's create reply fields, and `ready_for_sync`."""
    model_config = ConfigDict(extra="allow", json_schema_extra=None)  # not the create reply's example
    success: Literal[True] = True
    ready_for_sync: bool
    cleanup_pending: bool = Field(False, description="a cleanup is left to do; `message` says why")


class ProgressAccepted(Ok):
    job_id: str
    status: str
    applied: bool = Field(description="false when the report was older than what the job has")
    progress_percent: float
    bytes_transferred: int
    total_bytes: int | None = None
    vma_throughput_mbps: float | None = None
    vma_eta_seconds: int | None = None


class JobCancelled(Message):
    job_id: str
    status: str
    previous_status: str
    released_volumes: list[str]
    cleanup_pending: bool = Field(False, description="true when volumes could not be released yet; "
                                  "`message` says why (retried every cleanup_retry_interval)")


# --- VM contexts -------------------------------------------------------------------------------
class SyncCycles(Body):
    """Warm-migration figures of the last completed incremental (docs/vm-contexts.md)."""
    sync_count: int = Field(description="completed syncs")
    last_changed_bytes: int | None = None
    dirty_rate: float | None = Field(None, description="last_changed_bytes / the VM's disk size")
    dirty_bytes_per_second: float | None = Field(None, description="changed bytes per second between the "
                                                 "starts of the last two syncs")
    estimated_cutover_seconds: float | None = Field(None, description="the last incremental's duration")


class VmContext(Body):
    context_id: str
    vm_name: str
    current_status: str
    cycles: SyncCycles | None = Field(None, description="the detail only: warm-migration figures")
    total_jobs_run: int
    successful_jobs: int
    failed_jobs: int
    current_job_id: str | None = Field(None, description=GUI)
    vmware_vm_id: str | None = Field(None, description=GUI + "The vCenter moref (`vm-143233`)")
    vm_uuid: str | None = None
    vcenter_host: str | None = Field(None, description=GUI + "From the inventory (or the job's `vcenter_host`)")
    vm_path: str | None = None
    datacenter: str | None = None
    cpu_count: int | None = Field(None, description=GUI)
    memory_mb: int | None = Field(None, description=GUI)
    os_type: str | None = Field(None, description=GUI + "The inventory's guest OS id (`rhel8_64Guest`)")
    power_state: str | None = Field(None, description=GUI + "From the inventory (`poweredOn`...)")
    last_job_at: str | None = Field(None, description=GUI + "The newest job event; null until the VM has a job")
    created_at: str | None = None
    updated_at: str | None = Field(None, description=GUI + "The newest event of any kind")


class VmContextListed(VmContext):
    current_operation: str | None = None
    progress_percent: float | None = None


class VmContextList(Page):
    vm_contexts: list[VmContextListed] = Field(description=GUI + "Ordered by vm_name")


class ContextJob(Body):
    id: str
    dirty_rate: float | None = Field(None, description="a completed incremental: bytes_transferred / the "
                                     "VM's disk size (the share of the disks that changed)")
    status: str
    replication_type: str | None = None
    progress_percent: float | None = None
    current_operation: str | None = None
    vma_throughput_mbps: float | None = None
    vma_eta_seconds: int | None = None
    bytes_transferred: int | None = None
    total_bytes: int | None = None
    error: str | None = None
    vma_sync_type: str | None = Field(None, description=GUI + "`full` or `incremental`")
    schedule_execution_id: str | None = Field(None, description="sent by the original scheduler")
    vm_group_id: str | None = Field(None, description="sent by the original scheduler")
    scheduled_by: str | None = Field(None, description="sent by the original scheduler")
    existing_context_id: str | None = Field(None, description="sent by the original scheduler")
    created_at: str | None = None
    started_at: str | None = None
    completed_at: str | None = None
    updated_at: str | None = None


class ContextDisk(Body):
    unit_number: int
    disk_id: str | None = None
    path: str | None = None
    size_gb: float | None = Field(None, description="whole GiB (stored as a float today: `40.0`)")
    capacity_bytes: int | None = None
    datastore: str | None = None
    volume_id: str | None = None
    device_path: str | None = None
    export_name: str | None = None
    change_id: str | None = None


class CbtRecord(Body):
    job_id: str
    unit_number: int
    change_id: str
    previous_change_id: str | None = Field(None, description="the base of the job's delta")
    recorded_at: str | None = None


class VmContextDetail(Body):
    """The seed's VM context: no `success` key."""
    context: VmContext
    current_job: ContextJob | None = None
    job_history: list[ContextJob]
    disks: list[ContextDisk]
    cbt_history: list[CbtRecord]


EVENT_STREAM = {"description": "Server-Sent Events: `event: context` (a VmContextDetail), then `event: update` "
                               "(`{\"vm_name\", \"context\"}`) per change; `event: resync` (a VmContextDetail: "
                               "replace the whole state) when the client fell behind and updates were dropped; "
                               "`: ping` comments every 15 s",
                "content": {"text/event-stream": {"schema": {"type": "string"}}}}



# --- failover ----------------------------------------------------------------------------------
class FailoverAccepted(Ok):
    failover_id: str = Field(description="`fo-YYYYMMDD-HHMMSS-xxxx`")
    status: str
    action: str
    vm_name: str


class FailoverJob(Body):
    failover_id: str
    action: str
    vm_name: str
    status: str
    current_step: str | None = None
    target_id: str | None = Field(None, description="cleanup: the test failover it removes")
    replication_job_id: str | None = None
    target_vm_name: str | None = None
    target_vm_id: str | None = None
    error: str | None = None
    created_at: str | None = None
    completed_at: str | None = None


class FailoverJobList(Page):
    jobs: list[FailoverJob]


class FailoverStep(Body):
    name: str
    status: str
    attempts: int
    error: str | None = None
    started_at: str | None = None
    completed_at: str | None = None
    duration_seconds: float | None = None


class FailoverResource(Body):
    kind: str = Field(description="snapshot, volume, vm or stub_root")
    name: str
    cloud_id: str | None = None
    source_id: str | None = None
    state: str = Field(description="planned (name recorded), created (id recorded) or deleted")
    step: str


class FailoverJobDetail(Ok, FailoverJob):
    steps: list[FailoverStep]
    resources: list[FailoverResource]


class NetworkMapping(Body):
    id: int
    vcenter: str
    source_network: str
    production_network_id: str | None = None
    test_network_id: str | None = None


class NetworkMappingResult(Ok):
    mapping: NetworkMapping | None = None
    mappings: list[NetworkMapping] | None = None
    message: str | None = None


# --- orchestration through the VMA (issue 16) -----------------------------------------------------
class ChangeId(Body):
    """The copier reads `change_id` only; empty means a full sync."""
    change_id: str = Field(description="VMware change id, or empty")
    vm_path: str | None = None
    disk_id: str | None = None


class ChangeIdRecorded(Ok):
    job_id: str
    disk_id: str
    change_id: str


class Appliance(Body):
    appliance_id: str
    api_url: str = Field(description="the VMA's API as OMA reaches it")
    reachable: bool | None = Field(None, description="whether OMA's last call got an answer; null: never called")
    last_seen: str | None = Field(None, description="UTC time of the last answer")
    enabled: bool | None = None
    created_at: str | None = None
    last_used_at: str | None = None


class ApplianceResult(Ok):
    appliances: list[Appliance] | None = None
    appliance: Appliance | None = None


# --- scheduler: protection groups, schedules, executions, preflight (docs/scheduler.md) -------------
class Schedule(Body):
    id: int
    name: str
    interval_seconds: int | None = Field(None, description="null for a cron schedule")
    cron: str | None = Field(None, description="a cron expression (UTC); null for an interval schedule")
    window_start: str | None = Field(None, description="`HH:MM` UTC: runs only inside the window")
    window_end: str | None = None
    jitter_seconds: int = Field(0, description="each run delayed by a random 0..jitter seconds")
    max_concurrent: int = Field(description="syncs of one group running at once")
    skip_if_running: bool
    enabled: bool
    next_run_at: str | None = Field(None, description="UTC; null while disabled")
    last_run_at: str | None = None
    created_at: str | None = None
    updated_at: str | None = None


class ScheduleResult(Ok):
    schedule: Schedule | None = None
    schedules: list[Schedule] | None = None
    message: str | None = None
    id: int | None = None


class Group(Body):
    id: int
    name: str
    description: str | None = None
    ossea_config_id: int
    schedule_id: int | None = None
    next_run_at: str | None = Field(None, description="the schedule's next run")
    vm_filter: dict[str, str] | None = Field(None, description="members by filter over the inventory "
                                                               "(datacenter, folder, name_pattern, vcenter)")
    defaults: dict[str, str] | None = Field(None, description="failover options used when a request gives none "
                                                              "(service_offering, network_profile)")
    vm_names: list[str]
    vm_count: int
    created_at: str | None = None
    updated_at: str | None = None


class GroupResult(Ok):
    group: Group | None = None
    groups: list[Group] | None = None
    message: str | None = None
    id: int | None = None


class ExecutionVm(Body):
    vm_name: str
    status: Literal["pending", "starting", "running", "completed", "failed", "skipped"]
    job_id: str | None = None
    reason: str | None = Field(None, description="why it failed or was skipped (preflight reasons included)")
    started_by: str | None = Field(None, description="the scheduler process that started it")
    started_at: str | None = None
    finished_at: str | None = None


class Execution(Body):
    execution_id: str = Field(description="`schedule_execution_id` on its replication jobs")
    schedule_id: int | None = None
    group_id: int
    status: Literal["running", "completed", "skipped"]
    message: str | None = None
    started_by: str
    started_at: str
    finished_at: str | None = None
    vms_total: int
    vms_started: int = Field(description="VMs that got a replication job")
    vms_skipped: int
    vms_failed: int
    vms: dict[str, int] = Field(description="VMs by state")
    vm_results: list[ExecutionVm] | None = Field(None, description="one execution's VMs (its own route)")


class ExecutionList(Page):
    executions: list[Execution]


class PreflightCheck(Body):
    check: str = Field(description="cbt, disk_slots, volume_limit, disk_offering, network, target_name, power_state, "
                                   "snapshots (inventory: not found)")
    status: Literal["pass", "warn", "fail"]
    reason: str


class PreflightVm(Body):
    vm_name: str
    ready: bool = Field(description="no check failed")
    checks: list[PreflightCheck]


class PreflightSummary(Body):
    vms: int
    ready: int
    not_ready: int


class PreflightResult(Ok):
    ossea_config_id: int | None = None
    results: list[PreflightVm]
    summary: PreflightSummary
