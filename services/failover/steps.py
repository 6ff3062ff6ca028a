"""The steps of a failover and their compensations, against the cloud.

Every step is idempotent: it reads the cloud first and adopts what an earlier, interrupted run created
(by the id recorded on its resource row, else by the row's unique name), so a resume after kill -9
never creates twice. Every creating step records the unique name before it asks, and the cloud id as
soon as the cloud answers. A compensation undoes its step from whatever state the cloud is in; the
cleanup of a test failover is the same compensations run forward (`CLEANUP_STEPS`).

A test failover (replication keeps running): validate -> quiesce (the VM's sync in flight finishes, no
new one starts) -> snapshot -> resume_replication -> clone -> convert (optional, the boot clone on the
appliance) -> create_vm -> swap_root -> attach_data -> start -> verify (shared/reference/failover.md,
route A). A live cutover boots the
replica volumes themselves: validate -> power_off_source -> final_sync (an incremental replication job
through the VMA, run to completion) -> snapshot (safety) -> convert (optional, the boot replica in
place) -> release (replication hands the volumes over;
exports off, volumes off the appliance) -> create_vm (exact name, production networks, source MACs) -> swap_root ->
attach_data -> start -> verify; its rollback detaches every volume before destroying the VM.
"""
from __future__ import annotations

import asyncio
from datetime import datetime
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from oma.shared.contracts import CloudError as CloudStackError, CloudParamError, safe_name  # noqa: F401 (st.safe_name)
from oma.shared import errors
from oma.shared.db import iso, utcnow
from oma.shared.subjects import Exports, Inventory, Replication

RUNNING_STATES = ("Running", "Starting")
# Step name -> the cleanup step that undoes it (None: nothing to undo).
TEST_STEPS = ("validate", "quiesce", "snapshot", "resume_replication", "clone", "convert", "create_vm", "swap_root",
              "attach_data", "start", "verify")
CLEANUP_STEPS = ("stop_vm", "detach_volumes", "destroy_vm", "delete_clones", "delete_snapshots")
LIVE_STEPS = ("validate", "power_off_source", "final_sync", "snapshot", "convert", "release", "create_vm",
              "swap_root", "attach_data", "start", "verify")
ROLLBACK_STEPS = ("stop_vm", "detach_volumes", "destroy_vm", "revert_snapshots", "reattach", "power_on_source",
                  "delete_snapshots")


class Resources(Protocol):
    """The resource rows of the job that owns the cloud objects (service.py implements it)."""

    async def plan(self, kind: str, ordinal: int, name: str, source_id: str | None = None) -> Any: ...
    async def record(self, row: Any, cloud_id: str) -> None: ...
    async def deleted(self, row: Any) -> None: ...
    async def rows(self, kind: str) -> list[Any]: ...


@dataclass
class Ctx:
    cloud: Any               # plugins.ossea.client.CloudStackClient
    res: Resources
    plan: dict[str, Any]     # the job's resolved inputs; steps may add to it (saved after each step)
    failover_id: str
    poll: float
    timeout: float
    bus: Any = None          # shared.bus.Bus: the source's power, the replica's exports
    save: Callable[[], Awaitable[None]] | None = None  # persist `plan` now (before acting on it)
    final_sync_timeout: float = 3600.0
    converter: Any = None    # plugins/convert.py: the plan's `convert`
    resolver: Any = None     # the device-resolver plugin: a volume attached to the appliance -> its device
    device_wait: float = 30.0
    quiesce_timeout: float = 3600.0

    @property
    def live(self) -> bool:
        return self.plan.get("mode") == "live"

    async def until(self, what: str, probe: Callable[[], Awaitable[Any]], timeout: float | None = None) -> Any:
        """Poll `probe` until it returns something truthy (cloud jobs another run left pending)."""
        loop = asyncio.get_running_loop()
        timeout = timeout or self.timeout
        deadline = loop.time() + timeout
        while True:
            found = await probe()
            if found:
                return found
            if loop.time() > deadline:
                raise errors.UpstreamTimeout("Failover step timed out", f"{what} within {timeout:g}s")
            await asyncio.sleep(self.poll)


def test_vm_name(vm_name: str, now: datetime) -> str:
    stamp = f"{now:%Y%m%d%H%M%S}"
    return f"{safe_name(vm_name, 63 - 6 - len(stamp))}-test-{stamp}"


