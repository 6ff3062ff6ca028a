"""Wire contracts shared by the gateway (OpenAPI, first validation) and the services.

Field names are the seed's. Strings are bounded by their database columns, so oversized input is a
400 that names the field, never a database error.
"""
from __future__ import annotations

import re
from typing import Annotated, Any, Literal
from urllib.parse import urlparse

import orjson
from pydantic import BaseModel, ConfigDict, Field, field_serializer, field_validator, model_validator
from pydantic_core import PydanticCustomError

from oma.shared.disk_slot import CONTROLLER_TYPES, UNITS_PER_BUS, BusNumber, DiskSlot, SlotNumber, slot_number

Name = Field(min_length=1, max_length=255)

VERSION = "1.0.0"                 # the appliance's: /health, the bus services, OpenAPI
REDACTED = "[REDACTED]"           # what a response shows in place of a stored secret
GIB = 1024 ** 3

# Numeric bounds: what a BIGINT column, SQLite and the JSON encoder all hold.
INT64_MAX = 2 ** 63 - 1
INT32_MAX = 2 ** 31 - 1           # an INT column (counts, seconds)
OFFSET_MAX = INT32_MAX            # pagination offsets
Id = Annotated[int, Field(strict=True, ge=1, le=INT64_MAX)]
ByteCount = Annotated[int, Field(ge=0, le=INT64_MAX)]
MAX_DISK_GB = 65536               # CloudStack's custom offerings stop well below 64 TiB
SOURCE_VM_EXTRA_MAX = 32 * 1024   # serialized unknown keys kept from source_vm and its disks (a 64-disk VM as listed)
SOURCE_VM_MAX = 65535             # the whole source_vm as stored (a TEXT column)
# A VM's export key (uuid, else id) goes into export and volume names: no path characters.
VM_KEY_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"
VM_KEY_MAX = 36
NO_CONTROL = r"^[^\x00-\x1f\x7f]*$"   # names and paths: printable, on one line


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)


class ErrorBody(BaseModel):
    success: Literal[False] = False
    error: str
    details: Any = None


# --- auth ------------------------------------------------------------------------------------
class LoginRequest(Strict):
    model_config = ConfigDict(extra="ignore", str_strip_whitespace=True, json_schema_extra={"examples": [
        {"appliance_id": "test-vma", "token": "vma_test_token_abc123def456789012345678", "version": VERSION}]})
    appliance_id: str = Field(min_length=1, max_length=255)
    token: str = Field(min_length=1, max_length=512)
    version: str | None = Field(None, max_length=64)


class LoginResponse(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "success": True, "message": "Authentication successful",
        "session_token": "oma_session_xyz789abc456def123", "expires_at": "2025-08-06T12:00:00Z"}]})
    success: bool = True
    message: str
    session_token: str
    expires_at: str


# --- OSSEA configuration (the unified endpoint) ---------------------------------------------
def _check_url(v: str | None) -> str | None:
    if v is None:
        return v
    u = urlparse(v)
    if u.scheme not in ("http", "https") or not u.hostname:
        raise ValueError("must be an http(s) URL such as http://host:8080/client/api")
    try:
        u.port
    except ValueError:
        raise ValueError("has an invalid port") from None
    return v


class OsseaConfigFields(Strict):
    """Every field optional here; `create` and `test` check the required ones."""
    name: str | None = Field(None, min_length=1, max_length=255)
    api_url: str | None = Field(None, min_length=1, max_length=500)
    api_key: str | None = Field(None, min_length=1, max_length=500)
    secret_key: str | None = Field(None, min_length=1, max_length=500)
    domain: str | None = Field(None, max_length=255)
    zone: str | None = Field(None, min_length=1, max_length=255)
    oma_vm_id: str | None = Field(None, max_length=255)
    is_active: bool | None = None

    _url = field_validator("api_url")(classmethod(lambda cls, v: _check_url(v)))


