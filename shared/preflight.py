"""Preflight: can a VM be replicated (and later failed over) before a byte moves? One module, two users:
replication's create runs it and refuses with the failed checks (400), and `POST /api/v1/preflight`
(the scheduler, through replication's `oma.replication.preflight.check`) shows the same checks, so
both say the same thing with the same reasons (docs/scheduler.md "Preflight").

Each check is `pass`, `warn` (unknown, or it will wait) or `fail` (it cannot work):
- `cbt`: Changed Block Tracking on the source VM: the VMA's `cbt-status` when a VMA reaches its vCenter,
  else the inventory's record (read from vSphere). Off fails an incremental
  (a warm migration needs deltas); an initial full copy only warns.
- `disk_slots`: the disks that need a new volume against the appliance VM's capacity (fail) and its
  free slots now (warn: the job waits in the queue).
- `volume_limit`: the cloud account's volumes left (listAccounts `volumeavailable`).
- `disk_offering`: the cloud account offers a customized disk offering (volumes are made to the exact
  size of each source disk).
- `network`: every NIC's source network has a network mapping (failover needs one).
- `target_name`: no VM in the cloud already has the name the VM gets at cutover.
- `power_state`: on or off passes; suspended warns (its memory state is not migrated).
- `snapshots`: snapshots on the source VM (the inventory's count, read from vSphere). With CBT off they
  block enabling (resetting) CBT, so an incremental fails (a full copy warns) until they are removed;
  with CBT on they only warn (each sync's own snapshot grows the chain). Unknown (a VMA's discovery
  does not report them) warns.
A fact that cannot be read (a service or the cloud not answering, a backend without the call) gives
`warn`, never `fail`: preflight refuses only what it knows cannot work.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from oma.shared import errors
from oma.shared.contracts import safe_name
from oma.shared.subjects import Failover, Inventory

log = logging.getLogger("oma.preflight")

PASS, WARN, FAIL = "pass", "warn", "fail"
CHECKS = ("cbt", "disk_slots", "volume_limit", "disk_offering", "network", "target_name", "power_state",
          "snapshots")
FACT_TIMEOUT = 10.0  # seconds for each fact read: a slow service makes a warn, not a hung create

Call = Callable[[str, Any], Awaitable[Any]]


@dataclass
class Facts:
    vm_name: str
    target_name: str
    new_disks: int = 0          # disks that need a new volume (the others reuse the VM's)
    capacity: int = 0           # data disks the appliance VM may hold for replication
    free_slots: int = 0         # of those, free now
    cbt_enabled: bool | None = None         # None: the inventory does not know the VM
    networks: list[str] = field(default_factory=list)  # source networks of the NICs
    unmapped: list[str] | None = None       # None: the mappings could not be read
    volumes_available: int | None = None    # None: unlimited
    volumes_known: bool = False
    taken_by: str | None = None             # id of the cloud VM that has the target name
    names_known: bool = False
    custom_offering: bool | None = None     # None: the disk offerings could not be read
    power_state: str | None = None          # the inventory's (poweredOn, poweredOff, suspended)
    snapshots: int | None = None            # None: the source did not report them


def check(name: str, status: str, reason: str) -> dict[str, str]:
    return {"check": name, "status": status, "reason": reason}


def evaluate(f: Facts, *, incremental: bool = True) -> list[dict[str, str]]:
    """The checks of one VM, in CHECKS order."""
    out = []
    if f.cbt_enabled is None:
        out.append(check("cbt", WARN, f"CBT state of {f.vm_name} unknown: the VM is not in the inventory "
                                      "(run a discovery)"))
    elif not f.cbt_enabled:
        out.append(check("cbt", FAIL if incremental else WARN,
                         f"CBT (changed block tracking) is off on {f.vm_name}: incremental syncs cannot copy "
                         "deltas; enable it in vSphere (ctkEnabled)"))
    else:
        out.append(check("cbt", PASS, "CBT enabled"))
    if f.new_disks > f.capacity:
        out.append(check("disk_slots", FAIL, f"{f.vm_name} needs {f.new_disks} new data disks; the appliance VM "
                                             f"holds at most {f.capacity} for replication"))
    elif f.new_disks > f.free_slots:
        out.append(check("disk_slots", WARN, f"{f.vm_name} needs {f.new_disks} new data disks; {f.free_slots} of "
                                             f"{f.capacity} are free now: the job waits in the queue"))
    else:
        out.append(check("disk_slots", PASS, f"{f.new_disks} new data disk(s); {f.free_slots} slot(s) free"))
    if not f.volumes_known:
        out.append(check("volume_limit", WARN, "the cloud account's volume limit could not be read"))
    elif f.volumes_available is not None and f.new_disks > f.volumes_available:
        out.append(check("volume_limit", FAIL, f"the cloud account's volume limit is reached: "
                                               f"{f.volumes_available} more volume(s) allowed, {f.vm_name} "
                                               f"needs {f.new_disks}"))
    else:
        left = "unlimited" if f.volumes_available is None else f"{f.volumes_available} left"
        out.append(check("volume_limit", PASS, f"account volumes: {left}"))
    if f.custom_offering is None:
        out.append(check("disk_offering", WARN, "the cloud's disk offerings could not be read"))
    elif not f.custom_offering:
        out.append(check("disk_offering", FAIL, "the cloud account offers no customized disk offering "
                                                "(iscustomized=true): volumes cannot be made to each disk's size"))
    else:
        out.append(check("disk_offering", PASS, "a customized disk offering is present"))
    if f.unmapped is None:
        out.append(check("network", WARN, "the network mappings could not be read (failover not answering)"))
    elif f.unmapped:
        out.append(check("network", FAIL, f"no network mapping for {', '.join(repr(n) for n in f.unmapped)}: "
                                          "add one (POST /api/v1/network/mappings)"))
    else:
        out.append(check("network", PASS, f"{len(f.networks)} NIC network(s) mapped" if f.networks else "no NICs"))
    if not f.names_known:
        out.append(check("target_name", WARN, "the target cloud's VM names could not be read"))
    elif f.taken_by:
        out.append(check("target_name", FAIL, f"a VM named {f.target_name!r} already exists in the target cloud "
                                              f"(id {f.taken_by})"))
    else:
        out.append(check("target_name", PASS, f"{f.target_name!r} is free in the target cloud"))
    if f.power_state in ("poweredOn", "poweredOff"):
        out.append(check("power_state", PASS, f"{f.vm_name} is {f.power_state}"))
    elif f.power_state == "suspended":
        out.append(check("power_state", WARN, f"{f.vm_name} is suspended: its memory state is not migrated "
                                              "(it boots cold in the cloud)"))
    else:
        out.append(check("power_state", WARN, f"the power state of {f.vm_name} is unknown"))
    out.append(_snapshots(f, incremental))
    return out


def _snapshots(f: Facts, incremental: bool) -> dict[str, str]:
    if f.snapshots is None:
        return check("snapshots", WARN, f"the source did not report snapshots of {f.vm_name} (a discovery "
                                        "through a VMA does not): check in vSphere that it has none")
    if not f.snapshots:
        return check("snapshots", PASS, "no snapshots")
    if f.cbt_enabled is False:
        return check("snapshots", FAIL if incremental else WARN,
                     f"{f.vm_name} has {f.snapshots} snapshot(s) and CBT is off: CBT cannot be enabled (reset) "
                     "while snapshots exist; remove them first (delete all snapshots in vSphere)")
    return check("snapshots", WARN, f"{f.vm_name} has {f.snapshots} snapshot(s): CBT is on, but remove them "
                                    "before a CBT reset is needed (each sync adds its own to the chain)")


def failed(checks: list[dict[str, str]]) -> list[dict[str, str]]:
    return [c for c in checks if c["status"] == FAIL]


def refuse_if_failed(vm_name: str, checks: list[dict[str, str]]) -> None:
    """400 naming every failed check (the same reasons preflight shows)."""
    bad = failed(checks)
    if bad:
        reasons = "; ".join(f"{c['check']}: {c['reason']}" for c in bad)
        raise errors.BadRequest("Preflight failed", f"VM {vm_name}: {reasons}")


def target_name(vm_name: str) -> str:
    """The name the VM gets in the cloud at cutover: failover's."""
    return safe_name(vm_name, 63)  # the name failover gives it


