"""job_volumes.detach_job_id: the cloud's async job of a detach this row's cleanup submitted, so a
retried cleanup polls it instead of submitting a second detach

Revision ID: replication_0007
"""
import sqlalchemy as sa
from alembic import op

revision = "replication_0007"
down_revision = "replication_0006"


def upgrade() -> None:
    op.add_column("job_volumes", sa.Column("detach_job_id", sa.String(64), nullable=True))


def downgrade() -> None:
    op.drop_column("job_volumes", "detach_job_id")
