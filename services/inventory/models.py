"""Inventory tables: vCenter connections and the source VMs with their disks and NICs.

A VM is keyed by (vcenter, uuid): the instance UUID survives renames and moves, MAC addresses
repeat across VMs, and morefs are only unique within one vCenter. Rows are never deleted by a
discovery: a VM that vanished keeps its row with status "gone".
"""
from __future__ import annotations

from datetime import datetime

from sqlalchemy import (BigInteger, Boolean, DateTime, ForeignKey, Index, Integer, String, Text,
                        UniqueConstraint)
from sqlalchemy.orm import Mapped, mapped_column

from shared.db import Base

PRESENT, GONE = "present", "gone"


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
    firmware: Mapped[str | None] = mapped_column(String(16))
    template: Mapped[bool] = mapped_column(Boolean)
    status: Mapped[str] = mapped_column(String(16))  # present | gone
    fingerprint: Mapped[str] = mapped_column(String(64))  # sha256 of the discovered data
    first_seen: Mapped[datetime] = mapped_column(DateTime)
    last_seen: Mapped[datetime] = mapped_column(DateTime)
    gone_at: Mapped[datetime | None] = mapped_column(DateTime)


class VmDisk(Base):
    __tablename__ = "vm_disks"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    vm_id: Mapped[int] = mapped_column(ForeignKey("vms.id", ondelete="CASCADE"), index=True)
    position: Mapped[int] = mapped_column(Integer)  # device order in vSphere
    disk_id: Mapped[str] = mapped_column(String(64))  # "disk-2000"
    device_key: Mapped[int] = mapped_column(Integer)
    label: Mapped[str | None] = mapped_column(String(255))
    unit_number: Mapped[int | None] = mapped_column(Integer)
    controller_key: Mapped[int | None] = mapped_column(Integer)
    controller_bus_number: Mapped[int | None] = mapped_column(Integer)
    controller_type: Mapped[str | None] = mapped_column(String(32))
    controller_class: Mapped[str | None] = mapped_column(String(64))
    path: Mapped[str | None] = mapped_column(String(1024))
    size_gb: Mapped[int] = mapped_column(Integer)
    capacity_bytes: Mapped[int] = mapped_column(BigInteger)
    datastore: Mapped[str | None] = mapped_column(String(255))
    thin_provisioned: Mapped[bool] = mapped_column(Boolean)
    backing: Mapped[str | None] = mapped_column(String(64))
    change_id: Mapped[str | None] = mapped_column(String(255))


class VmNic(Base):
    __tablename__ = "vm_nics"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    vm_id: Mapped[int] = mapped_column(ForeignKey("vms.id", ondelete="CASCADE"), index=True)
    position: Mapped[int] = mapped_column(Integer)
    device_key: Mapped[int] = mapped_column(Integer)
    network: Mapped[str | None] = mapped_column(String(255))
    mac_address: Mapped[str | None] = mapped_column(String(32))
    adapter_type: Mapped[str | None] = mapped_column(String(32))
    connected: Mapped[bool | None] = mapped_column(Boolean)
