"""appliances.api_url and reachability: OMA drives each VMA through its API (issue 16)

Revision ID: auth_0003
"""
import sqlalchemy as sa
from alembic import op

revision = "auth_0003"
down_revision = "auth_0002"


def upgrade() -> None:
    op.add_column("appliances", sa.Column("api_url", sa.String(1024), nullable=True))
    op.add_column("appliances", sa.Column("reachable", sa.Boolean(), nullable=True))
    op.add_column("appliances", sa.Column("last_seen", sa.DateTime(), nullable=True))


def downgrade() -> None:
    for column in ("last_seen", "reachable", "api_url"):
        op.drop_column("appliances", column)
