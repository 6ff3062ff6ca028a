"""vm_contexts, context_jobs, context_disks, cbt_history, context_readmodel_state

Revision ID: context_aggregator_0001
"""
import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision = "context_aggregator_0001"
down_revision = None

# Millisecond precision on MariaDB (plain DATETIME drops it).
Stamp = sa.DateTime().with_variant(mysql.DATETIME(fsp=3), "mysql", "mariadb")


def upgrade() -> None:
    op.create_table(
        "vm_contexts",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("context_id", sa.String(300), nullable=False, unique=True),
        sa.Column("vm_name", sa.String(255), nullable=False, unique=True),
        sa.Column("vm_id", sa.String(255)),
        sa.Column("vm_uuid", sa.String(64)),
        sa.Column("path", sa.String(1024)),
        sa.Column("datacenter", sa.String(255)),
        sa.Column("cpus", sa.Integer),
        sa.Column("memory_mb", sa.Integer),
        sa.Column("current_status", sa.String(32), nullable=False),
        sa.Column("current_job_id", sa.String(128)),
        sa.Column("total_jobs_run", sa.Integer, nullable=False, server_default="0"),
        sa.Column("successful_jobs", sa.Integer, nullable=False, server_default="0"),
        sa.Column("failed_jobs", sa.Integer, nullable=False, server_default="0"),
        sa.Column("inventory_at", Stamp),
        sa.Column("last_event_at", Stamp, nullable=False),
        sa.Column("created_at", Stamp, nullable=False),
        sa.Column("updated_at", Stamp, nullable=False),
    )
    op.create_index("ix_vm_contexts_status_name", "vm_contexts", ["current_status", "vm_name"])

    op.create_table(
        "context_jobs",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("job_id", sa.String(128), nullable=False, unique=True),
        sa.Column("vm_name", sa.String(255), nullable=False),
        sa.Column("status", sa.String(32), nullable=False),
        sa.Column("replication_type", sa.String(32)),
        sa.Column("progress_percent", sa.Double),
        sa.Column("current_operation", sa.String(255)),
        sa.Column("vma_throughput_mbps", sa.Double),
        sa.Column("vma_eta_seconds", sa.BigInteger),
        sa.Column("bytes_transferred", sa.BigInteger),
        sa.Column("total_bytes", sa.BigInteger),
        sa.Column("error", sa.Text),
        sa.Column("counted_outcome", sa.String(16)),
        sa.Column("created_at", Stamp, nullable=False),
        sa.Column("started_at", Stamp),
        sa.Column("completed_at", Stamp),
        sa.Column("updated_at", Stamp, nullable=False),
        sa.Column("last_seq", sa.Integer, nullable=False),
    )
    op.create_index("ix_context_jobs_vm_created", "context_jobs", ["vm_name", "created_at", "job_id"])

    op.create_table(
        "context_disks",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("vm_name", sa.String(255), nullable=False),
        sa.Column("unit_number", sa.Integer, nullable=False),
        sa.Column("disk_id", sa.String(255)),
        sa.Column("path", sa.String(1024)),
        sa.Column("size_gb", sa.Double),
        sa.Column("capacity_bytes", sa.BigInteger),
        sa.Column("datastore", sa.String(255)),
        sa.Column("volume_id", sa.String(255)),
        sa.Column("device_path", sa.String(255)),
        sa.Column("export_name", sa.String(255)),
        sa.Column("change_id", sa.String(255)),
        sa.UniqueConstraint("vm_name", "unit_number", name="uq_context_disks_vm_unit"),
    )

    op.create_table(
        "cbt_history",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("vm_name", sa.String(255), nullable=False),
        sa.Column("job_id", sa.String(128), nullable=False),
        sa.Column("unit_number", sa.Integer, nullable=False),
        sa.Column("change_id", sa.String(255), nullable=False),
        sa.Column("recorded_at", Stamp, nullable=False),
        sa.UniqueConstraint("job_id", "unit_number", name="uq_cbt_history_job_unit"),
    )
    op.create_index("ix_cbt_history_vm_recorded", "cbt_history", ["vm_name", "recorded_at"])

    op.create_table(
        "context_readmodel_state",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("last_stream_seq", sa.BigInteger, nullable=False, server_default="0"),
    )


def downgrade() -> None:
    for table in ("context_readmodel_state", "cbt_history", "context_disks", "context_jobs", "vm_contexts"):
        op.drop_table(table)
