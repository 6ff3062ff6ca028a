"""replication_jobs and job_volumes

Revision ID: replication_0001
"""
import sqlalchemy as sa
from alembic import op

revision = "replication_0001"
down_revision = None


def upgrade() -> None:
    op.create_table(
        "replication_jobs",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("job_id", sa.String(64), nullable=False, unique=True),
        sa.Column("vm_id", sa.String(255), nullable=False, index=True),
        sa.Column("vm_uuid", sa.String(64), nullable=True),
        sa.Column("vm_key", sa.String(255), nullable=False, index=True),
        sa.Column("vm_name", sa.String(255), nullable=False, index=True),
        sa.Column("ossea_config_id", sa.Integer, nullable=False),
        sa.Column("replication_type", sa.String(16), nullable=False),
        sa.Column("status", sa.String(20), nullable=False, index=True),
        sa.Column("progress_percent", sa.Float, nullable=False),
        sa.Column("current_operation", sa.String(255), nullable=True),
        sa.Column("bytes_transferred", sa.BigInteger, nullable=False),
        sa.Column("total_bytes", sa.BigInteger, nullable=True),
        sa.Column("vma_throughput_mbps", sa.Float, nullable=True),
        sa.Column("vma_eta_seconds", sa.Integer, nullable=True),
        sa.Column("last_report_ts", sa.Float(precision=53), nullable=True),
        sa.Column("error", sa.Text, nullable=True),
        sa.Column("message", sa.String(255), nullable=True),
        sa.Column("source_vm", sa.Text, nullable=False),
        sa.Column("seq", sa.Integer, nullable=False),
        sa.Column("cleanup_pending", sa.Boolean, nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False, index=True),
        sa.Column("started_at", sa.DateTime, nullable=True),
        sa.Column("ready_at", sa.DateTime, nullable=True),
        sa.Column("completed_at", sa.DateTime, nullable=True),
        sa.Column("updated_at", sa.DateTime, nullable=False),
    )
    op.create_table(
        "job_volumes",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("job_id", sa.String(64), sa.ForeignKey("replication_jobs.job_id", ondelete="CASCADE"),
                  nullable=False, index=True),
        sa.Column("unit_number", sa.Integer, nullable=False),
        sa.Column("disk_id", sa.String(255), nullable=False),
        sa.Column("disk_path", sa.String(1024), nullable=True),
        sa.Column("datastore", sa.String(255), nullable=True),
        sa.Column("capacity_bytes", sa.BigInteger, nullable=True),
        sa.Column("size_gb", sa.Integer, nullable=False),
        sa.Column("volume_id", sa.String(64), nullable=True, index=True),
        sa.Column("volume_name", sa.String(255), nullable=True, index=True),
        sa.Column("device_id", sa.Integer, nullable=True),
        sa.Column("device_path", sa.String(255), nullable=True),
        sa.Column("export_name", sa.String(255), nullable=True),
        sa.Column("export_port", sa.Integer, nullable=True),
        sa.Column("reused", sa.Boolean, nullable=False),
        sa.Column("created_by_job", sa.Boolean, nullable=False),
        sa.Column("holds_volume", sa.Boolean, nullable=False, index=True),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("error", sa.Text, nullable=True),
        sa.Column("previous_change_id", sa.String(255), nullable=True),
        sa.Column("change_id", sa.String(255), nullable=True),
        sa.Column("bytes_transferred", sa.BigInteger, nullable=False),
        sa.Column("total_bytes", sa.BigInteger, nullable=True),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("updated_at", sa.DateTime, nullable=False),
        sa.UniqueConstraint("job_id", "unit_number", name="uq_job_volumes_job_unit"),
    )


def downgrade() -> None:
    op.drop_table("job_volumes")
    op.drop_table("replication_jobs")