def resource_name(failover_id: str, kind: str, ordinal: int) -> str:
    return f"{failover_id}-{kind}-{ordinal}"


# -- cloud lookups that tolerate a missing object ------------------------------------------------

async def volume(ctx: Ctx, volume_id: str) -> dict[str, Any] | None:
    try:
        found = await ctx.cloud.list_volumes(id=volume_id)
    except CloudParamError:  # an unknown id is 431
        return None
    return found[0] if found else None


async def snapshot(ctx: Ctx, snapshot_id: str) -> dict[str, Any] | None:
    try:
        found = await ctx.cloud.list_snapshots(id=snapshot_id)
    except CloudParamError:
        return None
    return found[0] if found else None


async def vm(ctx: Ctx, vm_id: str) -> dict[str, Any] | None:
    try:
        found = await ctx.cloud.list_virtual_machines(id=vm_id)
    except CloudParamError:
        return None
    return found[0] if found else None


async def _by_name(ctx: Ctx, kind: str, name: str) -> dict[str, Any] | None:
    lister = {"snapshot": ctx.cloud.list_snapshots, "volume": ctx.cloud.list_volumes,
              "vm": ctx.cloud.list_virtual_machines}[kind]
    found = [x for x in await lister(name=name) if x.get("name") == name]  # some servers match partially
    return found[0] if found else None


async def _current(ctx: Ctx, row: Any) -> dict[str, Any] | None:
    """The cloud object of a resource row: by id, else by its unique name (an id never recorded)."""
    if row.cloud_id:
        getter = {"snapshot": snapshot, "volume": volume, "stub_root": volume, "vm": vm}[row.kind]
        return await getter(ctx, row.cloud_id)
    found = await _by_name(ctx, row.kind, row.name)
    if found:
        await ctx.res.record(row, found["id"])
    return found


async def _ensure(ctx: Ctx, kind: str, ordinal: int, name: str, create: Callable[[], Awaitable[dict[str, Any]]],
                  ready: Callable[[dict[str, Any]], bool], source_id: str | None = None) -> str:
    """Create-or-adopt one cloud object: name recorded first, id as soon as known, wait until ready."""
    row = await ctx.res.plan(kind, ordinal, name, source_id)
    found = await _current(ctx, row)
    if found is None:
        submitted = await create()
        await ctx.res.record(row, submitted["id"])
        await ctx.cloud.wait_for_job(submitted["jobid"], command=kind, resource_id=submitted["id"])

    async def probe() -> dict[str, Any] | None:
        now = await _current(ctx, row)
        if now is None:
            raise errors.BadGateway("OSSEA object vanished", f"{kind} {name} ({row.cloud_id}) is gone")
        return now if ready(now) else None
    await ctx.until(f"{kind} {name} ready", probe)
    return row.cloud_id


async def _settle(ctx: Ctx, action: Callable[[], Awaitable[Any]], done: Callable[[], Awaitable[bool]]) -> None:
    """Run a state change unless it is already done; if the cloud refuses it, accept that when the
    wanted state holds anyway (an interrupted run's job got there first)."""
    if await done():
        return
    try:
        await action()
    except CloudStackError:
        if not await done():
            raise


# -- forward steps ------------------------------------------------------------------------------

async def validate(ctx: Ctx) -> None:
    p = ctx.plan
    zones = await ctx.cloud.list_zones()
    zone = next((z for z in zones if p["zone"] in (z.get("name"), z.get("id"))), None)
    if zone is None:
        raise errors.BadRequest("Zone not found", f"zone {p['zone']!r} is not visible to this OSSEA account")
    templates = await ctx.cloud.list_templates()
    template = next((t for t in templates if p["template"] in (t.get("name"), t.get("id"))), None)
    if template is None:
        raise errors.BadRequest("Stub template not found",
                                f"template {p['template']!r} is not an executable template of this account")
    offerings = await ctx.cloud.list_service_offerings()
    offering = pick_offering(offerings, p.get("service_offering"), p.get("cpus"), p.get("memory_mb"))
    known = {n["id"] for n in await ctx.cloud.list_networks()}
    missing = [n["network_id"] for n in p["nics"] if n["network_id"] not in known]
    if missing:
        raise errors.BadRequest("Network not found", f"network(s) {', '.join(missing)} are not visible in OSSEA")
    for disk in p["disks"]:
        if await volume(ctx, disk["volume_id"]) is None:
            raise errors.BadRequest("Replica volume not found",
                                    f"volume {disk['volume_id']} of disk {disk['unit']} no longer exists")
    p.update(zone_id=zone["id"], template_id=template["id"], service_offering_id=offering["id"])


