"""appliance_slots: one row per appliance VM, locked to decide admission (so several replication
processes never over-admit) and holding the capacity learnt from the cloud's refusals;
replication_jobs.oma_vm_id: the appliance VM a job's volumes attach to; replication_jobs.lease_until:
how long the process provisioning a job holds it (renewed while it works; another copy resumes the
job once it lapses).

Revision ID: replication_0004
"""
import sqlalchemy as sa
from alembic import op

revision = "replication_0004"
down_revision = "replication_0003"


def upgrade() -> None:
    op.create_table(
        "appliance_slots",
        sa.Column("oma_vm_id", sa.String(64), primary_key=True),
        sa.Column("learned_capacity", sa.Integer, nullable=True),
        sa.Column("learned_reason", sa.String(255), nullable=True),
        sa.Column("learned_at", sa.DateTime, nullable=True),
    )
    op.add_column("replication_jobs", sa.Column("oma_vm_id", sa.String(64), nullable=True))
    op.create_index("ix_replication_jobs_oma_vm_id", "replication_jobs", ["oma_vm_id"])
    op.add_column("replication_jobs", sa.Column("lease_until", sa.DateTime, nullable=True))


def downgrade() -> None:
    op.drop_column("replication_jobs", "lease_until")
    op.drop_index("ix_replication_jobs_oma_vm_id", "replication_jobs")
    op.drop_column("replication_jobs", "oma_vm_id")
    op.drop_table("appliance_slots")
