"""The events the read model consumes (docs/events.md), validated before anything is written:
an event that does not parse is malformed, never half-applied."""
from __future__ import annotations

from datetime import datetime, timezone
from typing import Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from oma.shared.disk_slot import SlotNumber, slot_number
from oma.shared.schemas import JOB_STATUSES
from oma.shared.service import validation_details
from oma.shared.subjects import Failover, Inventory, Replication

# Metric label values: bounded, whatever subject a producer invents.
KNOWN_TYPES = ("created", "status_changed", "progressed", "completed", "failed", "discovered")


class Malformed(ValueError):
    """The event can never be applied: it is dead-lettered after max_deliver."""


class _Event(BaseModel):
    model_config = ConfigDict(extra="ignore")
    event_id: str = Field(min_length=1, max_length=255)
    occurred_at: datetime

    @field_validator("occurred_at", "created_at", "started_at", "completed_at", check_fields=False)
    @classmethod
    def _naive_utc(cls, v: datetime | None) -> datetime | None:
        if v is not None and v.tzinfo is not None:
            v = v.astimezone(timezone.utc).replace(tzinfo=None)
        return v


class EventVm(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str = Field(min_length=1, max_length=255)
    id: str | None = Field(None, max_length=255)
    uuid: str | None = Field(None, max_length=64)
    path: str | None = Field(None, max_length=1024)
    datacenter: str | None = Field(None, max_length=255)
    cpus: int | None = Field(None, ge=0)
    memory_mb: int | None = Field(None, ge=0)
    guest_os: str | None = Field(None, max_length=128)     # inventory only
    power_state: str | None = Field(None, max_length=32)   # inventory only


class EventDisk(BaseModel):
    """A job's disk (`unit_number` is its slot) or an inventory disk (a unit on its controller)."""
    model_config = ConfigDict(extra="ignore")
    unit_number: SlotNumber | None = None
    controller_type: str | None = Field(None, max_length=64)      # inventory only
    controller_bus_number: int | None = Field(None, ge=0, le=1024)  # inventory only
    disk_id: str | None = Field(None, max_length=255)
    id: str | None = Field(None, max_length=255)  # inventory's name for disk_id
    path: str | None = Field(None, max_length=1024)
    size_gb: float | None = Field(None, ge=0)
    capacity_bytes: int | None = Field(None, ge=0)
    datastore: str | None = Field(None, max_length=255)
    volume_id: str | None = Field(None, max_length=255)
    device_path: str | None = Field(None, max_length=255)
    export_name: str | None = Field(None, max_length=255)
    change_id: str | None = Field(None, max_length=255)
    previous_change_id: str | None = Field(None, max_length=255)  # job only: the base of its delta

    def slot(self, position: int) -> int:
        """The disk's slot, as replication numbers it (shared/disk_slot.py)."""
        return slot_number(self.controller_type, self.controller_bus_number, self.unit_number, position)


class JobEvent(_Event):
    job_id: str = Field(min_length=1, max_length=128)
    seq: int = Field(ge=1)
    vm: EventVm
    status: Literal[JOB_STATUSES]  # type: ignore[valid-type]
    replication_type: str | None = Field(None, max_length=32)
    progress_percent: float | None = None
    current_operation: str | None = Field(None, max_length=255)
    vma_throughput_mbps: float | None = None
    vma_eta_seconds: int | None = None
    bytes_transferred: int | None = Field(None, ge=0)
    total_bytes: int | None = Field(None, ge=0)
    created_at: datetime | None = None
    started_at: datetime | None = None
    completed_at: datetime | None = None
    error: str | None = None
    vma_sync_type: str | None = Field(None, max_length=16)
    vcenter_host: str | None = Field(None, max_length=255)
    schedule_execution_id: str | None = Field(None, max_length=255)
    vm_group_id: str | None = Field(None, max_length=255)
    scheduled_by: str | None = Field(None, max_length=255)
    existing_context_id: str | None = Field(None, max_length=255)
    disks: list[EventDisk] = Field(default_factory=list, max_length=64)

    @field_validator("disks")
    @classmethod
    def _units(cls, disks: list[EventDisk]) -> list[EventDisk]:
        if any(d.unit_number is None for d in disks):
            raise ValueError("every disk needs a unit_number")
        return disks


class InventoryEvent(_Event):
    vcenter: str | None = None
    vm: EventVm
    disks: list[EventDisk] = Field(default_factory=list, max_length=64)  # from vm.disks
    change: Literal["new", "changed", "gone"] = "new"


# The VM context statuses a failover sets (services/failover/service.py CONTEXT_STATUS).
FAILOVER_STATUSES = ("ready_for_failover", "failing_over", "failed_over_test", "failed_over_live",
                     "cleaning_up", "rolled_back")


class FailoverEvent(_Event):
    failover_id: str = Field(min_length=1, max_length=64)
    action: str = Field(max_length=16)
    vm_name: str = Field(min_length=1, max_length=255)
    status: str = Field(max_length=24)
    context_status: Literal[FAILOVER_STATUSES] | None = None  # type: ignore[valid-type]

    @property
    def vm(self) -> EventVm:
        return EventVm(name=self.vm_name)


def event_type(subject: str) -> str:
    last = subject.rsplit(".", 1)[-1]
    return last if last in KNOWN_TYPES else "other"


def parse(subject: str, data: bytes) -> JobEvent | InventoryEvent | FailoverEvent:
    """Decode and validate one event; raise Malformed naming what is wrong (never the data)."""
    try:
        raw = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise Malformed(f"not JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise Malformed("not a JSON object")
    try:
        if subject.startswith(Replication.EVT_PREFIX + "."):
            return JobEvent.model_validate(raw)
        if subject == Inventory.EVT_DISCOVERED:
            vm = raw.get("vm")
            disks = vm.get("disks") if isinstance(vm, dict) else None
            return InventoryEvent.model_validate({**raw, "disks": disks or []})
        if subject == Failover.EVT_STATUS:
            return FailoverEvent.model_validate(raw)
    except ValidationError as exc:
        raise Malformed(validation_details(exc.errors())) from None
    raise Malformed(f"unexpected subject {subject}")