def pick_offering(offerings: list[dict[str, Any]], wanted: str | None, cpus: int | None,
              memory_mb: int | None) -> dict[str, Any]:
    if wanted:
        match = next((o for o in offerings if wanted in (o.get("name"), o.get("id"))), None)
        if match is None:
            raise errors.BadRequest("Service offering not found", f"service offering {wanted!r} does not exist")
        return match
    # The smallest fixed offering that holds the source VM's CPUs and memory.
    fits = sorted((o for o in offerings if not o.get("iscustomized")
                   and o.get("cpunumber", 0) >= (cpus or 0) and o.get("memory", 0) >= (memory_mb or 0)),
                  key=lambda o: (o.get("cpunumber", 0), o.get("memory", 0)))
    if not fits:
        raise errors.BadRequest("No service offering fits",
                                f"no offering has {cpus} CPU(s) and {memory_mb} MB; name one in options")
    return fits[0]


async def quiesce(ctx: Ctx) -> None:
    """Replication pauses the VM's syncs (none is admitted from here on) and the step waits until the
    one in flight, if any, has finished: the snapshots then hold one whole sync, not a sync half copied."""
    async def idle() -> bool:
        reply = await ctx.bus.call(Replication.QUIESCE, _replica(ctx))
        return not reply["in_flight"]
    await ctx.until("the VM's sync in flight to finish", idle, ctx.quiesce_timeout)


async def resume_replication(ctx: Ctx) -> None:
    await ctx.bus.call(Replication.RESUME, _replica(ctx))


def _replica(ctx: Ctx) -> dict[str, str]:
    return {"job_id": ctx.plan["replication_job_id"], "failover_id": ctx.failover_id}


async def take_snapshots(ctx: Ctx) -> None:
    async def one(disk: dict[str, Any]) -> None:
        name = resource_name(ctx.failover_id, "snap", disk["unit"])

        async def create() -> dict[str, Any]:
            return await ctx.cloud.call("createSnapshot", volumeid=disk["volume_id"], name=name)
        await _ensure(ctx, "snapshot", disk["ordinal"], name, create,
                      lambda s: _failed_if(s, "Error", name) or s.get("state") == "BackedUp", disk["volume_id"])
    await asyncio.gather(*(one(d) for d in ctx.plan["disks"]))


def _failed_if(obj: dict[str, Any], bad: str, name: str) -> bool:
    if obj.get("state") == bad:
        raise errors.BadGateway("OSSEA operation failed", f"{name} is in state {bad}")
    return False


async def clone(ctx: Ctx) -> None:
    snaps = {r.ordinal: r.cloud_id for r in await ctx.res.rows("snapshot")}

    async def one(disk: dict[str, Any]) -> None:
        name = resource_name(ctx.failover_id, "disk", disk["unit"])

        async def create() -> dict[str, Any]:
            return await ctx.cloud.call("createVolume", snapshotid=snaps[disk["ordinal"]], name=name,
                                 zoneid=ctx.plan["zone_id"])
        await _ensure(ctx, "volume", disk["ordinal"], name, create,
                      lambda v: v.get("state") == "Ready", snaps[disk["ordinal"]])
    await asyncio.gather(*(one(d) for d in ctx.plan["disks"]))


async def create_vm(ctx: Ctx) -> None:
    p = ctx.plan

    async def create() -> dict[str, Any]:
        params: dict[str, Any] = dict(name=p["target_name"], displayname=p["target_name"], zoneid=p["zone_id"],
                                      serviceofferingid=p["service_offering_id"], templateid=p["template_id"],
                                      startvm=False, boottype=p.get("boot_type"))
        if p.get("preserve_macs"):
            for i, nic in enumerate(p["nics"]):
                params[f"iptonetworklist[{i}].networkid"] = nic["network_id"]
                if nic.get("mac"):
                    params[f"iptonetworklist[{i}].mac"] = nic["mac"]
        else:
            params["networkids"] = ",".join(n["network_id"] for n in p["nics"])
        return await ctx.cloud.call("deployVirtualMachine", **params)

    vm_id = await _ensure(ctx, "vm", 0, p["target_name"], create,
                          lambda v: _failed_if(v, "Error", p["target_name"]) or v.get("state") == "Stopped")
    # The stub ROOT the template gave: recorded so that compensation deletes it if it was detached.
    roots = await ctx.cloud.list_volumes(virtualmachineid=vm_id, type="ROOT")
    if roots and not await ctx.res.rows("stub_root"):
        row = await ctx.res.plan("stub_root", 0, roots[0]["name"])
        await ctx.res.record(row, roots[0]["id"])


