"""vcenter_configs.appliance_id: the VMA through which the vCenter is reached (issue 16)

Revision ID: inventory_0002
"""
import sqlalchemy as sa
from alembic import op

revision = "inventory_0002"
down_revision = "inventory_0001"


def upgrade() -> None:
    op.add_column("vcenter_configs", sa.Column("appliance_id", sa.String(255), nullable=True))


def downgrade() -> None:
    op.drop_column("vcenter_configs", "appliance_id")
