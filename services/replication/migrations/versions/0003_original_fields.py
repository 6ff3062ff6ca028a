"""replication_jobs: the request fields the original appliance's GUI and scheduler send

Revision ID: replication_0003
"""
import sqlalchemy as sa
from alembic import op

revision = "replication_0003"
down_revision = "replication_0002"

COLUMNS = ("vcenter_host", "target_network", "change_id", "previous_change_id", "snapshot_id",
           "schedule_execution_id", "vm_group_id", "scheduled_by", "existing_context_id")


def upgrade() -> None:
    with op.batch_alter_table("replication_jobs") as batch:
        for name in COLUMNS:
            batch.add_column(sa.Column(name, sa.String(255), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("replication_jobs") as batch:
        for name in reversed(COLUMNS):
            batch.drop_column(name)