async def _vm_row(ctx: Ctx) -> tuple[Any, dict[str, Any] | None]:
    rows = await ctx.res.rows("vm")
    if not rows:
        return None, None
    return rows[0], await _current(ctx, rows[0])


async def _disks(ctx: Ctx) -> dict[int, str]:
    """The volumes the VM boots on, by source order: the replicas themselves (live) or their clones."""
    if ctx.live:
        return {d["ordinal"]: d["volume_id"] for d in ctx.plan["disks"]}
    return {r.ordinal: r.cloud_id for r in await ctx.res.rows("volume") if r.cloud_id}


async def swap_root(ctx: Ctx) -> None:
    row, target = await _vm_row(ctx)
    vm_id = row.cloud_id
    boot = (await _disks(ctx))[0]

    async def root() -> dict[str, Any] | None:
        found = await ctx.cloud.list_volumes(virtualmachineid=vm_id, type="ROOT")
        return found[0] if found else None
    current = await root()
    if current and current["id"] == boot:
        return
    if current:  # the stub: detach, then delete
        await _settle(ctx, lambda: ctx.cloud.detach_volume(current["id"]),
                      lambda: _not_attached(ctx, current["id"]))
    for stub in await ctx.res.rows("stub_root"):
        await _delete_volume(ctx, stub)

    async def attached() -> bool:
        now = await root()
        return bool(now and now["id"] == boot)
    await _settle(ctx, lambda: ctx.cloud.attach_volume(boot, vm_id, device_id=0), attached)


async def _not_attached(ctx: Ctx, volume_id: str) -> bool:
    now = await volume(ctx, volume_id)
    return now is None or not now.get("virtualmachineid")


async def attach_data(ctx: Ctx) -> None:
    row, _ = await _vm_row(ctx)
    clones = await _disks(ctx)
    for ordinal in sorted(clones)[1:]:  # source order: the device ids follow the attach order
        volume_id = clones[ordinal]

        async def attached(volume_id: str = volume_id) -> bool:
            now = await volume(ctx, volume_id)
            return bool(now and now.get("virtualmachineid") == row.cloud_id)
        await _settle(ctx, lambda v=volume_id: ctx.cloud.attach_volume(v, row.cloud_id), attached)


async def start(ctx: Ctx) -> None:
    row, current = await _vm_row(ctx)

    async def running() -> bool:
        now = await vm(ctx, row.cloud_id)
        return bool(now and now.get("state") == "Running")
    if current and current.get("state") == "Starting":
        await ctx.until("VM running", running)
        return
    await _settle(ctx, lambda: ctx.cloud.start_virtual_machine(row.cloud_id), running)


async def verify(ctx: Ctx) -> None:
    row, current = await _vm_row(ctx)
    if not current or current.get("state") != "Running":
        raise errors.BadGateway("Failover VM not running", f"{row.name} is {current and current.get('state')}")
    clones = await _disks(ctx)
    attached = await ctx.cloud.list_volumes(virtualmachineid=row.cloud_id)
    by_device = [v["id"] for v in sorted(attached, key=lambda v: v.get("deviceid", 0))]
    wanted = [clones[o] for o in sorted(clones)]
    if by_device != wanted:
        raise errors.BadGateway("Failover VM disks wrong", f"expected {wanted} in order, found {by_device}")
    nics = await ctx.cloud.list_nics(row.cloud_id)
    networks = [n["networkid"] for n in sorted(nics, key=lambda n: int(n.get("deviceid", 0)))]
    if networks != [n["network_id"] for n in ctx.plan["nics"]]:
        raise errors.BadGateway("Failover VM networks wrong", f"NICs on {networks}")
    if ctx.plan.get("preserve_macs"):
        macs = [n["macaddress"] for n in sorted(nics, key=lambda n: int(n.get("deviceid", 0)))]
        wanted_macs = [(n.get("mac") or "").lower() for n in ctx.plan["nics"]]
        if any(w and w != m for w, m in zip(wanted_macs, macs)):
            raise errors.BadGateway("Failover VM MACs wrong", f"expected {wanted_macs}, found {macs}")
    ctx.plan["target_vm_id"] = row.cloud_id


