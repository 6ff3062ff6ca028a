"""Inventory tables: vCenter connections and the source VMs with their disks and NICs.

Disks and NICs are JSON arrays on the VM row (in the API's shape): a VM is always read and
written whole, and one row per VM keeps both the discovery's upsert and a listing page to a
couple of set-based statements.

A VM is keyed by (vcenter, uuid): the instance UUID survives renames and moves, MAC addresses
repeat across VMs, and morefs are only unique within one vCenter. Rows are never deleted by a
discovery: a VM that vanished keeps its row with status "gone".
"""
from __future__ import annotations

from datetime import datetime

from sqlalchemy import Boolean, DateTime, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.dialects.mysql import MEDIUMTEXT
from sqlalchemy.orm import Mapped, mapped_column

from oma.shared.db import Base

PRESENT, GONE = "present", "gone"
JSON_TEXT = Text().with_variant(MEDIUMTEXT(), "mysql")  # TEXT stops at 64 KiB on MariaDB


class VCenterConfig(Base):
    __tablename__ = "vcenter_configs"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(255), unique=True)
    host: Mapped[str] = mapped_column(String(255), unique=True)
    port: Mapped[int] = mapped_column(Integer)
    username: Mapped[str] = mapped_column(String(255))
    password: Mapped[str] = mapped_column(Text)  # Keyring ciphertext, never plaintext
    datacenter: Mapped[str | None] = mapped_column(String(255))
    verify_tls: Mapped[bool] = mapped_column(Boolean)
    appliance_id: Mapped[str | None] = mapped_column(String(255))  # its VMA; None: pyvmomi directly
    created_at: Mapped[datetime] = mapped_column(DateTime)
    updated_at: Mapped[datetime] = mapped_column(DateTime)


class Vm(Base):
    __tablename__ = "vms"
    __table_args__ = (
        UniqueConstraint("vcenter", "uuid"),
        Index("ix_vms_status_name", "status", "name"),  # the default listing: present VMs by name
        Index("ix_vms_vcenter_status", "vcenter", "status"),
        Index("ix_vms_datacenter", "datacenter"),
        Index("ix_vms_power_state", "power_state"),
        Index("ix_vms_moref", "moref"),
        Index("ix_vms_uuid", "uuid"),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    vcenter: Mapped[str] = mapped_column(String(255))  # the host of the vCenter configuration
    moref: Mapped[str] = mapped_column(String(64))  # "vm-42": the API's VM id
    uuid: Mapped[str] = mapped_column(String(64))  # config.instanceUuid
    bios_uuid: Mapped[str | None] = mapped_column(String(64))
    name: Mapped[str] = mapped_column(String(255))
    path: Mapped[str | None] = mapped_column(String(1024))
    datacenter: Mapped[str | None] = mapped_column(String(255))
    cluster: Mapped[str | None] = mapped_column(String(255))
    host: Mapped[str | None] = mapped_column(String(255))
    cpus: Mapped[int | None] = mapped_column(Integer)
    memory_mb: Mapped[int | None] = mapped_column(Integer)
    guest_os: Mapped[str | None] = mapped_column(String(128))
    guest_os_full_name: Mapped[str | None] = mapped_column(String(255))
    power_state: Mapped[str | None] = mapped_column(String(32))
    cbt_enabled: Mapped[bool] = mapped_column(Boolean)
    snapshot_count: Mapped[int | None] = mapped_column(Integer)  # None: the source did not report it (a VMA)
    firmware: Mapped[str | None] = mapped_column(String(16))
    template: Mapped[bool] = mapped_column(Boolean)
    status: Mapped[str] = mapped_column(String(16))  # present | gone
    fingerprint: Mapped[str] = mapped_column(String(64))  # sha256 of the discovered data
    first_seen: Mapped[datetime] = mapped_column(DateTime)
    last_seen: Mapped[datetime] = mapped_column(DateTime)
    gone_at: Mapped[datetime | None] = mapped_column(DateTime)
    disks: Mapped[str] = mapped_column(JSON_TEXT)  # JSON: [{id, key, unit_number, controller_*, path, size_gb, ...}]
    nics: Mapped[str] = mapped_column(JSON_TEXT)  # JSON: [{key, network, mac_address, adapter_type, connected}]

