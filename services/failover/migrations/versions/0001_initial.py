"""failover_jobs, failover_steps, failover_resources, failover_locks, network_mappings

Revision ID: failover_0001
"""
import sqlalchemy as sa
from alembic import op

revision = "failover_0001"
down_revision = None


def upgrade() -> None:
    op.create_table(
        "failover_jobs",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("failover_id", sa.String(64), nullable=False, unique=True),
        sa.Column("action", sa.String(16), nullable=False),
        sa.Column("vm_name", sa.String(255), nullable=False, index=True),
        sa.Column("status", sa.String(24), nullable=False, index=True),
        sa.Column("current_step", sa.String(64), nullable=True),
        sa.Column("target_id", sa.String(64), nullable=True),
        sa.Column("ossea_config_id", sa.Integer, nullable=True),
        sa.Column("replication_job_id", sa.String(64), nullable=True),
        sa.Column("options", sa.Text, nullable=False),
        sa.Column("plan", sa.Text, nullable=False),
        sa.Column("error", sa.Text, nullable=True),
        sa.Column("created_at", sa.DateTime, nullable=False, index=True),
        sa.Column("completed_at", sa.DateTime, nullable=True),
        sa.Column("updated_at", sa.DateTime, nullable=False),
    )
    op.create_table(
        "failover_steps",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("failover_id", sa.String(64), sa.ForeignKey("failover_jobs.failover_id", ondelete="CASCADE"),
                  nullable=False, index=True),
        sa.Column("position", sa.Integer, nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("error", sa.Text, nullable=True),
        sa.Column("started_at", sa.DateTime, nullable=True),
        sa.Column("completed_at", sa.DateTime, nullable=True),
        sa.Column("duration_seconds", sa.Float, nullable=True),
        sa.UniqueConstraint("failover_id", "position", name="uq_failover_steps_job_position"),
    )
    op.create_table(
        "failover_resources",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("failover_id", sa.String(64), sa.ForeignKey("failover_jobs.failover_id", ondelete="CASCADE"),
                  nullable=False, index=True),
        sa.Column("step", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("ordinal", sa.Integer, nullable=False),
        sa.Column("name", sa.String(255), nullable=False, index=True),
        sa.Column("cloud_id", sa.String(64), nullable=True),
        sa.Column("source_id", sa.String(64), nullable=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("updated_at", sa.DateTime, nullable=False),
        sa.UniqueConstraint("failover_id", "kind", "ordinal", name="uq_failover_resources_slot"),
    )
    op.create_table(
        "failover_locks",
        sa.Column("vm_name", sa.String(255), primary_key=True),
        sa.Column("failover_id", sa.String(64), nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False),
    )
    op.create_table(
        "network_mappings",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("vcenter", sa.String(255), nullable=False),
        sa.Column("source_network", sa.String(255), nullable=False),
        sa.Column("production_network_id", sa.String(64), nullable=True),
        sa.Column("test_network_id", sa.String(64), nullable=True),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("updated_at", sa.DateTime, nullable=False),
        sa.UniqueConstraint("vcenter", "source_network", name="uq_network_mappings_source"),
    )


def downgrade() -> None:
    for table in ("network_mappings", "failover_locks", "failover_resources", "failover_steps", "failover_jobs"):
        op.drop_table(table)
