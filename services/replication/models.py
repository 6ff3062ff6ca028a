"""`replication_jobs` and their per-disk records `job_volumes`.

A volume lives longer than the job that created it (the next incremental job of the VM reuses it),
so exactly one `job_volumes` row *holds* each live volume (`holds_volume`): the row of the job that
created it, then of each job that took it over. The number of holding rows is the number of disks
the appliance's VM carries (or is about to carry): the capacity count.
"""
from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column

from oma.shared.db import Base, utcnow

from oma.shared.schemas import (  # noqa: F401  (the job statuses, named here by the replication modules)
    CANCELLED,
    COMPLETED,
    FAILED,
    JOB_STATUSES,
    PROVISIONING,
    QUEUED,
    READY,
    REPLICATING,
    STALLED,
)

IN_FLIGHT = (QUEUED, PROVISIONING, READY, REPLICATING, STALLED)
FINISHED = (COMPLETED, FAILED, CANCELLED)

# Disk statuses, in step order; `released` = volume detached and deleted, `handed_over` = a later
# job of the same VM holds the volume now.
D_QUEUED, D_PENDING, D_CREATING, D_CREATED, D_ATTACHING = "queued", "pending", "creating", "created", "attaching"
D_ATTACHED, D_EXPORTING, D_READY, D_FAILED = "attached", "exporting", "ready", "failed"
D_CANCELLED, D_RELEASED, D_HANDED_OVER = "cancelled", "released", "handed_over"

# Request fields of the original's clients kept on the job under the same names (docs/replication.md).
ORIGINAL_FIELDS = ("vcenter_host", "target_network", "change_id", "previous_change_id", "snapshot_id",
                   "schedule_execution_id", "vm_group_id", "scheduled_by", "existing_context_id")


class ReplicationJob(Base):
    __tablename__ = "replication_jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)  # FIFO order
    job_id: Mapped[str] = mapped_column(String(64), unique=True)
    vm_id: Mapped[str] = mapped_column(String(255), index=True)        # source_vm.id (vCenter moref)
    vm_uuid: Mapped[str | None] = mapped_column(String(64))
    vm_key: Mapped[str] = mapped_column(String(255), index=True)       # uuid or id: the exports' vm_id
    vm_name: Mapped[str] = mapped_column(String(255), index=True)
    ossea_config_id: Mapped[int] = mapped_column(Integer)
    oma_vm_id: Mapped[str | None] = mapped_column(String(64), index=True)  # the VM its volumes attach to
    lease_until: Mapped[datetime | None] = mapped_column(DateTime)     # the provisioning process's claim
    replication_type: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(20), index=True)
    progress_percent: Mapped[float] = mapped_column(Float, default=0.0)
    current_operation: Mapped[str | None] = mapped_column(String(255))
    bytes_transferred: Mapped[int] = mapped_column(BigInteger, default=0)
    total_bytes: Mapped[int | None] = mapped_column(BigInteger)
    vma_throughput_mbps: Mapped[float | None] = mapped_column(Float)
    vma_eta_seconds: Mapped[int | None] = mapped_column(Integer)
    last_report_ts: Mapped[float | None] = mapped_column(Float(precision=53))  # epoch seconds
    error: Mapped[str | None] = mapped_column(Text)
    message: Mapped[str | None] = mapped_column(String(255))
    source_vm: Mapped[str] = mapped_column(Text)                       # the request's source_vm, JSON
    seq: Mapped[int] = mapped_column(Integer, default=0)               # last event seq published
    cleanup_pending: Mapped[bool] = mapped_column(Boolean, default=False)
    # What the original appliance's GUI and scheduler send (ORIGINAL_FIELDS), as given.
    vcenter_host: Mapped[str | None] = mapped_column(String(255))        # the inventory's host once checked
    target_network: Mapped[str | None] = mapped_column(String(255))      # the VM's default network mapping
    change_id: Mapped[str | None] = mapped_column(String(255))
    previous_change_id: Mapped[str | None] = mapped_column(String(255))  # seeds disks that carry none
    snapshot_id: Mapped[str | None] = mapped_column(String(255))
    schedule_execution_id: Mapped[str | None] = mapped_column(String(255))
    vm_group_id: Mapped[str | None] = mapped_column(String(255))
    scheduled_by: Mapped[str | None] = mapped_column(String(255))
    existing_context_id: Mapped[str | None] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, index=True)
    started_at: Mapped[datetime | None] = mapped_column(DateTime)
    ready_at: Mapped[datetime | None] = mapped_column(DateTime)
    completed_at: Mapped[datetime | None] = mapped_column(DateTime)
    updated_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, onupdate=utcnow)
    # Orchestration (services/replication/driver.py).
    # (vcenter_host above: the vCenter, and so the VMA; empty: source_vm.vcenter)
    start_sync: Mapped[bool | None] = mapped_column(Boolean)       # None: when the vCenter has a VMA
    stalled_at: Mapped[datetime | None] = mapped_column(DateTime)