OSSEA_EXAMPLE = {
    "name": "production-ossea", "api_url": "http://10.245.241.101:8080/client/api",
    "api_key": "GdsWBVHco0OOW4vBlgfnyzjru65FV-U1l1kKJ7n2WwH0gn3soTaZQZZyXfgUsxX7PyP06WrOOOcNRKmhRWDSlA",
    "secret_key": "uTCroKUkHZaNybhBXkcQsCb_eKDvZKbhHaZK4I1nHrGJYLKN-j0O-t9EGUx9yBdHH3F8dN5wVelitvdpQjwdcQ",
    "domain": "/", "zone": "OSSEA-Zone", "oma_vm_id": "f47ac10b-58cc-4372-a567-0e02b2c3d479"}


class OsseaConfigRequest(Strict):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"action": "get"}, {"action": "get", "id": 1},
        {"action": "create", "configuration": OSSEA_EXAMPLE},
        {"action": "update", "id": 1, "configuration": {"name": "production-ossea-updated",
                                                          "zone": "OSSEA-Zone-Updated"}},
        {"action": "delete", "id": 1},
        {"action": "test", "configuration": {k: OSSEA_EXAMPLE[k] for k in
                                             ("api_url", "api_key", "secret_key", "domain", "zone")}}]})
    action: Literal["get", "create", "update", "delete", "test"]
    id: Id | None = None
    configuration: OsseaConfigFields | None = None


# --- vCenter connections (same anti-sprawl pattern) ------------------------------------------
class ApplianceAction(Strict):
    """`POST /api/v1/appliances`: list the VMAs, or set the API URL OMA reaches one at."""
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"action": "get"}, {"action": "update", "appliance_id": "vma-01", "api_url": "http://127.0.0.1:9081"}]})
    action: Literal["get", "update"]
    appliance_id: str | None = Field(None, min_length=1, max_length=255)
    api_url: str | None = Field(None, min_length=1, max_length=1024, pattern=r"^https?://\S+$")


class VCenterFields(Strict):
    name: str | None = Field(None, min_length=1, max_length=255)
    host: str | None = Field(None, min_length=1, max_length=255)
    port: int | None = Field(None, ge=1, le=65535)
    username: str | None = Field(None, min_length=1, max_length=255)
    password: str | None = Field(None, min_length=1, max_length=500)
    datacenter: str | None = Field(None, max_length=255)
    verify_tls: bool | None = None
    # The VMA through which this vCenter is reached (discovery and copies); none: pyvmomi directly.
    appliance_id: str | None = Field(None, max_length=255)


class VCenterRequest(Strict):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"action": "create", "configuration": {"host": "vcenter.example.com", "username": "administrator@vsphere.local",
                                               "password": "secret", "datacenter": "DatabanxDC"}},
        {"action": "get"}, {"action": "test", "id": 1}]})
    action: Literal["get", "create", "update", "delete", "test"]
    id: Id | None = None
    configuration: VCenterFields | None = None


# --- replication -----------------------------------------------------------------------------
# A replication job's statuses, as the service stores them and its events carry them (docs/events.md).
QUEUED, PROVISIONING, READY, REPLICATING = "queued", "provisioning", "ready_for_sync", "replicating"
COMPLETED, FAILED, CANCELLED = "completed", "failed", "cancelled"
STALLED = "stalled"  # replicating, but the VMA stopped answering or the bytes stopped moving
JOB_STATUSES = (QUEUED, PROVISIONING, READY, REPLICATING, STALLED, COMPLETED, FAILED, CANCELLED)

def _fail(text: str) -> PydanticCustomError:
    """An error whose text is the message itself (no "Value error, " prefix); pydantic adds the field."""
    return PydanticCustomError("value_error", "{text}", {"text": text})


