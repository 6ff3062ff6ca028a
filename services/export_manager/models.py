"""The seed's `vm_export_mappings` table: one NBD export per (VM, disk unit), kept for reuse."""
from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    BigInteger,
    DateTime,
    Enum,
    Index,
    Integer,
    String,
    UniqueConstraint,
)
from sqlalchemy.dialects import mysql
from sqlalchemy.orm import Mapped, mapped_column

from oma.shared.db import Base, utcnow

ACTIVE, INACTIVE = "active", "inactive"
STATUSES = (ACTIVE, INACTIVE)

# BIGINT on MariaDB; SQLite only autoincrements an INTEGER PRIMARY KEY.
BIGID = BigInteger().with_variant(Integer(), "sqlite")
# DATETIME(3) on MariaDB (milliseconds), plain DATETIME elsewhere.
DATETIME3 = DateTime().with_variant(mysql.DATETIME(fsp=3), "mysql", "mariadb")
STATUS_ENUM = Enum(*STATUSES, name="vm_export_status", native_enum=True, create_constraint=False)


class VmExportMapping(Base):
    __tablename__ = "vm_export_mappings"
    __table_args__ = (
        UniqueConstraint("vm_id", "disk_unit_number", name="unique_vm_disk"),
        # `UNIQUE` inline in the seed: MariaDB names that key after the column.
        UniqueConstraint("export_name", name="export_name"),
        Index("idx_vm_id", "vm_id"),
        Index("idx_export_name", "export_name"),
        Index("idx_device_path", "device_path"),
        Index("idx_status", "status"),
    )

    id: Mapped[int] = mapped_column(BIGID, primary_key=True, autoincrement=True)
    vm_id: Mapped[str] = mapped_column(String(36), nullable=False)
    disk_unit_number: Mapped[int] = mapped_column(Integer, nullable=False)
    vm_name: Mapped[str] = mapped_column(String(255), nullable=False)
    export_name: Mapped[str] = mapped_column(String(255), nullable=False)
    device_path: Mapped[str] = mapped_column(String(255), nullable=False)
    status: Mapped[str | None] = mapped_column(STATUS_ENUM, default=ACTIVE)
    # Set by the ORM in UTC (the server defaults use the session time zone; they serve raw SQL).
    created_at: Mapped[datetime | None] = mapped_column(DATETIME3, default=utcnow)
    updated_at: Mapped[datetime | None] = mapped_column(DATETIME3, default=utcnow, onupdate=utcnow)
