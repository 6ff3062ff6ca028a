"""replication_jobs: the vCenter (so the VMA) of a job, start_sync, and since when it is stalled (issue 16)

Revision ID: replication_0003_vma_driver
"""
import sqlalchemy as sa
from alembic import op

revision = "replication_0003_vma_driver"
down_revision = "replication_0002"


def upgrade() -> None:
    op.add_column("replication_jobs", sa.Column("vcenter_host", sa.String(255), nullable=True))
    op.add_column("replication_jobs", sa.Column("start_sync", sa.Boolean(), nullable=True))
    op.add_column("replication_jobs", sa.Column("stalled_at", sa.DateTime(), nullable=True))


def downgrade() -> None:
    for column in ("stalled_at", "start_sync", "vcenter_host"):
        op.drop_column("replication_jobs", column)
