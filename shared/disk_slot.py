"""A disk's slot on its VM: one number per disk, the same in requests, job rows, exports, events and
the read model.

vSphere numbers disks per controller (scsi0:0 and sata0:0 are both unit 0), so the unit number alone
does not name a disk. A `DiskSlot` is (controller type, bus, unit); its `number` packs the three into
one per-VM integer. SCSI bus 0 maps to its plain unit number, so single-controller VMs (and clients
that send no controller fields) keep the numbers they always had. On the wire this number keeps the
seed's names (`unit_number`, `disk_unit_number`): docs/replication.md.
"""
from __future__ import annotations

from typing import Annotated, NamedTuple

from pydantic import Field

CONTROLLER_TYPES = ("scsi", "sata", "nvme", "ide")   # order fixes the numbers: append only
BUSES_PER_TYPE = 4                                   # vSphere: at most 4 controllers of a kind
UNITS_PER_BUS = 64                                   # PVSCSI and NVMe: up to 64 disks per controller
DISK_SLOT_MAX = len(CONTROLLER_TYPES) * BUSES_PER_TYPE * UNITS_PER_BUS - 1   # the one limit: 1023

SlotNumber = Annotated[int, Field(ge=0, le=DISK_SLOT_MAX)]
BusNumber = Annotated[int, Field(ge=0, le=BUSES_PER_TYPE - 1)]
UnitNumber = Annotated[int, Field(ge=0, le=UNITS_PER_BUS - 1)]


class DiskSlot(NamedTuple):
    controller_type: str
    bus: int
    unit: int

    @property
    def number(self) -> int:
        kind = CONTROLLER_TYPES.index(self.controller_type)
        return (kind * BUSES_PER_TYPE + self.bus) * UNITS_PER_BUS + self.unit

    @classmethod
    def from_number(cls, number: int) -> DiskSlot:
        rest, unit = divmod(number, UNITS_PER_BUS)
        kind, bus = divmod(rest, BUSES_PER_TYPE)
        return cls(CONTROLLER_TYPES[kind], bus, unit)

    def __str__(self) -> str:  # vSphere's notation: sata1:3
        return f"{self.controller_type}{self.bus}:{self.unit}"


def slot_number(controller_type: str | None, bus: int | None, unit: int | None, position: int) -> int:
    """The disk's slot: from its controller when known, else its unit number (as SCSI bus 0), else
    its position in the list."""
    if (controller_type in CONTROLLER_TYPES and unit is not None and 0 <= unit < UNITS_PER_BUS
            and 0 <= (bus or 0) < BUSES_PER_TYPE):
        return DiskSlot(controller_type, bus or 0, unit).number  # type: ignore[arg-type]
    return unit if unit is not None else position
