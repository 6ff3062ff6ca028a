"""vcenter_configs, vms (disks and NICs as JSON)

Revision ID: inventory_0001
"""
import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.mysql import MEDIUMTEXT

revision = "inventory_0001"
down_revision = None

JSON_TEXT = sa.Text().with_variant(MEDIUMTEXT(), "mysql")


def upgrade() -> None:
    op.create_table(
        "vcenter_configs",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("host", sa.String(255), nullable=False),
        sa.Column("port", sa.Integer, nullable=False),
        sa.Column("username", sa.String(255), nullable=False),
        sa.Column("password", sa.Text, nullable=False),
        sa.Column("datacenter", sa.String(255), nullable=True),
        sa.Column("verify_tls", sa.Boolean, nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("updated_at", sa.DateTime, nullable=False),
        sa.UniqueConstraint("name", name="uq_vcenter_configs_name"),
        sa.UniqueConstraint("host", name="uq_vcenter_configs_host"),
    )
    op.create_table(
        "vms",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("vcenter", sa.String(255), nullable=False),
        sa.Column("moref", sa.String(64), nullable=False),
        sa.Column("uuid", sa.String(64), nullable=False),
        sa.Column("bios_uuid", sa.String(64), nullable=True),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("path", sa.String(1024), nullable=True),
        sa.Column("datacenter", sa.String(255), nullable=True),
        sa.Column("cluster", sa.String(255), nullable=True),
        sa.Column("host", sa.String(255), nullable=True),
        sa.Column("cpus", sa.Integer, nullable=True),
        sa.Column("memory_mb", sa.Integer, nullable=True),
        sa.Column("guest_os", sa.String(128), nullable=True),
        sa.Column("guest_os_full_name", sa.String(255), nullable=True),
        sa.Column("power_state", sa.String(32), nullable=True),
        sa.Column("cbt_enabled", sa.Boolean, nullable=False),
        sa.Column("firmware", sa.String(16), nullable=True),
        sa.Column("template", sa.Boolean, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("fingerprint", sa.String(64), nullable=False),
        sa.Column("first_seen", sa.DateTime, nullable=False),
        sa.Column("last_seen", sa.DateTime, nullable=False),
        sa.Column("gone_at", sa.DateTime, nullable=True),
        sa.Column("disks", JSON_TEXT, nullable=False),
        sa.Column("nics", JSON_TEXT, nullable=False),
        sa.UniqueConstraint("vcenter", "uuid", name="uq_vms_vcenter"),
    )
    op.create_index("ix_vms_status_name", "vms", ["status", "name"])
    op.create_index("ix_vms_vcenter_status", "vms", ["vcenter", "status"])
    op.create_index("ix_vms_datacenter", "vms", ["datacenter"])
    op.create_index("ix_vms_power_state", "vms", ["power_state"])
    op.create_index("ix_vms_moref", "vms", ["moref"])
    op.create_index("ix_vms_uuid", "vms", ["uuid"])


def downgrade() -> None:
    op.drop_table("vms")
    op.drop_table("vcenter_configs")
