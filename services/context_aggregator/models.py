"""The per-VM read model. Every value, timestamps included, comes from events, so a replay of the
stream rebuilds exactly the same rows (REBUILD relies on it)."""
from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    BigInteger,
    DateTime,
    Double,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.dialects import mysql
from sqlalchemy.orm import Mapped, mapped_column

from oma.shared.db import Base

# Millisecond event times: MariaDB's plain DATETIME would drop them and break "newest first".
Stamp = DateTime().with_variant(mysql.DATETIME(fsp=3), "mysql", "mariadb")


class VmContext(Base):
    __tablename__ = "vm_contexts"
    __table_args__ = (Index("ix_vm_contexts_status_name", "current_status", "vm_name"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    context_id: Mapped[str] = mapped_column(String(300), unique=True)
    vm_name: Mapped[str] = mapped_column(String(255), unique=True)
    # Names as the original appliance's GUI reads them (docs/vm-contexts.md).
    vmware_vm_id: Mapped[str | None] = mapped_column(String(255))
    vm_uuid: Mapped[str | None] = mapped_column(String(64))
    vcenter_host: Mapped[str | None] = mapped_column(String(255))
    path: Mapped[str | None] = mapped_column(String(1024))
    datacenter: Mapped[str | None] = mapped_column(String(255))
    cpu_count: Mapped[int | None] = mapped_column(Integer)
    memory_mb: Mapped[int | None] = mapped_column(Integer)
    os_type: Mapped[str | None] = mapped_column(String(128))       # the inventory's guest OS id
    power_state: Mapped[str | None] = mapped_column(String(32))    # from the inventory
    current_status: Mapped[str] = mapped_column(String(32))
    current_job_id: Mapped[str | None] = mapped_column(String(128))
    total_jobs_run: Mapped[int] = mapped_column(Integer, default=0)
    successful_jobs: Mapped[int] = mapped_column(Integer, default=0)
    failed_jobs: Mapped[int] = mapped_column(Integer, default=0)
    inventory_at: Mapped[datetime | None] = mapped_column(Stamp)  # newest inventory event applied
    last_job_at: Mapped[datetime | None] = mapped_column(Stamp)  # newest job event applied
    created_at: Mapped[datetime] = mapped_column(Stamp)
    updated_at: Mapped[datetime] = mapped_column(Stamp)


class ContextJob(Base):
    """A job summary as the last applied event (`last_seq`) described it."""
    __tablename__ = "context_jobs"
    __table_args__ = (Index("ix_context_jobs_vm_created", "vm_name", "created_at", "job_id"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[str] = mapped_column(String(128), unique=True)
    vm_name: Mapped[str] = mapped_column(String(255))
    status: Mapped[str] = mapped_column(String(32))
    replication_type: Mapped[str | None] = mapped_column(String(32))
    progress_percent: Mapped[float | None] = mapped_column(Double)
    current_operation: Mapped[str | None] = mapped_column(String(255))
    vma_throughput_mbps: Mapped[float | None] = mapped_column(Double)
    vma_eta_seconds: Mapped[int | None] = mapped_column(BigInteger)
    bytes_transferred: Mapped[int | None] = mapped_column(BigInteger)
    total_bytes: Mapped[int | None] = mapped_column(BigInteger)
    error: Mapped[str | None] = mapped_column(Text)
    vma_sync_type: Mapped[str | None] = mapped_column(String(16))  # full | incremental
    # What the original's scheduler sent with the job.
    schedule_execution_id: Mapped[str | None] = mapped_column(String(255))
    vm_group_id: Mapped[str | None] = mapped_column(String(255))
    scheduled_by: Mapped[str | None] = mapped_column(String(255))
    existing_context_id: Mapped[str | None] = mapped_column(String(255))
    counted_outcome: Mapped[str | None] = mapped_column(String(16))  # which counter holds this job
    created_at: Mapped[datetime] = mapped_column(Stamp)
    started_at: Mapped[datetime | None] = mapped_column(Stamp)
    completed_at: Mapped[datetime | None] = mapped_column(Stamp)
    updated_at: Mapped[datetime] = mapped_column(Stamp)
    last_seq: Mapped[int] = mapped_column(Integer)


class ContextDisk(Base):
    __tablename__ = "context_disks"
    __table_args__ = (UniqueConstraint("vm_name", "unit_number", name="uq_context_disks_vm_unit"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    vm_name: Mapped[str] = mapped_column(String(255))
    unit_number: Mapped[int] = mapped_column(Integer)
    disk_id: Mapped[str | None] = mapped_column(String(255))
    path: Mapped[str | None] = mapped_column(String(1024))
    size_gb: Mapped[float | None] = mapped_column(Double)
    capacity_bytes: Mapped[int | None] = mapped_column(BigInteger)
    datastore: Mapped[str | None] = mapped_column(String(255))
    volume_id: Mapped[str | None] = mapped_column(String(255))
    device_path: Mapped[str | None] = mapped_column(String(255))
    export_name: Mapped[str | None] = mapped_column(String(255))
    change_id: Mapped[str | None] = mapped_column(String(255))  # the last completed job's


class CbtRecord(Base):
    __tablename__ = "cbt_history"
    __table_args__ = (UniqueConstraint("job_id", "unit_number", name="uq_cbt_history_job_unit"),
                      Index("ix_cbt_history_vm_recorded", "vm_name", "recorded_at"))
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    vm_name: Mapped[str] = mapped_column(String(255))
    job_id: Mapped[str] = mapped_column(String(128))
    unit_number: Mapped[int] = mapped_column(Integer)
    change_id: Mapped[str] = mapped_column(String(255))
    previous_change_id: Mapped[str | None] = mapped_column(String(255))  # the base of the job's delta
    recorded_at: Mapped[datetime] = mapped_column(Stamp)


class ReadModelState(Base):
    """The highest stream sequence the model holds: lets start-up notice a database that is behind
    its durable consumer (a fresh memory database) and replay what it misses."""
    __tablename__ = "context_readmodel_state"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    last_stream_seq: Mapped[int] = mapped_column(BigInteger, default=0)
