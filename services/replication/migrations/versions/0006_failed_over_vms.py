"""failed_over_vms: the VMs a live cutover runs in OSSEA on their replica volumes (issue 17).

Revision ID: replication_0006
"""
import sqlalchemy as sa
from alembic import op

revision = "replication_0006"
down_revision = "replication_0005"


def upgrade() -> None:
    op.create_table(
        "failed_over_vms",
        sa.Column("vm_key", sa.String(255), primary_key=True),
        sa.Column("vm_name", sa.String(255), nullable=False),
        sa.Column("failover_id", sa.String(64), nullable=False),
        sa.Column("job_id", sa.String(64), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("failed_over_vms")
