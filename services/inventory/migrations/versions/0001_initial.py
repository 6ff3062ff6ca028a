"""vcenter_configs, vms, vm_disks, vm_nics

Revision ID: inventory_0001
"""
import sqlalchemy as sa
from alembic import op

revision = "inventory_0001"
down_revision = None


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
        sa.UniqueConstraint("vcenter", "uuid", name="uq_vms_vcenter"),
    )
    op.create_index("ix_vms_status_name", "vms", ["status", "name"])
    op.create_index("ix_vms_vcenter_status", "vms", ["vcenter", "status"])
    op.create_index("ix_vms_datacenter", "vms", ["datacenter"])
    op.create_index("ix_vms_power_state", "vms", ["power_state"])
    op.create_index("ix_vms_moref", "vms", ["moref"])
    op.create_index("ix_vms_uuid", "vms", ["uuid"])
    op.create_table(
        "vm_disks",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("vm_id", sa.Integer, sa.ForeignKey("vms.id", ondelete="CASCADE",
                                                     name="fk_vm_disks_vm_id_vms"), nullable=False),
        sa.Column("position", sa.Integer, nullable=False),
        sa.Column("disk_id", sa.String(64), nullable=False),
        sa.Column("device_key", sa.Integer, nullable=False),
        sa.Column("label", sa.String(255), nullable=True),
        sa.Column("unit_number", sa.Integer, nullable=True),
        sa.Column("controller_key", sa.Integer, nullable=True),
        sa.Column("controller_bus_number", sa.Integer, nullable=True),
        sa.Column("controller_type", sa.String(32), nullable=True),
        sa.Column("controller_class", sa.String(64), nullable=True),
        sa.Column("path", sa.String(1024), nullable=True),
        sa.Column("size_gb", sa.Integer, nullable=False),
        sa.Column("capacity_bytes", sa.BigInteger, nullable=False),
        sa.Column("datastore", sa.String(255), nullable=True),
        sa.Column("thin_provisioned", sa.Boolean, nullable=False),
        sa.Column("backing", sa.String(64), nullable=True),
        sa.Column("change_id", sa.String(255), nullable=True),
    )
    op.create_index("ix_vm_disks_vm_id", "vm_disks", ["vm_id"])
    op.create_table(
        "vm_nics",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("vm_id", sa.Integer, sa.ForeignKey("vms.id", ondelete="CASCADE",
                                                     name="fk_vm_nics_vm_id_vms"), nullable=False),
        sa.Column("position", sa.Integer, nullable=False),
        sa.Column("device_key", sa.Integer, nullable=False),
        sa.Column("network", sa.String(255), nullable=True),
        sa.Column("mac_address", sa.String(32), nullable=True),
        sa.Column("adapter_type", sa.String(32), nullable=True),
        sa.Column("connected", sa.Boolean, nullable=True),
    )
    op.create_index("ix_vm_nics_vm_id", "vm_nics", ["vm_id"])


def downgrade() -> None:
    op.drop_table("vm_nics")
    op.drop_table("vm_disks")
    op.drop_table("vms")
    op.drop_table("vcenter_configs")