class SourceDisk(BaseModel):
    """One disk as the inventory lists it. With `controller_type` the disk's slot is its controller's
    (shared/disk_slot.py), else `unit_number` is the slot itself (SCSI bus 0), else its position."""
    model_config = ConfigDict(extra="allow")
    id: str = Field(min_length=1, max_length=255, pattern=NO_CONTROL)
    path: str | None = Field(None, max_length=1024, pattern=NO_CONTROL)
    size_gb: float = Field(gt=0, le=MAX_DISK_GB)
    datastore: str | None = Field(None, max_length=255, pattern=NO_CONTROL)
    capacity_bytes: int | None = Field(None, gt=0, le=MAX_DISK_GB * GIB)
    unit_number: SlotNumber | None = None
    controller_type: Literal[CONTROLLER_TYPES] | None = None  # type: ignore[valid-type]
    controller_bus_number: BusNumber | None = None

    @model_validator(mode="after")
    def _unit_on_controller(self) -> SourceDisk:
        if self.controller_type and self.unit_number is not None and self.unit_number >= UNITS_PER_BUS:
            raise _fail(f"unit_number: at most {UNITS_PER_BUS - 1} on a {self.controller_type} controller")
        return self

    @field_serializer("size_gb")
    def _whole(self, v: float) -> float | int:  # 40, as the seed writes it, not 40.0
        return int(v) if v.is_integer() else v


