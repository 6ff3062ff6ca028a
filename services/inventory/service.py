"""Inventory logic: vCenter connections (password encrypted, answered redacted), the set-based
upsert of a discovery, and the listing queries.

Functions take the session they work with; the app owns sessions, the bus and the vSphere source.
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

import orjson
from prometheus_client import Counter, Gauge, Histogram
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt
from sqlalchemy import RowMapping, func, insert, or_, select
from sqlalchemy import delete as sql_delete
from sqlalchemy import update as sql_update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from oma.services.inventory.models import GONE, PRESENT, VCenterConfig, Vm
from oma.shared import actions, errors
from oma.shared.actions import require
from oma.shared.bus import event_envelope
from oma.shared.crypto import Keyring
from oma.shared.db import iso, utcnow
from oma.shared.schemas import REDACTED

CREATE_REQUIRED = ("host", "username", "password")
CHUNK = 500  # ids per IN (...) list: well below SQLite's and MariaDB's parameter limits

DISCOVERY_SECONDS = Histogram("oma_inventory_discovery_duration_seconds",
                              "Time of a discovery: vCenter read and store",
                              buckets=(.1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600))
DISCOVERED_VMS = Gauge("oma_inventory_discovered_vms", "VMs present in the inventory after the last discovery")
DISCOVERIES = Counter("oma_inventory_discoveries_total", "Discoveries by result", ["result"])
CONFIG_CHANGES = Counter("oma_inventory_vcenter_changes_total", "vCenter configuration changes", ["action"])


# -- requests ----------------------------------------------------------------------------------

class DiscoverRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    vcenter: str = Field(min_length=1, max_length=255)


class PowerRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    vcenter: str = Field(min_length=1, max_length=255)
    vm_id: str = Field(min_length=1, max_length=255, description="moref")
    action: Literal["on", "off", "state"]
    shutdown_timeout: float = Field(120.0, ge=0, le=3600)


class ListRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    vcenter: str | None = Field(None, max_length=255)
    datacenter: str | None = Field(None, max_length=255)
    name: str | None = Field(None, max_length=255)
    power_state: str | None = Field(None, max_length=32)
    cbt: StrictBool | None = None
    include_gone: StrictBool = False
    limit: StrictInt = Field(100, ge=1, le=1000)
    offset: StrictInt = Field(0, ge=0)


class GetRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str = Field(min_length=1, max_length=255)


# -- vCenter configurations --------------------------------------------------------------------

def connection(row: VCenterConfig, keys: Keyring) -> dict[str, Any]:
    """The decrypted connection fields (a VCenterConnection's keyword arguments)."""
    return {"host": row.host, "port": row.port, "username": row.username, "password": keys.decrypt(row.password, f"password of vCenter configuration {row.id}"),
            "datacenter": row.datacenter, "verify_tls": row.verify_tls, "appliance_id": row.appliance_id}


def duplicate(what: str, value: str) -> errors.Conflict:
    return errors.Conflict("vCenter configuration already exists",
                           f"A vCenter configuration with {what} {value!r} already exists; update that one")


async def find(db: AsyncSession, vcenter: str) -> VCenterConfig | None:
    """The configuration whose host (or else name) is `vcenter`."""
    rows = (await db.scalars(select(VCenterConfig).where(
        or_(VCenterConfig.host == vcenter, VCenterConfig.name == vcenter)))).all()
    return next((r for r in rows if r.host == vcenter), rows[0] if rows else None)


async def _unique(db: AsyncSession, values: dict[str, Any], config_id: int | None = None) -> None:
    for what, column in (("host", VCenterConfig.host), ("name", VCenterConfig.name)):
        if what in values:
            other = await db.scalar(select(VCenterConfig.id).where(column == values[what]))
            if other is not None and other != config_id:
                raise duplicate(what, values[what])


async def _flush(db: AsyncSession, row: VCenterConfig) -> None:
    # The unique indexes decide when two requests race past _unique (and, on MariaDB, for
    # values that differ only in case).
    try:
        await db.flush()
    except IntegrityError:
        raise duplicate("host", row.host) from None


class VCenters(actions.Store[VCenterConfig]):
    """vCenter connections for shared.actions.run_action: the password encrypted with `keys`.
    A deleted configuration's VMs stay in the inventory (they are the history of migrations)."""
    model = VCenterConfig
    label = "vCenter configuration"
    kind = "vCenter configuration"
    endpoint_fields = ("host", "port", "verify_tls")
    secret_field = "password"

    def public(self, row: VCenterConfig) -> dict[str, Any]:
        """A configuration as every response shows it: the password redacted."""
        return {"id": row.id, "name": row.name, "host": row.host, "port": row.port, "username": row.username,
                "password": REDACTED, "datacenter": row.datacenter, "verify_tls": row.verify_tls,
                "appliance_id": row.appliance_id, "created_at": iso(row.created_at), "updated_at": iso(row.updated_at)}

    async def create(self, db: AsyncSession, values: dict[str, Any]) -> VCenterConfig:
        require(values, CREATE_REQUIRED, "create")
        values = {**values, "name": values.get("name") or values["host"]}
        await _unique(db, values)
        now = utcnow()
        row = VCenterConfig(name=values["name"], host=values["host"], port=values.get("port") or 443,
                            username=values["username"], password=self.keys.encrypt(values["password"]),
                            datacenter=values.get("datacenter") or None, verify_tls=values.get("verify_tls", True),
                            appliance_id=values.get("appliance_id") or None, created_at=now, updated_at=now)
        db.add(row)
        await _flush(db, row)
        return row

    async def update(self, db: AsyncSession, config_id: int, values: dict[str, Any]) -> VCenterConfig:
        """Partial: only the given fields (at least one) change, and updated_at. A new host carries the stored VMs along."""
        row = await self.load(db, config_id)
        await _unique(db, values, config_id)
        old_host = row.host
        for name, value in values.items():
            if name == "password":
                value = self.keys.encrypt(value)
            elif name in ("datacenter", "appliance_id"):
                value = value or None
            setattr(row, name, value)
        row.updated_at = utcnow()
        await _flush(db, row)
        if row.host != old_host:
            await db.execute(sql_update(Vm).where(Vm.vcenter == old_host).values(vcenter=row.host))
        return row


# -- discovered VMs ----------------------------------------------------------------------------

VM_COLUMNS = ("bios_uuid", "name", "path", "datacenter", "cluster", "host", "cpus", "memory_mb", "guest_os",
              "guest_os_full_name", "power_state", "firmware", "snapshot_count")
DISK_FIELDS = ("id", "key", "label", "unit_number", "controller_key", "controller_bus_number", "controller_type",
               "controller_class", "path", "size_gb", "capacity_bytes", "datastore", "thin_provisioned", "backing",
               "change_id")
NIC_FIELDS = ("key", "network", "mac_address", "adapter_type", "connected")


def fingerprint(vm: dict[str, Any]) -> str:
    """Hash of everything vSphere reported for a VM: a re-discovery compares it, not the fields."""
    return hashlib.sha256(orjson.dumps(vm, option=orjson.OPT_SORT_KEYS)).hexdigest()


def vm_key(vm: dict[str, Any]) -> str:
    return vm.get("uuid") or vm["id"]  # instanceUuid is always set by vCenter; the moref is a last resort


def disks_of(vm: dict[str, Any]) -> list[dict[str, Any]]:
    return [{f: d.get(f) for f in DISK_FIELDS} for d in vm.get("disks") or ()]


def nics_of(vm: dict[str, Any]) -> list[dict[str, Any]]:
    return [{f: n.get(f) for f in NIC_FIELDS} for n in vm.get("nics") or ()]


def _vm_row(vcenter: str, vm: dict[str, Any], digest: str, now: datetime) -> dict[str, Any]:
    row = {c: vm.get(c) for c in VM_COLUMNS}
    row.update(vcenter=vcenter, moref=vm["id"], uuid=vm_key(vm), cbt_enabled=bool(vm.get("cbt_enabled")),
               template=bool(vm.get("template")), status=PRESENT, fingerprint=digest, last_seen=now, gone_at=None,
               disks=orjson.dumps(disks_of(vm)).decode(), nics=orjson.dumps(nics_of(vm)).decode())
    return row


def _chunks(items: Sequence[Any], size: int = CHUNK) -> Iterator[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


@dataclass
class UpsertResult:
    seen_at: datetime
    change: dict[str, str] = field(default_factory=dict)  # key (instance UUID) -> new|changed|unchanged
    first_seen: dict[str, datetime] = field(default_factory=dict)
    gone: list[str] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)  # morefs skipped for a repeated UUID

    def count(self, change: str) -> int:
        return sum(1 for c in self.change.values() if c == change)


def dedupe(vms: Iterable[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
    """One VM per instance UUID (a clone with a copied UUID would break the unique key): the first wins."""
    seen: dict[str, dict[str, Any]] = {}
    dupes = []
    for vm in vms:
        key = vm_key(vm)
        if key in seen:
            dupes.append(vm["id"])
        else:
            seen[key] = vm
    return list(seen.values()), dupes


async def upsert(db: AsyncSession, vcenter: str, vms: list[dict[str, Any]]) -> UpsertResult:
    """Store one vCenter's whole inventory with set-based statements (no query per VM): one
    read of what is stored, a delete and a multi-row insert for the changed, a multi-row insert
    of the new, one update marking the vanished gone and one touching last_seen of the rest.
    A VM that was gone and is back counts as new."""
    now = utcnow()
    result = UpsertResult(seen_at=now)
    vms, result.duplicates = dedupe(vms)
    stored = {row.uuid: row for row in (await db.execute(
        select(Vm.id, Vm.uuid, Vm.fingerprint, Vm.status, Vm.first_seen).where(Vm.vcenter == vcenter))).all()}
    inserts, updates = [], []
    for vm in vms:
        key, digest = vm_key(vm), fingerprint(vm)
        old = stored.get(key)
        if old is None:
            inserts.append(_vm_row(vcenter, vm, digest, now) | {"first_seen": now})
            result.change[key], result.first_seen[key] = "new", now
            continue
        result.first_seen[key] = old.first_seen
        if old.fingerprint != digest or old.status != PRESENT:
            updates.append(_vm_row(vcenter, vm, digest, now) | {"id": old.id, "first_seen": old.first_seen})
            result.change[key] = "new" if old.status != PRESENT else "changed"
        else:
            result.change[key] = "unchanged"
    gone_ids = []
    for key, row in stored.items():
        if row.status == PRESENT and key not in result.change:
            result.gone.append(key)
            gone_ids.append(row.id)

    for ids in _chunks(gone_ids):
        await db.execute(sql_update(Vm).where(Vm.id.in_(ids)).values(status=GONE, gone_at=now))
    # A changed VM's row is replaced whole, under the same id: a delete and a multi-row insert are
    # two statements, where an executemany UPDATE is one round trip per row on MariaDB.
    for chunk in _chunks(updates):
        await db.execute(sql_delete(Vm).where(Vm.id.in_([row["id"] for row in chunk])))
    # Core, not ORM: the ORM's bulk insert emits one statement per row on MariaDB.
    for rows in (updates, inserts):
        if rows:
            await db.execute(insert(Vm.__table__), rows)
    if result.count("unchanged"):
        await db.execute(sql_update(Vm).where(Vm.vcenter == vcenter, Vm.status == PRESENT, Vm.last_seen < now)
                         .values(last_seen=now))
    return result


async def count_present(db: AsyncSession) -> int:
    return await db.scalar(select(func.count()).select_from(Vm).where(Vm.status == PRESENT)) or 0


# -- reading VMs -------------------------------------------------------------------------------

# Reads use Core rows, not ORM objects: building entities costs more than the queries themselves.
VMS = Vm.__table__


def vm_public(vm: RowMapping) -> dict[str, Any]:
    """A stored VM in the seed's `source_vm` shape (id = moref), with what else we know."""
    out: dict[str, Any] = {"id": vm["moref"], "uuid": vm["uuid"]}
    out.update({c: vm[c] for c in VM_COLUMNS})
    out.update(cbt_enabled=vm["cbt_enabled"], template=vm["template"], vcenter=vm["vcenter"], status=vm["status"],
               first_seen=iso(vm["first_seen"]), last_seen=iso(vm["last_seen"]), gone_at=iso(vm["gone_at"]),
               disks=orjson.loads(vm["disks"]), nics=orjson.loads(vm["nics"]))
    return out


def discovered(vcenter: str, vm: dict[str, Any], change: str, first_seen: datetime,
               seen_at: datetime) -> dict[str, Any]:
    """A just-discovered VM in exactly the shape `vm_public` gives once stored, plus its `change`."""
    out: dict[str, Any] = {"id": vm["id"], "uuid": vm_key(vm)}
    out.update({c: vm.get(c) for c in VM_COLUMNS})
    out.update(cbt_enabled=bool(vm.get("cbt_enabled")), template=bool(vm.get("template")), vcenter=vcenter,
               status=PRESENT, first_seen=iso(first_seen), last_seen=iso(seen_at), gone_at=None,
               disks=disks_of(vm), nics=nics_of(vm), change=change)
    return out


async def _mappings(db: AsyncSession, stmt: Any) -> Sequence[RowMapping]:
    return (await db.execute(stmt)).mappings().all()


async def vms_by_key(db: AsyncSession, vcenter: str, keys: Sequence[str]) -> list[dict[str, Any]]:
    rows: list[RowMapping] = []
    for chunk in _chunks(list(keys)):
        rows += await _mappings(db, select(VMS).where(VMS.c.vcenter == vcenter, VMS.c.uuid.in_(chunk)))
    return [vm_public(r) for r in rows]


async def list_vms(db: AsyncSession, q: ListRequest, vcenters: Sequence[str] = ()) -> dict[str, Any]:
    """`vcenters`: the stored hosts that q.vcenter names (its host, or the host of the config so named)."""
    where = []
    if q.vcenter is not None:
        where.append(Vm.vcenter.in_(list(vcenters) or [q.vcenter]))
    if q.datacenter is not None:
        where.append(Vm.datacenter == q.datacenter)
    if q.name:
        where.append(Vm.name.contains(q.name, autoescape=True))
    if q.power_state is not None:
        where.append(Vm.power_state == q.power_state)
    if q.cbt is not None:
        where.append(Vm.cbt_enabled.is_(q.cbt))
    if not q.include_gone:
        where.append(Vm.status == PRESENT)
    total = await db.scalar(select(func.count()).select_from(Vm).where(*where))
    # Late row lookup: the page's ids come from the (status, name) index alone, so a deep offset
    # skips index entries rather than whole rows; then the page's rows are joined by primary key.
    page = select(Vm.id).where(*where).order_by(Vm.name, Vm.id).limit(q.limit).offset(q.offset).subquery()
    rows = await _mappings(db, select(VMS).join(page, page.c.id == VMS.c.id).order_by(VMS.c.name, VMS.c.id))
    return {"success": True, "vms": [vm_public(r) for r in rows], "total": total or 0,
            "limit": q.limit, "offset": q.offset}


async def get_vm(db: AsyncSession, vm_id: str) -> dict[str, Any]:
    """By moref or instance UUID; when several vCenters know it, the present, last seen one."""
    rows = await _mappings(db, select(VMS).where(or_(VMS.c.moref == vm_id, VMS.c.uuid == vm_id))
                           .order_by((VMS.c.status == PRESENT).desc(), VMS.c.last_seen.desc()).limit(1))
    if not rows:
        raise errors.NotFound("VM not found", f"No VM with id or UUID {vm_id!r} in the inventory; "
                                              "run a discovery of its vCenter first")
    return vm_public(rows[0])


async def set_power_state(db: AsyncSession, vcenter: str, vm_id: str, state: str) -> dict[str, Any] | None:
    """A power action's outcome on the stored VM (failover's cutover and rollback), so the inventory
    does not show the state of the last discovery until the next one; the VM as stored now, or None
    when this vCenter's inventory does not hold it."""
    which = (VMS.c.vcenter == vcenter, or_(VMS.c.moref == vm_id, VMS.c.uuid == vm_id))
    await db.execute(sql_update(VMS).where(*which).values(power_state=state))
    rows = await _mappings(db, select(VMS).where(*which).limit(1))
    return vm_public(rows[0]) if rows else None


# -- events ------------------------------------------------------------------------------------

EVENT_VM_FIELDS = ("id", "uuid", "name", "path", "datacenter", "cluster", "host", "cpus", "memory_mb",
                   "guest_os", "power_state", "cbt_enabled", "firmware", "template", "status", "disks", "nics")


def event(vcenter: str, vm: dict[str, Any], change: str) -> dict[str, Any]:
    """`oma.evt.inventory.vm.discovered` (docs/events.md)."""
    return {**event_envelope(), "vcenter": vcenter, "vm": {k: vm.get(k) for k in EVENT_VM_FIELDS}, "change": change}
