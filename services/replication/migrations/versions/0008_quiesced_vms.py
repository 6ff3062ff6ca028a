"""quiesced_vms: the VMs whose syncs a test failover paused while it snapshots their replica (issue 17)

Revision ID: replication_0008
"""
import sqlalchemy as sa
from alembic import op

revision = "replication_0008"
down_revision = "replication_0007"


def upgrade() -> None:
    op.create_table(
        "quiesced_vms",
        sa.Column("vm_key", sa.String(255), primary_key=True),
        sa.Column("vm_name", sa.String(255), nullable=False),
        sa.Column("failover_id", sa.String(64), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("quiesced_vms")