class SourceVM(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: str = Field(min_length=1, max_length=255, pattern=NO_CONTROL)
    name: str = Field(min_length=1, max_length=255, pattern=NO_CONTROL)
    uuid: str | None = Field(None, max_length=VM_KEY_MAX, pattern=VM_KEY_PATTERN)
    path: str | None = Field(None, max_length=1024, pattern=NO_CONTROL)
    datacenter: str | None = Field(None, max_length=255, pattern=NO_CONTROL)
    cpus: int | None = Field(None, ge=0, le=4096)
    memory_mb: int | None = Field(None, ge=0, le=INT32_MAX)
    disks: list[SourceDisk] = Field(min_length=1, max_length=64)

    @model_validator(mode="after")
    def _checks(self) -> SourceVM:
        if self.uuid is None and (len(self.id) > VM_KEY_MAX or not re.match(VM_KEY_PATTERN, self.id)):
            raise _fail(f"id: without a uuid the id names the VM's exports: at most {VM_KEY_MAX} letters, "
                              "digits, '.', '_' or '-' (or give uuid)")
        extras = [self.model_extra or {}] + [d.model_extra or {} for d in self.disks]
        try:
            extra_size = sum(len(orjson.dumps(e)) for e in extras if e)
            size = len(orjson.dumps(self.model_dump(mode="json", exclude_none=True)))
        except TypeError:  # e.g. an integer beyond 64 bits among the unknown keys
            raise _fail("unknown keys must hold JSON the appliance can store "
                        "(integers within 64 bits)") from None
        if extra_size > SOURCE_VM_EXTRA_MAX:
            raise _fail(f"unknown keys take {extra_size} bytes serialized; at most {SOURCE_VM_EXTRA_MAX} "
                        "are kept")
        if size > SOURCE_VM_MAX:
            raise _fail(f"{size} bytes serialized; at most {SOURCE_VM_MAX}")
        self.disk_slots()
        return self

    def disk_slots(self) -> list[int]:
        """Each disk's slot (shared/disk_slot.py); two disks in one slot are refused, naming both."""
        first: dict[int, int] = {}
        slots = []
        for i, d in enumerate(self.disks):
            slot = slot_number(d.controller_type, d.controller_bus_number, d.unit_number, i)
            if slot in first:
                raise _fail(f"disks.{i}.unit_number: slot {slot} ({DiskSlot.from_number(slot)}) is also "
                            f"the slot of disks.{first[slot]}")
            first[slot] = i
            slots.append(slot)
        return slots


REPLICATION_EXAMPLE = {
    "source_vm": {"id": "vm-143233", "name": "PGWINTESTBIOS", "path": "/DatabanxDC/vm/PGWINTESTBIOS",
                  "datacenter": "DatabanxDC", "cpus": 2, "memory_mb": 4096,
                  "disks": [{"id": "disk-001", "path": "[datastore1] PGWINTESTBIOS/PGWINTESTBIOS.vmdk",
                             "size_gb": 40, "datastore": "datastore1", "capacity_bytes": 42949672960}]},
    "ossea_config_id": 1, "replication_type": "initial"}


# The original appliance's clients send these beside the seed's three keys (docs/replication.md).
ORIGINAL_GUI = "Sent by the original GUI. "
ORIGINAL_SCHEDULER = "Sent by the original scheduler. "
Token = Annotated[str, Field(min_length=1, max_length=255, pattern=NO_CONTROL)]


class ReplicationRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [REPLICATION_EXAMPLE]})
    source_vm: SourceVM
    ossea_config_id: Id
    replication_type: Literal["initial", "incremental"] = "initial"
    vcenter_host: Token | None = Field(None, description=ORIGINAL_GUI + "The vCenter (host or configuration "
                                       "name) the VM was discovered in; 400 when the inventory disagrees.")
    datacenter: Token | None = Field(None, description=ORIGINAL_GUI + "The VM's datacenter; 400 when it "
                                     "contradicts source_vm.datacenter or the inventory.")
    target_network: Token | None = Field(None, description=ORIGINAL_GUI + "The OSSEA network the VM's NICs "
                                         "map to by default; recorded on the job.")
    change_id: Token | None = Field(None, description=ORIGINAL_GUI + "The VM's last CBT change id: the "
                                       "base of an incremental job whose disks carry none.")
    previous_change_id: Token | None = Field(None, description=ORIGINAL_GUI + "The base of the CBT delta "
                                                "(wins over change_id) for disks that carry none.")
    snapshot_id: Token | None = Field(None, description=ORIGINAL_GUI + "The VMware snapshot; recorded.")
    schedule_execution_id: Token | None = Field(None, description=ORIGINAL_SCHEDULER + "Recorded on the job.")
    vm_group_id: Token | None = Field(None, description=ORIGINAL_SCHEDULER + "Recorded on the job.")
    scheduled_by: Token | None = Field(None, description=ORIGINAL_SCHEDULER + "Recorded on the job.")
    existing_context_id: Token | None = Field(None, description=ORIGINAL_SCHEDULER + "The VM context the "
                                              "scheduler knows; recorded on the job.")
    start_sync: bool | None = Field(None, description="Start the copy through the VMA once the exports are "
                                    "ready; default: when a VMA reaches the VM's vCenter.")

    @model_validator(mode="before")
    @classmethod
    def _empty_is_absent(cls, data: Any) -> Any:
        """The original's clients send "" for a field they have no value for."""
        if isinstance(data, dict):
            return {k: None if v == "" and k in ORIGINAL_REQUEST_FIELDS else v for k, v in data.items()}
        return data


ORIGINAL_REQUEST_FIELDS = frozenset(ReplicationRequest.model_fields) - {"source_vm", "ossea_config_id",
                                                                        "replication_type", "start_sync"}


# --- failover -------------------------------------------------------------------------------
class FailoverOptions(Strict):
    service_offering: str | None = Field(None, min_length=1, max_length=255, description="name or id")
    template: str | None = Field(None, min_length=1, max_length=255, description="stub template, name or id")
    boot_type: Literal["BIOS", "UEFI"] | None = None
    network_profile: Literal["test", "production"] | None = None
    power_off_source: bool | None = None
    final_sync: bool | None = None
    convert: str | None = Field(None, max_length=64, description="converter plugin; only `none` for now")
    keep_snapshots: bool | None = None


class FailoverRequest(Strict):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True, json_schema_extra={"examples": [
        {"action": "test", "vm_name": "pgtest1", "options": {"service_offering": "Medium Instance"}},
        {"action": "cleanup", "vm_name": "pgtest1"}]})
    action: Literal["test", "live", "cleanup", "rollback"]
    vm_name: str = Name
    options: FailoverOptions = Field(default_factory=FailoverOptions)