async def quietly(what: str, coro: Awaitable[Any]) -> Any:
    """A fact, or None when it cannot be read in time (logged: the check then warns)."""
    try:
        async with asyncio.timeout(FACT_TIMEOUT):
            return await coro
    except (errors.OmaError, TimeoutError, OSError) as exc:
        log.info("preflight fact unavailable", extra={"fact": what, "reason": type(exc).__name__})
        return None
    except Exception:  # noqa: BLE001 - a bug in one fact's reader: a warn, never a failed create
        log.exception("preflight fact reader failed", extra={"fact": what})
        return None


def _inventory_vm(found: Any, vm: dict[str, Any]) -> dict[str, Any] | None:
    if not found:
        return None
    vms = [v for v in found.get("vms", []) if v.get("name") == vm["name"]]
    return next((v for v in vms if v.get("id") == vm.get("id") or
                 (vm.get("uuid") and v.get("uuid") == vm.get("uuid"))), vms[0] if vms else None)


def _unmapped(networks: list[str], vcenter: str | None, reply: Any) -> list[str] | None:
    if reply is None:
        return None
    mapped = {(m.get("vcenter") or "", m["source_network"]) for m in reply.get("mappings", [])
              if m.get("production_network_id") or m.get("test_network_id")}
    return [n for n in dict.fromkeys(networks) if (vcenter or "", n) not in mapped and ("", n) not in mapped]