async def convert(ctx: Ctx) -> None:
    """The guest conversion (plugins/convert.py) of the boot disk on the appliance: a test converts its
    boot clone (attached to the appliance for it, then detached; a failure leaves it to the clone's
    undo), a live cutover the boot replica in place (still attached; its undo puts the replica back to
    the safety snapshot). A converter's failure fails the step with the converter's own message."""
    if ctx.converter is None or ctx.plan.get("convert", "none") == "none" or ctx.plan.get("converted"):
        return
    boot, oma = (await _disks(ctx))[0], ctx.plan["oma_vm_id"]

    async def on_oma() -> bool:
        now = await volume(ctx, boot)
        return bool(now and now.get("virtualmachineid") == oma)
    if not ctx.live:
        await _settle(ctx, lambda: ctx.cloud.attach_volume(boot, oma), on_oma)
    device = await ctx.resolver.resolve(boot, ctx.device_wait)
    ctx.plan["convert_started"] = True  # the disk may change from here on
    await ctx.save()
    result = await ctx.converter.convert(device)
    if not ctx.live:
        await _settle(ctx, lambda: ctx.cloud.detach_volume(boot), lambda: _not_attached(ctx, boot))
    ctx.plan["converted"] = bool(result.get("converted"))


async def undo_live_convert(ctx: Ctx) -> None:
    """A conversion that started may have changed the boot replica: every replica goes back to its
    safety snapshot (off the appliance, as a revert needs), then back on it with its exports; replication
    is told whether the revert worked. Nothing to do when the release's undo already did it."""
    if ctx.plan.get("convert_started") and not ctx.plan.get("restored"):
        await release(ctx)
        await revert_and_reattach(ctx)


# -- compensations (and the cleanup of a test failover) ---------------------------------------

async def stop_vm(ctx: Ctx) -> None:
    row, current = await _vm_row(ctx)
    if current is None or current.get("state") in ("Stopped", "Destroyed", "Expunging"):
        return

    async def stopped() -> bool:
        now = await vm(ctx, row.cloud_id)
        return now is None or now.get("state") == "Stopped"
    if current.get("state") in RUNNING_STATES + ("Stopping",):
        if current.get("state") == "Starting":
            await ctx.until("VM started before stop", lambda: _in(ctx, row.cloud_id, ("Running", "Stopped")))
        await _settle(ctx, lambda: ctx.cloud.stop_virtual_machine(row.cloud_id, forced=True), stopped)


async def _in(ctx: Ctx, vm_id: str, states: tuple[str, ...]) -> bool:
    now = await vm(ctx, vm_id)
    return now is None or now.get("state") in states


async def detach_volumes(ctx: Ctx) -> None:
    """Every clone off the VM, ROOT included (the VM is stopped first): destroying the VM must not
    take a disk with it, and delete_clones deletes them by id."""
    row, current = await _vm_row(ctx)
    if current is None:
        return
    await stop_vm(ctx)
    clones = await _disks(ctx)
    for ordinal in sorted(clones, reverse=True):
        volume_id = clones[ordinal]
        now = await volume(ctx, volume_id)
        if now and now.get("virtualmachineid") == row.cloud_id:
            await _settle(ctx, lambda v=volume_id: ctx.cloud.detach_volume(v), lambda v=volume_id: _not_attached(ctx, v))


async def destroy_vm(ctx: Ctx) -> None:
    """Expunge the VM, never with one of our disks on it (a live VM's ROOT is the replica)."""
    await detach_volumes(ctx)
    row, current = await _vm_row(ctx)
    if current is not None:
        if current.get("state") == "Destroyed":
            await _settle(ctx, lambda: ctx.cloud.call_async("expungeVirtualMachine", id=row.cloud_id),
                          lambda: _gone(ctx, row.cloud_id))
        else:
            await stop_vm(ctx)
            await _settle(ctx, lambda: ctx.cloud.destroy_virtual_machine(row.cloud_id, expunge=True),
                          lambda: _gone(ctx, row.cloud_id))
    if row is not None:
        await ctx.res.deleted(row)
    for stub in await ctx.res.rows("stub_root"):
        await _delete_volume(ctx, stub)