class NetworkMappingFields(Strict):
    vcenter: str | None = Field(None, max_length=255, description="empty: any vCenter")
    source_network: str | None = Field(None, min_length=1, max_length=255)
    production_network_id: str | None = Field(None, min_length=1, max_length=64)
    test_network_id: str | None = Field(None, min_length=1, max_length=64)


class NetworkMappingRequest(Strict):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"action": "create", "mapping": {"source_network": "VM Network", "production_network_id": "0e00...01",
                                         "test_network_id": "0e00...11"}},
        {"action": "get"}, {"action": "delete", "id": 1}]})
    action: Literal["get", "create", "update", "delete"]
    id: Id | None = None
    mapping: NetworkMappingFields | None = None


class DiskProgress(BaseModel):
    model_config = ConfigDict(extra="forbid")
    unit_number: SlotNumber  # the disk's slot: disk_unit_number of its export
    bytes_transferred: ByteCount | None = None
    total_bytes: ByteCount | None = None
    change_id: str | None = Field(None, max_length=255)


class ChangeIdBody(BaseModel):
    """The copier's record of a disk's new change id (`POST /api/v1/replications/{job_id}/changeid`)."""
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"change_id": "52 3c ec 1b 3a 0e 4b 8e-1e 7d 0c 5a 6d 2a 4f 10/42", "disk_id": "disk-2000"}]})
    change_id: str = Field(min_length=1, max_length=255)
    disk_id: str = Field(min_length=1, max_length=255)


class ProgressReport(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"status": "replicating", "current_operation": "Transferring Data",
         "bytes_transferred": 21181880320, "total_bytes": 42949672960},
        {"status": "completed", "bytes_transferred": 42949672960, "total_bytes": 42949672960,
         "disks": [{"unit_number": 0, "change_id": "52 3c ec 1b 3a 0e 4b 8e-1e 7d 0c 5a 6d 2a 4f 10/42"}]}]})
    status: Literal["replicating", "completed", "failed"]
    current_operation: str | None = Field(None, max_length=255)
    bytes_transferred: ByteCount | None = None
    total_bytes: ByteCount | None = None
    disks: list[DiskProgress] | None = Field(None, max_length=64)
    error: str | None = Field(None, max_length=2000)


# --- scheduler: protection groups, schedules, preflight (docs/scheduler.md) ------------------------
VmName = Annotated[str, Field(min_length=1, max_length=255, pattern=NO_CONTROL)]
RowId = Annotated[int, Field(strict=True, ge=1, le=INT32_MAX)]  # stored in an INT column
MAX_GROUP_VMS = 1000
MAX_INTERVAL = 31 * 86400


class GroupFilter(Strict):
    """The inventory's VMs that belong to the group as well as its `vm_names` (all given fields must match)."""
    datacenter: str | None = Field(None, min_length=1, max_length=255, pattern=NO_CONTROL)
    folder: str | None = Field(None, min_length=1, max_length=1024, pattern=NO_CONTROL,
                               description="an inventory folder path (`/DC0/vm/prod`): the VMs in it and below")
    name_pattern: str | None = Field(None, min_length=1, max_length=255, pattern=NO_CONTROL,
                                     description="shell-style, case-insensitive (`db-*`)")
    vcenter: str | None = Field(None, min_length=1, max_length=255, pattern=NO_CONTROL)


class GroupDefaults(Strict):
    """Failover options used when a failover of a member VM gives none."""
    service_offering: str | None = Field(None, min_length=1, max_length=255, description="name or id")
    network_profile: Literal["test", "production"] | None = None