def _available(accounts: list[dict[str, Any]] | None) -> tuple[bool, int | None]:
    if not accounts:
        return False, None
    left = str(accounts[0].get("volumeavailable", "Unlimited"))
    return True, (None if left.lower() == "unlimited" or not left.lstrip("-").isdigit() else max(int(left), 0))


async def gather(vm: dict[str, Any], *, call: Call, client: Any, new_disks: int, capacity: int,
                 free_slots: int, cbt_probe: Callable[[dict[str, Any]], Awaitable[bool | None]]) -> Facts:
    """The facts of a `source_vm` (as a request gives it): the inventory's record and the network
    mappings over the bus (`call`), CBT from the VM's VMA (`cbt_probe`, given the inventory's record),
    the account and the target names from the cloud (`client`), the slots from the caller
    (replication's admission)."""
    name = vm["name"]
    facts = Facts(vm_name=name, target_name=target_name(name), new_disks=new_disks, capacity=capacity,
                  free_slots=free_slots)
    listers = {k: getattr(client, k, None) for k in ("list_accounts", "list_virtual_machines",
                                                     "list_disk_offerings")}
    found, mappings, accounts, named, offerings = await asyncio.gather(
        quietly("inventory", call(Inventory.LIST, {"name": name, "limit": 1000})),
        quietly("network mappings", call(Failover.MAPPINGS, {"action": "get"})),
        quietly("accounts", listers["list_accounts"]()) if listers["list_accounts"] else asyncio.sleep(0),
        quietly("target names", listers["list_virtual_machines"](name=facts.target_name))
        if listers["list_virtual_machines"] else asyncio.sleep(0),
        quietly("disk offerings", listers["list_disk_offerings"]())
        if listers["list_disk_offerings"] else asyncio.sleep(0))
    known = _inventory_vm(found, vm)
    if known is not None:
        probed = await quietly("cbt through the VMA", cbt_probe(known))
        facts.cbt_enabled = bool(known.get("cbt_enabled")) if probed is None else probed
    nics = vm.get("nics") if isinstance(vm.get("nics"), list) else (known or {}).get("nics") or []
    facts.networks = [str(n["network"]) for n in nics if isinstance(n, dict) and n.get("network")]
    facts.unmapped = _unmapped(facts.networks, (known or {}).get("vcenter"), mappings) if facts.networks else []
    facts.volumes_known, facts.volumes_available = _available(accounts)
    if offerings is not None:
        facts.custom_offering = any(o.get("iscustomized") for o in offerings)
    facts.power_state = (known or {}).get("power_state") or vm.get("power_state")
    facts.snapshots = (known or {}).get("snapshot_count")
    if named is not None:
        facts.names_known = True
        facts.taken_by = next((v.get("id") for v in named if v.get("name") == facts.target_name), None)
    return facts
