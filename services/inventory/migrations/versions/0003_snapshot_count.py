"""vms.snapshot_count: the source VM's snapshots, for the preflight `snapshots` check (issue 20)

Revision ID: inventory_0003
"""
import sqlalchemy as sa
from alembic import op

revision = "inventory_0003"
down_revision = "inventory_0002"


def upgrade() -> None:
    op.add_column("vms", sa.Column("snapshot_count", sa.Integer, nullable=True))


def downgrade() -> None:
    op.drop_column("vms", "snapshot_count")
