"""appliances and sessions

Revision ID: auth_0001
"""
import sqlalchemy as sa
from alembic import op

revision = "auth_0001"
down_revision = None


def upgrade() -> None:
    op.create_table(
        "appliances",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("appliance_id", sa.String(255), nullable=False, unique=True),
        sa.Column("token_hash", sa.String(64), nullable=False),
        sa.Column("enabled", sa.Boolean, nullable=False, server_default=sa.true()),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("last_used_at", sa.DateTime, nullable=True),
    )
    op.create_table(
        "sessions",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("appliance_id", sa.String(255), nullable=False, index=True),
        sa.Column("issued_at", sa.DateTime, nullable=False),
        sa.Column("expires_at", sa.DateTime, nullable=False, index=True),
        sa.Column("revoked_at", sa.DateTime, nullable=True),
    )


def downgrade() -> None:
    op.drop_table("sessions")
    op.drop_table("appliances")