class JobVolume(Base):
    __tablename__ = "job_volumes"
    __table_args__ = (UniqueConstraint("job_id", "unit_number", name="uq_job_volumes_job_unit"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(String(64), ForeignKey("replication_jobs.job_id", ondelete="CASCADE"),
                                        index=True)
    unit_number: Mapped[int] = mapped_column(Integer)
    disk_id: Mapped[str] = mapped_column(String(255))
    disk_path: Mapped[str | None] = mapped_column(String(1024))
    datastore: Mapped[str | None] = mapped_column(String(255))
    capacity_bytes: Mapped[int | None] = mapped_column(BigInteger)
    size_gb: Mapped[int] = mapped_column(Integer)                      # rounded up to whole GiB
    volume_id: Mapped[str | None] = mapped_column(String(64), index=True)
    volume_name: Mapped[str | None] = mapped_column(String(255), index=True)
    device_id: Mapped[int | None] = mapped_column(Integer)
    device_path: Mapped[str | None] = mapped_column(String(255))
    export_name: Mapped[str | None] = mapped_column(String(255))
    export_port: Mapped[int | None] = mapped_column(Integer)
    export_uri: Mapped[str | None] = mapped_column(String(1024))       # nbd:// or nbds://...?tls-psk-file=
    reused: Mapped[bool] = mapped_column(Boolean, default=False)
    created_by_job: Mapped[bool] = mapped_column(Boolean, default=False)
    holds_volume: Mapped[bool] = mapped_column(Boolean, default=False, index=True)
    status: Mapped[str] = mapped_column(String(20))
    error: Mapped[str | None] = mapped_column(Text)
    previous_change_id: Mapped[str | None] = mapped_column(String(255))  # the base of a CBT delta
    change_id: Mapped[str | None] = mapped_column(String(255))           # reported on completion
    detach_job_id: Mapped[str | None] = mapped_column(String(64))        # cleanup's detach, until it is done
    bytes_transferred: Mapped[int] = mapped_column(BigInteger, default=0)
    total_bytes: Mapped[int | None] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, onupdate=utcnow)


class ApplianceSlots(Base):
    """One row per appliance VM: admission locks it (SELECT ... FOR UPDATE), so every replication
    process decides in turn; `learned_capacity` is what the cloud's refusals showed the VM can hold
    for OMA (None: the setting alone)."""
    __tablename__ = "appliance_slots"

    oma_vm_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    learned_capacity: Mapped[int | None] = mapped_column(Integer)
    learned_reason: Mapped[str | None] = mapped_column(String(255))
    learned_at: Mapped[datetime | None] = mapped_column(DateTime)


class QuiescedVm(Base):
    """A source VM whose syncs a test failover paused while it snapshots the replica (services/
    replication/handover.py): no new job of the VM is admitted until the failover resumes them."""
    __tablename__ = "quiesced_vms"

    vm_key: Mapped[str] = mapped_column(String(255), primary_key=True)
    vm_name: Mapped[str] = mapped_column(String(255))
    failover_id: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class FailedOverVm(Base):
    """A source VM whose live cutover runs it in OSSEA on the replica volumes (services/replication/
    handover.py). Its holding rows keep holding (the appliance's slots stay reserved for a rollback),
    but no cleanup, delete or new sync touches the volumes until the failover service gives them back."""
    __tablename__ = "failed_over_vms"

    vm_key: Mapped[str] = mapped_column(String(255), primary_key=True)
    vm_name: Mapped[str] = mapped_column(String(255))
    failover_id: Mapped[str] = mapped_column(String(64))
    job_id: Mapped[str] = mapped_column(String(64))       # the job holding the volumes at the cutover
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
