"""schedules, protection_groups, protection_group_vms, schedule_executions, schedule_execution_vms

Revision ID: scheduler_0001
"""
import sqlalchemy as sa
from alembic import op

revision = "scheduler_0001"
down_revision = None


def upgrade() -> None:
    op.create_table(
        "schedules",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(255), nullable=False, unique=True),
        sa.Column("interval_seconds", sa.Integer, nullable=False),
        sa.Column("max_concurrent", sa.Integer, nullable=False),
        sa.Column("skip_if_running", sa.Boolean, nullable=False),
        sa.Column("enabled", sa.Boolean, nullable=False),
        sa.Column("next_run_at", sa.DateTime, nullable=False, index=True),
        sa.Column("last_run_at", sa.DateTime, nullable=True),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("updated_at", sa.DateTime, nullable=False),
    )
    op.create_table(
        "protection_groups",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(255), nullable=False, unique=True),
        sa.Column("description", sa.Text, nullable=True),
        sa.Column("ossea_config_id", sa.Integer, nullable=False),
        sa.Column("schedule_id", sa.Integer, sa.ForeignKey("schedules.id", ondelete="SET NULL"), nullable=True,
                  index=True),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("updated_at", sa.DateTime, nullable=False),
    )
    op.create_table(
        "protection_group_vms",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("group_id", sa.Integer, sa.ForeignKey("protection_groups.id", ondelete="CASCADE"), nullable=False),
        sa.Column("vm_name", sa.String(255), nullable=False),
        sa.Column("added_at", sa.DateTime, nullable=False),
        sa.UniqueConstraint("group_id", "vm_name", name="uq_protection_group_vms_group_vm"),
    )
    op.create_table(
        "schedule_executions",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("execution_id", sa.String(64), nullable=False, unique=True),
        sa.Column("schedule_id", sa.Integer, nullable=True),
        sa.Column("group_id", sa.Integer, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("message", sa.Text, nullable=True),
        sa.Column("started_by", sa.String(128), nullable=False),
        sa.Column("started_at", sa.DateTime, nullable=False),
        sa.Column("finished_at", sa.DateTime, nullable=True),
        sa.Index("ix_schedule_executions_schedule_started", "schedule_id", "started_at"),
        sa.Index("ix_schedule_executions_group_status", "group_id", "status"),
    )
    op.create_table(
        "schedule_execution_vms",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("execution_id", sa.String(64),
                  sa.ForeignKey("schedule_executions.execution_id", ondelete="CASCADE"), nullable=False),
        sa.Column("group_id", sa.Integer, nullable=False),
        sa.Column("vm_name", sa.String(255), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("job_id", sa.String(128), nullable=True),
        sa.Column("reason", sa.Text, nullable=True),
        sa.Column("claimed_by", sa.String(128), nullable=True),
        sa.Column("claimed_at", sa.DateTime, nullable=True),
        sa.Column("finished_at", sa.DateTime, nullable=True),
        sa.UniqueConstraint("execution_id", "vm_name", name="uq_schedule_execution_vms_exec_vm"),
        sa.Index("ix_schedule_execution_vms_group_status", "group_id", "status"),
        sa.Index("ix_schedule_execution_vms_status", "status"),
    )


def downgrade() -> None:
    for table in ("schedule_execution_vms", "schedule_executions", "protection_group_vms", "protection_groups",
                  "schedules"):
        op.drop_table(table)
