"""job_volumes.export_uri: the URI a libnbd client (the VMA) opens for the disk's export

Revision ID: replication_0002
"""
import sqlalchemy as sa
from alembic import op

revision = "replication_0002"
down_revision = "replication_0001"


def upgrade() -> None:
    op.add_column("job_volumes", sa.Column("export_uri", sa.String(1024), nullable=True))


def downgrade() -> None:
    op.drop_column("job_volumes", "export_uri")
