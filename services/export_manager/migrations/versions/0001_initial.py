"""vm_export_mappings, exactly as the seed's CREATE TABLE

Revision ID: export_manager_0001
"""
import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision = "export_manager_0001"
down_revision = None


def upgrade() -> None:
    mariadb = op.get_bind().dialect.name in ("mysql", "mariadb")
    # Server defaults cannot be type variants: MariaDB gets the seed's millisecond clock with
    # ON UPDATE; SQLite gets its second-precision CURRENT_TIMESTAMP (the ORM sets both anyway).
    if mariadb:
        created = sa.text("CURRENT_TIMESTAMP(3)")
        updated = sa.text("CURRENT_TIMESTAMP(3) ON UPDATE CURRENT_TIMESTAMP(3)")
    else:
        created = updated = sa.text("CURRENT_TIMESTAMP")
    datetime3 = sa.DateTime().with_variant(mysql.DATETIME(fsp=3), "mysql", "mariadb")
    op.create_table(
        "vm_export_mappings",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True,
                  autoincrement=True),
        sa.Column("vm_id", sa.String(36), nullable=False),
        sa.Column("disk_unit_number", sa.Integer, nullable=False),
        sa.Column("vm_name", sa.String(255), nullable=False),
        sa.Column("export_name", sa.String(255), nullable=False),
        sa.Column("device_path", sa.String(255), nullable=False),
        sa.Column("status", sa.Enum("active", "inactive", name="vm_export_status", create_constraint=False),
                  nullable=True, server_default="active"),
        sa.Column("created_at", datetime3, nullable=True, server_default=created),
        sa.Column("updated_at", datetime3, nullable=True, server_default=updated),
        sa.PrimaryKeyConstraint("id", name="pk_vm_export_mappings"),
        sa.UniqueConstraint("export_name", name="export_name"),
        sa.UniqueConstraint("vm_id", "disk_unit_number", name="unique_vm_disk"),
    )
    op.create_index("idx_vm_id", "vm_export_mappings", ["vm_id"])
    op.create_index("idx_export_name", "vm_export_mappings", ["export_name"])
    op.create_index("idx_device_path", "vm_export_mappings", ["device_path"])
    op.create_index("idx_status", "vm_export_mappings", ["status"])


def downgrade() -> None:
    op.drop_table("vm_export_mappings")