class GroupFields(Strict):
    name: str | None = Field(None, min_length=1, max_length=255, pattern=NO_CONTROL)
    description: str | None = Field(None, max_length=1000, pattern=NO_CONTROL)
    ossea_config_id: RowId | None = Field(None, description="the OSSEA configuration its syncs use")
    schedule_id: RowId | None = Field(None, description="the schedule that starts its syncs; none: by hand only")
    vm_names: list[VmName] | None = Field(None, max_length=MAX_GROUP_VMS, description="the VMs (inventory names)")
    vm_filter: GroupFilter | None = Field(None, description="members by filter over the inventory, resolved "
                                                            "at each run; `{}` on update removes it")
    defaults: GroupDefaults | None = None


class GroupRequest(Strict):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True, json_schema_extra={"examples": [
        {"action": "create", "group": {"name": "databases", "ossea_config_id": 1, "schedule_id": 1,
                                       "vm_names": ["pgtest1", "pgtest2"]}},
        {"action": "add_vms", "id": 1, "vm_names": ["pgtest3"]}, {"action": "get"}]})
    action: Literal["get", "create", "update", "delete", "add_vms", "remove_vms"]
    id: Id | None = None
    group: GroupFields | None = None
    vm_names: list[VmName] | None = Field(None, max_length=MAX_GROUP_VMS, description="add_vms / remove_vms")


WINDOW_TIME = r"^(([01][0-9]|2[0-3]):[0-5][0-9])?$"


class ScheduleFields(Strict):
    name: str | None = Field(None, min_length=1, max_length=255, pattern=NO_CONTROL)
    interval_seconds: int | None = Field(None, strict=True, ge=1, le=MAX_INTERVAL,
                                         description="seconds between runs (at least OMA_SCHEDULER_MIN_INTERVAL); "
                                                     "this or `cron`")
    cron: str | None = Field(None, min_length=9, max_length=255, pattern=NO_CONTROL,
                             description="a cron expression (UTC), e.g. `*/15 * * * *`; this or `interval_seconds`")
    window_start: str | None = Field(None, pattern=WINDOW_TIME, description="`HH:MM` UTC: runs only from then...")
    window_end: str | None = Field(None, pattern=WINDOW_TIME, description="...until then (may span midnight); "
                                                                          "`\"\"` for both removes the window")
    jitter_seconds: int | None = Field(None, strict=True, ge=0, le=3600,
                                       description="each run is delayed by a random 0..jitter seconds (default 0)")
    max_concurrent: int | None = Field(None, strict=True, ge=1, le=1000,
                                       description="syncs of one group running at once (default 5)")
    skip_if_running: bool | None = Field(None, description="skip a run while the group's previous one runs "
                                                           "(default true)")
    enabled: bool | None = None


class ScheduleRequest(Strict):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True, json_schema_extra={"examples": [
        {"action": "create", "schedule": {"name": "hourly", "interval_seconds": 3600, "max_concurrent": 5}},
        {"action": "update", "id": 1, "schedule": {"enabled": False}}, {"action": "run", "id": 1},
        {"action": "get"}]})
    action: Literal["get", "create", "update", "delete", "run"] = Field(
        description="`run`: fire at the next round, whatever the interval (the interval goes on from then)")
    id: Id | None = None
    schedule: ScheduleFields | None = None


class PreflightRequest(Strict):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True, json_schema_extra={"examples": [
        {"vm_names": ["pgtest1"], "ossea_config_id": 1}, {"group_id": 1}]})
    vm_names: list[VmName] | None = Field(None, min_length=1, max_length=MAX_GROUP_VMS)
    group_id: Id | None = None
    ossea_config_id: Id | None = Field(None, description="with vm_names: the target configuration "
                                                         "(a group has its own)")

    @model_validator(mode="after")
    def _one(self) -> PreflightRequest:
        if (self.vm_names is None) == (self.group_id is None):
            raise ValueError("give exactly one of vm_names and group_id")
        if self.vm_names is not None and self.ossea_config_id is None:
            raise ValueError("vm_names needs ossea_config_id (the target the checks are for)")
        return self
