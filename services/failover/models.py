"""`failover_jobs`, their `failover_steps`, the cloud `failover_resources` they create, the per-VM
`failover_locks` (one active failover per VM) and `network_mappings`.

A resource row is written with its unique name before the cloud is asked to create it, and gets the
cloud id as soon as the cloud answers: whatever stops the service, the rows name everything a job may
have created, and resume or compensation finds it (by id, else by name).
"""
from __future__ import annotations

from datetime import datetime

from sqlalchemy import DateTime, Float, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from oma.shared.db import Base, utcnow

# Job statuses.
RUNNING, COMPLETED, FAILED = "running", "completed", "failed"
COMPENSATING, COMPENSATED, COMPENSATION_FAILED = "compensating", "compensated", "compensation_failed"
CLEANED_UP = "cleaned_up"    # a test failover whose cleanup finished
ROLLED_BACK = "rolled_back"  # a live cutover whose rollback finished
JOB_STATUSES = (RUNNING, COMPLETED, FAILED, COMPENSATING, COMPENSATED, COMPENSATION_FAILED, CLEANED_UP, ROLLED_BACK)
ACTIVE = (RUNNING, COMPENSATING)  # a task works on the job; resumed after a restart

# Step statuses.
S_PENDING, S_RUNNING, S_DONE, S_FAILED = "pending", "running", "done", "failed"
S_COMPENSATING, S_COMPENSATED = "compensating", "compensated"

# Resource states.
R_PLANNED, R_CREATED, R_DELETED = "planned", "created", "deleted"


class FailoverJob(Base):
    __tablename__ = "failover_jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    failover_id: Mapped[str] = mapped_column(String(64), unique=True)
    action: Mapped[str] = mapped_column(String(16))
    vm_name: Mapped[str] = mapped_column(String(255), index=True)
    status: Mapped[str] = mapped_column(String(24), index=True)
    current_step: Mapped[str | None] = mapped_column(String(64))
    target_id: Mapped[str | None] = mapped_column(String(64))      # cleanup: the test failover it undoes
    ossea_config_id: Mapped[int | None] = mapped_column(Integer)
    replication_job_id: Mapped[str | None] = mapped_column(String(64))
    options: Mapped[str] = mapped_column(Text)                     # the request's options, JSON
    plan: Mapped[str] = mapped_column(Text)                        # resolved inputs (disks, NICs, ids), JSON
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, index=True)
    completed_at: Mapped[datetime | None] = mapped_column(DateTime)
    updated_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, onupdate=utcnow)


class FailoverStep(Base):
    __tablename__ = "failover_steps"
    __table_args__ = (UniqueConstraint("failover_id", "position", name="uq_failover_steps_job_position"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    failover_id: Mapped[str] = mapped_column(String(64), ForeignKey("failover_jobs.failover_id",
                                                                    ondelete="CASCADE"), index=True)
    position: Mapped[int] = mapped_column(Integer)
    name: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text)
    started_at: Mapped[datetime | None] = mapped_column(DateTime)
    completed_at: Mapped[datetime | None] = mapped_column(DateTime)
    duration_seconds: Mapped[float | None] = mapped_column(Float)


class FailoverResource(Base):
    __tablename__ = "failover_resources"
    __table_args__ = (UniqueConstraint("failover_id", "kind", "ordinal", name="uq_failover_resources_slot"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    failover_id: Mapped[str] = mapped_column(String(64), ForeignKey("failover_jobs.failover_id",
                                                                    ondelete="CASCADE"), index=True)
    step: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(16))                  # snapshot, volume, vm, stub_root
    ordinal: Mapped[int] = mapped_column(Integer)                  # the disk's place in source order
    name: Mapped[str] = mapped_column(String(255), index=True)
    cloud_id: Mapped[str | None] = mapped_column(String(64))
    source_id: Mapped[str | None] = mapped_column(String(64))      # the replica volume / snapshot it came from
    state: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, onupdate=utcnow)


class FailoverLock(Base):
    """One row per VM with a failover in progress or a test VM up: the primary key is the lock."""
    __tablename__ = "failover_locks"

    vm_name: Mapped[str] = mapped_column(String(255), primary_key=True)
    failover_id: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class NetworkMapping(Base):
    __tablename__ = "network_mappings"
    __table_args__ = (UniqueConstraint("vcenter", "source_network", name="uq_network_mappings_source"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    vcenter: Mapped[str] = mapped_column(String(255))              # "" = any vCenter
    source_network: Mapped[str] = mapped_column(String(255))
    production_network_id: Mapped[str | None] = mapped_column(String(64))
    test_network_id: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, onupdate=utcnow)
