"""ossea_configs

Revision ID: config_0001
"""
import sqlalchemy as sa
from alembic import op

revision = "config_0001"
down_revision = None


def upgrade() -> None:
    # The seed's table; secret_key is wider than the seed's VARCHAR(500) because it stores the
    # ciphertext of up to 500 characters (see models.SECRET_CIPHERTEXT_LEN). Times are UTC DATETIMEs.
    op.create_table(
        "ossea_configs",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(255), nullable=False, unique=True),
        sa.Column("api_url", sa.String(500), nullable=False),
        sa.Column("api_key", sa.String(500), nullable=False),
        sa.Column("secret_key", sa.String(2707), nullable=False),
        sa.Column("domain", sa.String(255), nullable=True, server_default="/"),
        sa.Column("zone", sa.String(255), nullable=False),
        sa.Column("oma_vm_id", sa.String(255), nullable=True),
        sa.Column("is_active", sa.Boolean, nullable=True, server_default=sa.true()),
        sa.Column("created_at", sa.DateTime, nullable=False, server_default=sa.func.current_timestamp()),
        sa.Column("updated_at", sa.DateTime, nullable=False, server_default=sa.func.current_timestamp()),
    )


def downgrade() -> None:
    op.drop_table("ossea_configs")
