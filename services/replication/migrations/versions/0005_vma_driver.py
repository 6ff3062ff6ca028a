"""replication_jobs: start_sync, and since when a job is stalled (issue 16); the job's vCenter (so
its VMA) is the vcenter_host of replication_0003.

Revision ID: replication_0005
"""
import sqlalchemy as sa
from alembic import op

revision = "replication_0005"
down_revision = "replication_0004"


def upgrade() -> None:
    op.add_column("replication_jobs", sa.Column("start_sync", sa.Boolean(), nullable=True))
    op.add_column("replication_jobs", sa.Column("stalled_at", sa.DateTime(), nullable=True))


def downgrade() -> None:
    for column in ("stalled_at", "start_sync"):
        op.drop_column("replication_jobs", column)
