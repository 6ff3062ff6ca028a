"""The scheduler's tables: schedules, protection groups and their VMs, executions and each VM's part
in one. Who starts a VM is decided in these rows (services/scheduler/service.py), so any number of
scheduler processes may share the database."""
from __future__ import annotations

from datetime import datetime

from sqlalchemy import Boolean, DateTime, ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from oma.shared.db import Base

# Execution states, and those of a VM in one.
E_RUNNING, E_COMPLETED, E_SKIPPED = "running", "completed", "skipped"
V_PENDING, V_STARTING, V_RUNNING = "pending", "starting", "running"
V_COMPLETED, V_FAILED, V_SKIPPED = "completed", "failed", "skipped"
V_ACTIVE = (V_STARTING, V_RUNNING)        # count against the group's max_concurrent
V_OPEN = (V_PENDING, *V_ACTIVE)           # the execution is not over
V_STATES = (V_PENDING, V_STARTING, V_RUNNING, V_COMPLETED, V_FAILED, V_SKIPPED)


class Schedule(Base):
    __tablename__ = "schedules"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(255), unique=True)
    interval_seconds: Mapped[int | None] = mapped_column(Integer)  # this or cron
    cron: Mapped[str | None] = mapped_column(String(255))
    window_start: Mapped[str | None] = mapped_column(String(5))  # "HH:MM" UTC: fires only inside
    window_end: Mapped[str | None] = mapped_column(String(5))
    jitter_seconds: Mapped[int] = mapped_column(Integer, default=0)
    max_concurrent: Mapped[int] = mapped_column(Integer)
    skip_if_running: Mapped[bool] = mapped_column(Boolean)
    enabled: Mapped[bool] = mapped_column(Boolean)
    # The claim: a process fires the schedule by moving next_run_at from the value it read.
    next_run_at: Mapped[datetime] = mapped_column(DateTime, index=True)
    last_run_at: Mapped[datetime | None] = mapped_column(DateTime)
    created_at: Mapped[datetime] = mapped_column(DateTime)
    updated_at: Mapped[datetime] = mapped_column(DateTime)


class ProtectionGroup(Base):
    __tablename__ = "protection_groups"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(255), unique=True)
    description: Mapped[str | None] = mapped_column(Text)
    ossea_config_id: Mapped[int] = mapped_column(Integer)
    schedule_id: Mapped[int | None] = mapped_column(ForeignKey("schedules.id", ondelete="SET NULL"), index=True)
    vm_filter: Mapped[str | None] = mapped_column(Text)  # JSON: the inventory's VMs that belong too
    defaults: Mapped[str | None] = mapped_column(Text)  # JSON: failover's options when a request gives none
    created_at: Mapped[datetime] = mapped_column(DateTime)
    updated_at: Mapped[datetime] = mapped_column(DateTime)


class GroupVm(Base):
    __tablename__ = "protection_group_vms"
    __table_args__ = (UniqueConstraint("group_id", "vm_name", name="uq_protection_group_vms_group_vm"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    group_id: Mapped[int] = mapped_column(ForeignKey("protection_groups.id", ondelete="CASCADE"))
    vm_name: Mapped[str] = mapped_column(String(255))
    added_at: Mapped[datetime] = mapped_column(DateTime)


class Execution(Base):
    __tablename__ = "schedule_executions"
    __table_args__ = (Index("ix_schedule_executions_schedule_started", "schedule_id", "started_at"),
                      Index("ix_schedule_executions_group_status", "group_id", "status"))
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    execution_id: Mapped[str] = mapped_column(String(64), unique=True)  # schedule_execution_id on the jobs
    schedule_id: Mapped[int | None] = mapped_column(Integer)
    group_id: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16))
    message: Mapped[str | None] = mapped_column(Text)
    started_by: Mapped[str] = mapped_column(String(128))  # the scheduler process that fired it
    started_at: Mapped[datetime] = mapped_column(DateTime)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime)


class ExecutionVm(Base):
    __tablename__ = "schedule_execution_vms"
    __table_args__ = (UniqueConstraint("execution_id", "vm_name", name="uq_schedule_execution_vms_exec_vm"),
                      Index("ix_schedule_execution_vms_group_status", "group_id", "status"),
                      Index("ix_schedule_execution_vms_status", "status"))
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    execution_id: Mapped[str] = mapped_column(ForeignKey("schedule_executions.execution_id", ondelete="CASCADE"))
    group_id: Mapped[int] = mapped_column(Integer)
    vm_name: Mapped[str] = mapped_column(String(255))
    status: Mapped[str] = mapped_column(String(16))
    job_id: Mapped[str | None] = mapped_column(String(128))
    reason: Mapped[str | None] = mapped_column(Text)
    claimed_by: Mapped[str | None] = mapped_column(String(128))  # the process that started (or starts) it
    claimed_at: Mapped[datetime | None] = mapped_column(DateTime)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime)