async def _gone(ctx: Ctx, vm_id: str) -> bool:
    return await vm(ctx, vm_id) is None


async def _delete_volume(ctx: Ctx, row: Any) -> None:
    if row.state == "deleted":
        return
    current = await _current(ctx, row)
    if current is not None:
        if current.get("virtualmachineid"):
            await _settle(ctx, lambda: ctx.cloud.detach_volume(current["id"]),
                          lambda: _not_attached(ctx, current["id"]))
        await _settle(ctx, lambda: ctx.cloud.delete_volume(current["id"]),
                      lambda: _volume_gone(ctx, current["id"]))
    await ctx.res.deleted(row)


async def _volume_gone(ctx: Ctx, volume_id: str) -> bool:
    return await volume(ctx, volume_id) is None


async def delete_clones(ctx: Ctx) -> None:
    await asyncio.gather(*(_delete_volume(ctx, row) for row in await ctx.res.rows("volume")))


async def delete_snapshots(ctx: Ctx) -> None:
    async def one(row: Any) -> None:
        if row.state == "deleted":
            return
        current = await _current(ctx, row)
        if current is not None:
            await _settle(ctx, lambda: ctx.cloud.delete_snapshot(current["id"]),
                          lambda: _snapshot_gone(ctx, current["id"]))
        await ctx.res.deleted(row)
    await asyncio.gather(*(one(row) for row in await ctx.res.rows("snapshot")))


async def _snapshot_gone(ctx: Ctx, snapshot_id: str) -> bool:
    return await snapshot(ctx, snapshot_id) is None


# -- live cutover and rollback: the source and the appliance's side ------------------------------

async def _power(ctx: Ctx, action: str) -> dict[str, Any]:
    p = ctx.plan
    return await ctx.bus.call(Inventory.POWER, {"vcenter": p["vcenter"], "vm_id": p["source_vm_id"],
                                                "action": action, "shutdown_timeout": p["shutdown_timeout"]},
                              timeout=p["shutdown_timeout"] + 60)


async def power_off_source(ctx: Ctx) -> None:
    if not ctx.plan.get("power_off_source"):
        return
    if "source_power" not in ctx.plan:  # recorded before acting: a resume must not read "off" as the old state
        ctx.plan["source_power"] = (await _power(ctx, "state"))["power_state"]
        await ctx.save()
    await _power(ctx, "off")


async def final_sync(ctx: Ctx) -> None:
    """The last incremental sync, after the source stopped writing: a replication job of the VM that
    replication starts through the VMA (services/replication/driver.py) and runs to `completed`.
    Its request time is recorded before the request, so a restart finds the job instead of asking twice."""
    p = ctx.plan
    if not p.get("final_sync"):
        return
    if not p.get("final_sync_job_id"):
        job_id = await _final_sync_requested(ctx) if p.get("final_sync_requested_at") else None
        if job_id is None:
            p["final_sync_requested_at"] = iso(utcnow())
            await ctx.save()
            reply = await ctx.bus.call(Replication.CREATE, {
                "source_vm": p["source_vm"], "ossea_config_id": p["ossea_config_id"],
                "replication_type": "incremental", "start_sync": True}, timeout=p["provision_wait"] + 30)
            job_id = reply["job_id"]
        p["final_sync_job_id"] = job_id
        await ctx.save()
    job_id = p["final_sync_job_id"]

    async def completed() -> bool:
        job = await ctx.bus.call(Replication.GET, {"job_id": job_id})
        if job["status"] in ("failed", "cancelled"):
            raise errors.BadGateway("Final sync failed", f"replication job {job_id} {job['status']}: {job.get('error')}")
        return job["status"] == "completed"
    await ctx.until(f"final sync {job_id} completed", completed, ctx.final_sync_timeout)
    p["replication_job_id"] = job_id  # the job that holds the replica now: the hand-over names it


async def _final_sync_requested(ctx: Ctx) -> str | None:
    """The VM's replication job created since the final sync was requested, if that request landed."""
    listed = await ctx.bus.call(Replication.LIST, {"vm_name": ctx.plan["vm_name"], "limit": 5})
    since = ctx.plan["final_sync_requested_at"]
    return next((j["job_id"] for j in listed.get("jobs", []) if (j.get("created_at") or "") >= since), None)


async def power_on_source(ctx: Ctx) -> None:
    if ctx.plan.get("source_power") == "poweredOn":
        await _power(ctx, "on")


async def release(ctx: Ctx) -> None:
    """The replica leaves the appliance: replication hands its volumes over to the new VM (no sync,
    delete or cleanup of the VM touches them from now on; 409 while a sync runs), its exports stop
    serving, its volumes are detached."""
    await ctx.bus.call(Replication.HANDOVER, _replica(ctx))
    for disk in ctx.plan["disks"]:
        if disk.get("export_name"):
            await ctx.bus.call(Exports.DEACTIVATE, {"export_name": disk["export_name"]})
        await _settle(ctx, lambda v=disk["volume_id"]: ctx.cloud.detach_volume(v),
                      lambda v=disk["volume_id"]: _not_attached(ctx, v))


async def reattach(ctx: Ctx) -> None:
    """The replica back on the appliance, each export serving its device again."""
    oma = ctx.plan["oma_vm_id"]
    for disk in ctx.plan["disks"]:
        async def on_oma(v: str = disk["volume_id"]) -> bool:
            now = await volume(ctx, v)
            return bool(now and now.get("virtualmachineid") == oma)
        await _settle(ctx, lambda v=disk["volume_id"]: ctx.cloud.attach_volume(v, oma), on_oma)
        if disk.get("export_name"):
            await ctx.bus.call(Exports.ENSURE, {"vm_id": disk["export_vm_id"], "disk_unit_number": disk["unit"],
                                                "vm_name": ctx.plan["vm_name"], "device_path": disk["device_path"]})
    # Replication takes the volumes back; without a revert their change ids are void (a full sync next).
    await ctx.bus.call(Replication.RECLAIM, {**_replica(ctx), "reverted": bool(ctx.plan.get("reverted", True))})


async def revert_snapshots(ctx: Ctx) -> None:
    """Back to the safety snapshots where the storage can; `reverted` tells replication whether the old
    change ids still describe the disks."""
    reverted = True
    for row in await ctx.res.rows("snapshot"):
        if row.state == "deleted" or not row.cloud_id:
            continue
        now = await volume(ctx, row.source_id)
        if now and now.get("virtualmachineid") == ctx.plan["oma_vm_id"]:
            continue  # it never left the appliance: unchanged (and a running VM's disk cannot revert)
        try:
            await ctx.cloud.revert_snapshot(row.cloud_id)
        except CloudParamError as exc:
            if "not supported" not in exc.errortext:
                raise
            reverted = False
    ctx.plan["reverted"] = reverted


async def revert_and_reattach(ctx: Ctx) -> None:
    await revert_snapshots(ctx)
    await reattach(ctx)
    ctx.plan["restored"] = True
    await ctx.save()


Step = Callable[[Ctx], Awaitable[None]]
RUN: dict[str, Step] = {
    "validate": validate, "quiesce": quiesce, "resume_replication": resume_replication, "snapshot": take_snapshots,
    "clone": clone, "convert": convert, "create_vm": create_vm,
    "swap_root": swap_root, "attach_data": attach_data, "start": start, "verify": verify,
    "stop_vm": stop_vm, "detach_volumes": detach_volumes, "destroy_vm": destroy_vm,
    "delete_clones": delete_clones, "delete_snapshots": delete_snapshots,
    "power_off_source": power_off_source, "final_sync": final_sync, "release": release, "revert_snapshots": revert_snapshots,
    "reattach": reattach, "power_on_source": power_on_source}
# What undoes each forward step (run in reverse order on failure).
UNDO: dict[str, Step | None] = {
    "validate": None, "quiesce": resume_replication, "resume_replication": None, "snapshot": delete_snapshots,
    "clone": delete_clones, "convert": None, "create_vm": destroy_vm,
    "swap_root": detach_volumes, "attach_data": detach_volumes, "start": stop_vm, "verify": None}
# A live cutover's undo puts the replica back as it was: reverted while it is off the appliance (the VM
# may have written to it), then on the appliance with its exports; the source powered on.
UNDO_LIVE: dict[str, Step | None] = {
    **UNDO, "power_off_source": power_on_source, "convert": undo_live_convert, "release": revert_and_reattach}
