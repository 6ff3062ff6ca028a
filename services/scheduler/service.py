"""Protection groups, schedules and executions (docs/scheduler.md).

The round (`Scheduler.tick`, every `scheduler_tick` seconds) fires due schedules, follows the running
syncs, and starts the waiting VMs of each group while fewer than `max_concurrent` run. Several
scheduler processes may share one database: every decision is a database one.
- A schedule fires once: a process moves its `next_run_at` from the value it read (a conditional
  UPDATE); the one whose UPDATE changed the row creates the executions, in the same transaction.
- A VM starts once: a process locks the group's row (SELECT ... FOR UPDATE), counts the group's
  active VMs, and marks the next waiting ones `starting` with its own name before it commits; only
  then does it call replication, and only the process named on the row records the outcome.
A VM left `starting` longer than `scheduler_start_lease` (its process died mid-call) is recorded
failed, never started again: a job may exist for it (it carries the schedule_execution_id).
"""
from __future__ import annotations

import asyncio
import fnmatch
import secrets
from datetime import datetime, timedelta
from typing import Any

import orjson
from prometheus_client import Counter, Histogram
from sqlalchemy import delete, exists, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from oma.services.scheduler import timing
from oma.services.scheduler.models import (
    E_COMPLETED,
    E_RUNNING,
    E_SKIPPED,
    V_ACTIVE,
    V_COMPLETED,
    V_FAILED,
    V_OPEN,
    V_PENDING,
    V_RUNNING,
    V_SKIPPED,
    V_STARTING,
    V_STATES,
    Execution,
    ExecutionVm,
    GroupVm,
    ProtectionGroup,
    Schedule,
)
from oma.shared import errors
from oma.shared.bus import Reply
from oma.shared.db import iso, limit_offset, utcnow
from oma.shared.schemas import GroupRequest, PreflightRequest, ScheduleRequest
from oma.shared.subjects import Inventory, Replication

DEFAULT_MAX_CONCURRENT = 5
TIMING_FIELDS = {"interval_seconds", "cron", "window_start", "window_end", "jitter_seconds"}
FOLLOW_CONCURRENCY = 16  # job reads in flight while following running syncs
PREFLIGHT_CONCURRENCY = 8
START_CONCURRENCY = 32  # creates in flight from one round
INVENTORY_PAGE = 1000  # the inventory's largest page
JOB_DONE = {"completed": V_COMPLETED, "failed": V_FAILED, "cancelled": V_FAILED}

TICKS = Counter("oma_scheduler_ticks_total", "Scheduler rounds", ["result"])
TICK_DURATION = Histogram("oma_scheduler_tick_duration_seconds", "One scheduler round",
                          buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10))
EXECUTIONS = Counter("oma_scheduler_executions_total", "Executions created by a firing schedule", ["status"])
STARTS = Counter("oma_scheduler_vm_starts_total", "Scheduled VM syncs by outcome of the start", ["result"])


def now_s() -> datetime:
    """Whole seconds: what a MariaDB DATETIME keeps, so a value read back compares equal."""
    return utcnow().replace(microsecond=0)


def _names(names: list[str] | None) -> list[str]:
    """Once each, compared as MariaDB's collation does (case-insensitively): the first spelling wins."""
    seen: set[str] = set()
    return [n for n in names or [] if not (n.casefold() in seen or seen.add(n.casefold()))]


def _json(value: dict[str, Any] | None) -> str | None:
    return orjson.dumps(value).decode() if value else None  # `{}` removes


def _loaded(text: str | None) -> dict[str, Any] | None:
    return orjson.loads(text) if text else None


def _require(values: dict[str, Any], names: tuple[str, ...], action: str, what: str) -> None:
    missing = [n for n in names if values.get(n) is None]
    if missing:
        raise errors.BadRequest("Missing required fields", f"{action} needs {what} fields: {', '.join(missing)}")


def _id(value: int | None, action: str) -> int:
    if value is None:
        raise errors.BadRequest("Missing required fields", f"{action} needs id")
    return value


class Scheduler:
    def __init__(self, *, settings: Any, bus: Any, sessions: Any, log: Any, instance: str, spawn: Any):
        self.settings = settings
        self.bus = bus
        self.sessions = sessions
        self.log = log
        self.instance = instance  # names this process on the rows it claims
        self.spawn = spawn

    # -- schedules ------------------------------------------------------------------------------

    @staticmethod
    def schedule_public(s: Schedule) -> dict[str, Any]:
        return {"id": s.id, "name": s.name, "interval_seconds": s.interval_seconds, "cron": s.cron,
                "window_start": s.window_start, "window_end": s.window_end, "jitter_seconds": s.jitter_seconds,
                "max_concurrent": s.max_concurrent, "skip_if_running": s.skip_if_running, "enabled": s.enabled,
                "next_run_at": iso(s.next_run_at) if s.enabled else None, "last_run_at": iso(s.last_run_at),
                "created_at": iso(s.created_at), "updated_at": iso(s.updated_at)}

    async def _schedule(self, db: AsyncSession, schedule_id: int) -> Schedule:
        row = await db.get(Schedule, schedule_id)
        if row is None:
            raise errors.NotFound("Schedule not found", f"No schedule found with ID: {schedule_id}")
        return row

    def _check_timing(self, values: dict[str, Any]) -> None:
        interval, cron = values.get("interval_seconds"), values.get("cron")
        if interval is not None and cron is not None:
            raise errors.BadRequest("Validation failed", "schedule: give interval_seconds or cron, not both")
        if interval is not None and interval < self.settings.scheduler_min_interval:
            raise errors.BadRequest("Validation failed", f"schedule.interval_seconds: at least "
                                    f"{self.settings.scheduler_min_interval:g} (OMA_SCHEDULER_MIN_INTERVAL)")
        if cron is not None:
            timing.check_cron(cron, self.settings.scheduler_min_interval)

    @staticmethod
    def _next(s: Schedule, after: datetime) -> datetime:
        return timing.next_run(after, interval=s.interval_seconds, cron=s.cron, jitter=s.jitter_seconds,
                               window=timing.window_of(s.window_start, s.window_end))

    def _first(self, s: Schedule, now: datetime) -> datetime:
        """An interval schedule runs at once (a warm migration starts syncing), a cron one at its time;
        both inside the window."""
        return self._next(s, now) if s.cron else timing.window_open(now, timing.window_of(s.window_start, s.window_end))

    async def schedules(self, req: ScheduleRequest) -> dict[str, Any] | Reply:
        values = req.schedule.model_dump(exclude_none=True) if req.schedule else {}
        self._check_timing(values)
        now = now_s()
        if req.action == "get":
            async with self.sessions() as db:
                if req.id is not None:
                    return {"success": True, "schedule": self.schedule_public(await self._schedule(db, req.id))}
                rows = (await db.scalars(select(Schedule).order_by(Schedule.id))).all()
                return {"success": True, "schedules": [self.schedule_public(s) for s in rows]}
        if req.action == "create":
            _require(values, ("name",), "create", "schedule")
            if values.get("interval_seconds") is None and values.get("cron") is None:
                raise errors.BadRequest("Missing required fields", "create needs schedule interval_seconds or cron")
            row = Schedule(name=values["name"], interval_seconds=values.get("interval_seconds"),
                           cron=values.get("cron"),
                           window_start=values.get("window_start") or None, window_end=values.get("window_end") or None,
                           jitter_seconds=values.get("jitter_seconds", 0),
                           max_concurrent=values.get("max_concurrent", DEFAULT_MAX_CONCURRENT),
                           skip_if_running=values.get("skip_if_running", True), enabled=values.get("enabled", True),
                           created_at=now, updated_at=now)
            row.next_run_at = self._first(row, now)  # 400 for half a window
            await self._save(row, lambda db: db.add(row), "Schedule", row.name)
            return Reply({"success": True, "message": "Schedule created successfully",
                          "schedule": self.schedule_public(row)}, status=201)
        schedule_id = _id(req.id, req.action)
        if req.action == "delete":
            async with self.sessions.begin() as db:
                row = await self._schedule(db, schedule_id)
                await db.execute(update(ProtectionGroup).where(ProtectionGroup.schedule_id == schedule_id)
                                 .values(schedule_id=None, updated_at=now))
                await db.delete(row)
            return {"success": True, "message": f"Schedule {row.name!r} (ID {row.id}) deleted", "id": row.id}
        if req.action == "run":
            async with self.sessions.begin() as db:
                row = await self._schedule(db, schedule_id)
                if not row.enabled:
                    raise errors.Conflict("Schedule disabled", f"schedule {row.id} ({row.name}) is disabled")
                row.next_run_at, row.updated_at = now, now
            return {"success": True, "message": "Schedule runs at the next round",
                    "schedule": self.schedule_public(row)}
        if not values:
            raise errors.BadRequest("Missing required fields", "update needs a schedule with at least one field")
        async with self.sessions.begin() as db:
            row = await self._schedule(db, schedule_id)
            woke = values.get("enabled") is True and not row.enabled
            for key, value in values.items():
                setattr(row, key, (value or None) if key.startswith("window_") else value)  # "": none
            if "interval_seconds" in values:  # one way of timing replaces the other
                row.cron = None
            elif "cron" in values:
                row.interval_seconds = None
            timing.window_of(row.window_start, row.window_end)  # both ends, or neither, once merged
            if woke or TIMING_FIELDS & values.keys():  # the next run follows the new timing from the last one
                row.next_run_at = max(self._first(row, now), self._next(row, row.last_run_at)) \
                    if row.last_run_at else self._first(row, now)
            row.updated_at = now
            await self._flush(db, "Schedule", row.name)
        return {"success": True, "message": "Schedule updated successfully", "schedule": self.schedule_public(row)}

    async def _save(self, row: Any, add: Any, label: str, name: str) -> None:
        async with self.sessions.begin() as db:
            add(db)
            await self._flush(db, label, name)

    @staticmethod
    async def _flush(db: AsyncSession, label: str, name: str) -> None:
        try:
            await db.flush()
        except IntegrityError:
            raise errors.Conflict(f"{label} exists", f"a {label.lower()} named {name!r} already exists") from None

    # -- groups ---------------------------------------------------------------------------------

    async def _group(self, db: AsyncSession, group_id: int, *, lock: bool = False) -> ProtectionGroup:
        q = select(ProtectionGroup).where(ProtectionGroup.id == group_id)
        row = (await db.scalars(q.with_for_update() if lock else q)).one_or_none()
        if row is None:
            raise errors.NotFound("Group not found", f"No protection group found with ID: {group_id}")
        return row

    async def _groups_public(self, db: AsyncSession, groups: list[ProtectionGroup]) -> list[dict[str, Any]]:
        ids = [g.id for g in groups]
        vms: dict[int, list[str]] = {i: [] for i in ids}
        schedules: dict[int, Schedule] = {}
        if ids:
            for gid, name in (await db.execute(select(GroupVm.group_id, GroupVm.vm_name)
                                               .where(GroupVm.group_id.in_(ids)).order_by(GroupVm.id))).all():
                vms[gid].append(name)
            sids = {g.schedule_id for g in groups if g.schedule_id}
            if sids:
                schedules = {s.id: s for s in await db.scalars(select(Schedule).where(Schedule.id.in_(sids)))}
        out = []
        for g in groups:
            s = schedules.get(g.schedule_id) if g.schedule_id else None
            out.append({"id": g.id, "name": g.name, "description": g.description,
                        "ossea_config_id": g.ossea_config_id, "schedule_id": g.schedule_id,
                        "vm_filter": _loaded(g.vm_filter), "defaults": _loaded(g.defaults),
                        "next_run_at": iso(s.next_run_at) if s is not None and s.enabled else None,
                        "vm_names": vms[g.id], "vm_count": len(vms[g.id]),
                        "created_at": iso(g.created_at), "updated_at": iso(g.updated_at)})
        return out

    async def _set_vms(self, db: AsyncSession, group_id: int, names: list[str], *, replace: bool) -> None:
        if replace:
            await db.execute(delete(GroupVm).where(GroupVm.group_id == group_id, GroupVm.vm_name.not_in(names)))
        have = {n.casefold() for n in (await db.scalars(select(GroupVm.vm_name)
                                                         .where(GroupVm.group_id == group_id))).all()}
        now = now_s()
        db.add_all(GroupVm(group_id=group_id, vm_name=n, added_at=now) for n in names if n.casefold() not in have)

    async def groups(self, req: GroupRequest) -> dict[str, Any] | Reply:
        values = req.group.model_dump(exclude_none=True) if req.group else {}
        now = now_s()
        if req.action == "get":
            async with self.sessions() as db:
                if req.id is not None:
                    group = await self._group(db, req.id)
                    return {"success": True, "group": (await self._groups_public(db, [group]))[0]}
                rows = list((await db.scalars(select(ProtectionGroup).order_by(ProtectionGroup.id))).all())
                return {"success": True, "groups": await self._groups_public(db, rows)}
        if req.action == "create":
            _require(values, ("name", "ossea_config_id"), "create", "group")
            async with self.sessions.begin() as db:
                if values.get("schedule_id"):
                    await self._schedule(db, values["schedule_id"])
                row = ProtectionGroup(name=values["name"], description=values.get("description"),
                                      ossea_config_id=values["ossea_config_id"], schedule_id=values.get("schedule_id"),
                                      vm_filter=_json(values.get("vm_filter")), defaults=_json(values.get("defaults")),
                                      created_at=now, updated_at=now)
                db.add(row)
                await self._flush(db, "Group", row.name)
                await self._set_vms(db, row.id, _names(values.get("vm_names")), replace=False)
                public = (await self._groups_public(db, [row]))[0]
            return Reply({"success": True, "message": "Group created successfully", "group": public}, status=201)
        group_id = _id(req.id, req.action)
        async with self.sessions.begin() as db:
            row = await self._group(db, group_id, lock=True)
            if req.action == "delete":
                await db.execute(update(ExecutionVm).where(ExecutionVm.group_id == group_id,
                                                           ExecutionVm.status == V_PENDING)
                                 .values(status=V_SKIPPED, reason="the group was deleted", finished_at=now))
                await db.execute(delete(GroupVm).where(GroupVm.group_id == group_id))
                await db.delete(row)
                return {"success": True, "message": f"Group {row.name!r} (ID {row.id}) deleted", "id": row.id}
            if req.action in ("add_vms", "remove_vms"):
                names = _names(req.vm_names)
                if not names:
                    raise errors.BadRequest("Missing required fields", f"{req.action} needs vm_names")
                if req.action == "add_vms":
                    await self._set_vms(db, group_id, names, replace=False)
                else:
                    await db.execute(delete(GroupVm).where(GroupVm.group_id == group_id, GroupVm.vm_name.in_(names)))
            else:  # update
                if not values:
                    raise errors.BadRequest("Missing required fields", "update needs a group with at least one field")
                if values.get("schedule_id"):
                    await self._schedule(db, values["schedule_id"])
                for key in ("name", "description", "ossea_config_id", "schedule_id"):
                    if key in values:
                        setattr(row, key, values[key])
                for key in ("vm_filter", "defaults"):
                    if key in values:
                        setattr(row, key, _json(values[key]))
                if "vm_names" in values:
                    await self._set_vms(db, group_id, _names(values["vm_names"]), replace=True)
            row.updated_at = now
            await self._flush(db, "Group", row.name)
            public = (await self._groups_public(db, [row]))[0]
        return {"success": True, "message": "Group updated successfully", "group": public}

    async def members(self, group: ProtectionGroup, names: list[str]) -> list[str]:
        """The group's VMs: its `vm_names`, then the inventory's VMs its filter matches (once each)."""
        f = _loaded(group.vm_filter)
        return _names([*names, *await self.matching(f)]) if f else names

    async def matching(self, f: dict[str, Any]) -> list[str]:
        """Names of the inventory's present VMs (templates left out) that match every field of a filter:
        datacenter and vcenter asked of the inventory, the folder (a path prefix) and the name pattern
        (shell-style, case-insensitive) checked here."""
        ask = {k: f[k] for k in ("datacenter", "vcenter") if f.get(k)}
        folder = (f.get("folder") or "").rstrip("/") + "/"
        pattern = (f.get("name_pattern") or "*").casefold()
        out: list[str] = []
        offset = 0
        while True:
            page = await self.bus.call(Inventory.LIST, {**ask, "limit": INVENTORY_PAGE, "offset": offset})
            out += [vm["name"] for vm in page.get("vms", []) if not vm.get("template")
                    and (folder == "/" or (vm.get("path") or "").startswith(folder))
                    and fnmatch.fnmatchcase(vm["name"].casefold(), pattern)]
            offset += INVENTORY_PAGE
            if not page.get("vms") or offset >= page.get("total", 0):
                return out

    # -- executions -----------------------------------------------------------------------------

    async def executions(self, q: dict[str, Any]) -> dict[str, Any]:
        """A schedule's executions, newest first, with each one's VMs counted by state; with
        `execution_id`, that one with its VMs."""
        schedule_id = q.get("schedule_id")
        if type(schedule_id) is not int:
            raise errors.BadRequest("Validation failed", "schedule_id: an integer is required")
        limit, offset = limit_offset(q)
        async with self.sessions() as db:
            await self._schedule(db, schedule_id)
            where = [Execution.schedule_id == schedule_id]
            if q.get("group_id") is not None:
                where.append(Execution.group_id == q["group_id"])
            if q.get("execution_id"):
                where.append(Execution.execution_id == q["execution_id"])
            total = await db.scalar(select(func.count()).select_from(Execution).where(*where)) or 0
            rows = (await db.scalars(select(Execution).where(*where)
                                     .order_by(Execution.started_at.desc(), Execution.id.desc())
                                     .limit(limit).offset(offset))).all()
            ids = [e.execution_id for e in rows]
            counts: dict[str, dict[str, int]] = {i: dict.fromkeys(V_STATES, 0) for i in ids}
            started = dict.fromkeys(ids, 0)  # VMs that got a replication job
            vms: dict[str, list[dict[str, Any]]] = {i: [] for i in ids}
            if ids:
                for eid, status, n, jobs in (await db.execute(
                        select(ExecutionVm.execution_id, ExecutionVm.status, func.count(),
                               func.count(ExecutionVm.job_id))
                        .where(ExecutionVm.execution_id.in_(ids))
                        .group_by(ExecutionVm.execution_id, ExecutionVm.status))).all():
                    counts[eid][status] = n
                    started[eid] += jobs
                if q.get("execution_id"):
                    for v in await db.scalars(select(ExecutionVm).where(ExecutionVm.execution_id.in_(ids))
                                              .order_by(ExecutionVm.id)):
                        vms[v.execution_id].append({
                            "vm_name": v.vm_name, "status": v.status, "job_id": v.job_id, "reason": v.reason,
                            "started_by": v.claimed_by, "started_at": iso(v.claimed_at),
                            "finished_at": iso(v.finished_at)})
        out = []
        for e in rows:
            c = counts[e.execution_id]
            item = {"execution_id": e.execution_id, "schedule_id": e.schedule_id, "group_id": e.group_id,
                    "status": e.status, "message": e.message, "started_by": e.started_by,
                    "started_at": iso(e.started_at), "finished_at": iso(e.finished_at),
                    "vms_total": sum(c.values()), "vms_started": started[e.execution_id],
                    "vms_skipped": c[V_SKIPPED], "vms_failed": c[V_FAILED], "vms": c}
            if q.get("execution_id"):
                item["vm_results"] = vms[e.execution_id]
            out.append(item)
        if q.get("execution_id") and not out:
            raise errors.NotFound("Execution not found",
                                  f"No execution {q['execution_id']!r} of schedule {schedule_id}")
        return {"success": True, "executions": out, "total": total, "limit": limit, "offset": offset}

    # -- the round ------------------------------------------------------------------------------

    async def tick(self) -> None:
        with TICK_DURATION.time():
            await self.fire_due()
            await self.expire_stale()
            await self.follow_running()
            await self.start_pending()
            await self.close_finished()

    async def fire_due(self) -> int:
        now = now_s()
        async with self.sessions() as db:
            # A schedule without a group waits (stays due): created before its groups, it fires when the
            # first is linked, rather than spending its first run on nothing.
            due = (await db.scalars(select(Schedule).where(
                Schedule.enabled.is_(True), Schedule.next_run_at <= now,
                exists().where(ProtectionGroup.schedule_id == Schedule.id)))).all()
        fired = 0
        for schedule in due:
            fired += await self._fire(schedule, now)
        return fired

    async def _fire(self, s: Schedule, now: datetime) -> int:
        """Fire once across every process: only the UPDATE that still finds `old` moves the row."""
        old, window = s.next_run_at, timing.window_of(s.window_start, s.window_end)
        if not timing.in_window(now, window):  # late (the scheduler was down): wait for the next opening
            async with self.sessions.begin() as db:
                await db.execute(update(Schedule).where(Schedule.id == s.id, Schedule.next_run_at == old)
                                 .values(next_run_at=timing.next_run(now, interval=0, cron=None, window=window,
                                                                     jitter=s.jitter_seconds)))
            return 0
        if s.cron:
            upcoming = self._next(s, now)
        else:  # the interval's phase is kept; runs missed while down are not caught up
            missed = int((now - old).total_seconds() // s.interval_seconds)
            upcoming = self._next(s, old + timedelta(seconds=s.interval_seconds * missed))
        schedule_id = s.id
        async with self.sessions.begin() as db:
            moved = await db.execute(update(Schedule).where(
                Schedule.id == schedule_id, Schedule.next_run_at == old, Schedule.enabled.is_(True))
                .values(next_run_at=upcoming, last_run_at=now))
            if moved.rowcount != 1:
                return 0  # another scheduler fired it
            schedule = await db.get(Schedule, schedule_id)
            groups = (await db.scalars(select(ProtectionGroup).where(ProtectionGroup.schedule_id == schedule_id)
                                       .order_by(ProtectionGroup.id))).all()
            made = [await self._execution(db, schedule, g, now) for g in groups]
        for execution_id, status, count in made:
            EXECUTIONS.labels(status=status).inc()
            self.log.info("schedule fired", extra={"schedule_id": schedule_id, "execution_id": execution_id,
                                                   "status": status, "vms": count})
        return 1

    async def _execution(self, db: AsyncSession, schedule: Schedule, group: ProtectionGroup,
                         now: datetime) -> tuple[str, str, int]:
        execution_id = f"exec-{group.id}-{now:%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"
        names = (await db.scalars(select(GroupVm.vm_name).where(GroupVm.group_id == group.id)
                                  .order_by(GroupVm.id))).all()
        busy = await db.scalar(select(func.count()).select_from(Execution).where(
            Execution.group_id == group.id, Execution.status == E_RUNNING))
        status, message = E_RUNNING, None
        if busy and schedule.skip_if_running:
            status, message = E_SKIPPED, "the group's previous execution is still running (skip_if_running)"
        else:
            try:
                names = await self.members(group, list(names))
            except errors.OmaError as exc:  # recorded, not retried every round: the next run tries again
                status, message = E_SKIPPED, f"the group's vm_filter could not be resolved: {exc.error}"
            if status == E_RUNNING and not names:
                status, message = E_COMPLETED, "the group has no VMs"
        db.add(Execution(execution_id=execution_id, schedule_id=schedule.id, group_id=group.id, status=status,
                         message=message, started_by=self.instance, started_at=now,
                         finished_at=None if status == E_RUNNING else now))
        if status == E_RUNNING:
            await db.flush()
            db.add_all(ExecutionVm(execution_id=execution_id, group_id=group.id, vm_name=n, status=V_PENDING)
                       for n in names)
        return execution_id, status, len(names) if status == E_RUNNING else 0

    async def expire_stale(self) -> None:
        cutoff = now_s() - timedelta(seconds=self.settings.scheduler_start_lease)
        async with self.sessions() as db:  # read first: an idle round writes nothing
            if await db.scalar(select(ExecutionVm.id).where(ExecutionVm.status == V_STARTING,
                                                            ExecutionVm.claimed_at < cutoff).limit(1)) is None:
                return
        async with self.sessions.begin() as db:
            gone = await db.execute(update(ExecutionVm).where(
                ExecutionVm.status == V_STARTING, ExecutionVm.claimed_at < cutoff).values(
                status=V_FAILED, finished_at=now_s(),
                reason="the scheduler that was starting it stopped; not started again (a job may exist with "
                       "this schedule_execution_id)"))
        if gone.rowcount:
            STARTS.labels(result="lost").inc(gone.rowcount)
            self.log.warning("scheduled starts lost with their scheduler", extra={"vms": gone.rowcount})

    async def follow_running(self) -> None:
        async with self.sessions() as db:
            running = (await db.execute(select(ExecutionVm.id, ExecutionVm.job_id)
                                        .where(ExecutionVm.status == V_RUNNING))).all()
        if not running:
            return
        gate = asyncio.Semaphore(FOLLOW_CONCURRENCY)

        async def outcome(job_id: str) -> tuple[str, str | None] | None:
            async with gate:
                try:
                    job = await self.bus.call(Replication.GET, {"job_id": job_id})
                except errors.NotFound:
                    return V_FAILED, f"job {job_id} was deleted"
                except errors.OmaError:
                    return None  # replication busy or down: the next round asks again
            done = JOB_DONE.get(job.get("status"))
            return (done, job.get("error") if done == V_FAILED else None) if done else None

        results = await asyncio.gather(*(outcome(job_id) for _, job_id in running))
        finished = [(row_id, r) for (row_id, _), r in zip(running, results) if r is not None]
        if finished:
            async with self.sessions.begin() as db:
                for row_id, (status, reason) in finished:
                    await db.execute(update(ExecutionVm).where(ExecutionVm.id == row_id,
                                                               ExecutionVm.status == V_RUNNING)
                                     .values(status=status, reason=reason, finished_at=now_s()))

    async def start_pending(self) -> int:
        async with self.sessions() as db:
            groups = (await db.scalars(select(ExecutionVm.group_id).where(ExecutionVm.status == V_PENDING)
                                       .distinct())).all()
        claimed = await self.claim(sorted(groups)) if groups else []
        if claimed:  # in the background: a create answers once the job's volumes are ready
            self.spawn(self._start(claimed))
        return len(claimed)

    async def claim(self, group_ids: list[int]) -> list[tuple[int, str, str, int, int]]:
        """Mark the groups' next waiting VMs `starting` for this process, as many as each group's
        limit leaves room for: (row id, execution id, VM name, group id, config id). The group rows
        are locked first (in id order: two processes never deadlock), so the counts are never stale."""
        now = now_s()
        async with self.sessions.begin() as db:
            groups = {g.id: g for g in (await db.scalars(select(ProtectionGroup).where(
                ProtectionGroup.id.in_(group_ids)).order_by(ProtectionGroup.id).with_for_update())).all()}
            if not groups:
                return []
            sids = {g.schedule_id for g in groups.values() if g.schedule_id}
            limits = dict((await db.execute(select(Schedule.id, Schedule.max_concurrent)
                                            .where(Schedule.id.in_(sids)))).all()) if sids else {}
            room = {gid: limits.get(g.schedule_id, DEFAULT_MAX_CONCURRENT) for gid, g in groups.items()}
            # Locking reads: they see what other processes committed before we got the group locks.
            for gid in (await db.scalars(select(ExecutionVm.group_id).where(
                    ExecutionVm.group_id.in_(list(groups)), ExecutionVm.status.in_(V_ACTIVE)).with_for_update())).all():
                room[gid] -= 1
            waiting = [gid for gid, n in room.items() if n > 0]
            if not waiting:
                return []
            rows = (await db.scalars(select(ExecutionVm).where(
                ExecutionVm.group_id.in_(waiting), ExecutionVm.status == V_PENDING)
                .order_by(ExecutionVm.id).with_for_update())).all()
            claimed = []
            for r in rows:
                if room[r.group_id] > 0:
                    room[r.group_id] -= 1
                    r.status, r.claimed_by, r.claimed_at = V_STARTING, self.instance, now
                    claimed.append((r.id, r.execution_id, r.vm_name, r.group_id, groups[r.group_id].ossea_config_id))
            return claimed

    async def source_vm(self, vm_name: str) -> dict[str, Any]:
        """The VM as the inventory stores it (the `source_vm` a replication takes), by exact name."""
        found = await self.bus.call(Inventory.LIST, {"name": vm_name, "limit": 1000})
        vm = next((v for v in found.get("vms", []) if v.get("name") == vm_name), None)
        if vm is None:
            raise errors.NotFound("VM not found", f"{vm_name} is not in the inventory (run a discovery)")
        return vm

    async def _start(self, claimed: list[tuple[int, str, str, int, int]]) -> None:
        """Create the claimed VMs' jobs, then record every outcome in one transaction (only on the rows
        this process still holds)."""
        gate = asyncio.Semaphore(START_CONCURRENCY)

        async def one(execution_id: str, vm_name: str, group_id: int, config_id: int) -> tuple[str, Any, Any]:
            async with gate:
                try:
                    reply = await self.bus.call(Replication.CREATE, {
                        "source_vm": await self.source_vm(vm_name), "ossea_config_id": config_id,
                        "replication_type": "incremental", "schedule_execution_id": execution_id,
                        "vm_group_id": str(group_id), "scheduled_by": f"scheduler:{self.instance}"},
                        timeout=self.settings.provision_wait + self.settings.request_timeout)
                    return V_RUNNING, reply["job_id"], None
                except errors.Conflict as exc:  # e.g. a sync of this VM already runs
                    return V_SKIPPED, None, f"{exc.error}: {exc.details}"
                except errors.BusTimeout as exc:
                    return V_FAILED, None, f"{exc.details}; a job may have started (not retried)"
                except errors.OmaError as exc:  # preflight refusals (400) included: their reasons are kept
                    return V_FAILED, None, f"{exc.error}: {exc.details}" if exc.details else exc.error
                except Exception as exc:  # noqa: BLE001 - the row must not stay `starting`
                    self.log.exception("scheduled start failed", extra={"vm_name": vm_name})
                    return V_FAILED, None, type(exc).__name__

        outcomes = await asyncio.gather(*(one(*c[1:]) for c in claimed))
        async with self.sessions.begin() as db:
            for (row_id, execution_id, vm_name, _, _), (status, job_id, reason) in zip(claimed, outcomes):
                STARTS.labels(result=status).inc()
                await db.execute(update(ExecutionVm).where(
                    ExecutionVm.id == row_id, ExecutionVm.status == V_STARTING,
                    ExecutionVm.claimed_by == self.instance).values(
                    status=status, job_id=job_id, reason=reason, finished_at=None if status == V_RUNNING else now_s()))
                self.log.info("scheduled sync", extra={"vm_name": vm_name, "execution_id": execution_id,
                                                       "status": status, "job_id": job_id})

    async def close_finished(self) -> None:
        """Executions whose VMs are all done (read first: an idle round writes nothing)."""
        open_vms = exists().where(ExecutionVm.execution_id == Execution.execution_id, ExecutionVm.status.in_(V_OPEN))
        async with self.sessions() as db:
            done = (await db.scalars(select(Execution.id).where(Execution.status == E_RUNNING, ~open_vms))).all()
        if done:
            async with self.sessions.begin() as db:
                await db.execute(update(Execution).where(Execution.id.in_(done), Execution.status == E_RUNNING,
                                                         ~open_vms).values(status=E_COMPLETED, finished_at=now_s()))

    # -- preflight ------------------------------------------------------------------------------

    async def preflight(self, req: PreflightRequest) -> dict[str, Any]:
        """Replication's checks (shared/preflight.py) for each VM of the list or the group."""
        names, config_id = req.vm_names or [], req.ossea_config_id
        if req.group_id is not None:
            async with self.sessions() as db:
                group = await self._group(db, req.group_id)
                names = list((await db.scalars(select(GroupVm.vm_name).where(GroupVm.group_id == group.id)
                                                .order_by(GroupVm.id))).all())
                config_id = group.ossea_config_id
            names = await self.members(group, names)
        gate = asyncio.Semaphore(PREFLIGHT_CONCURRENCY)

        async def one(name: str) -> dict[str, Any]:
            async with gate:
                try:
                    vm = await self.source_vm(name)
                except errors.NotFound as exc:
                    checks = [{"check": "inventory", "status": "fail", "reason": str(exc.details)}]
                else:
                    checks = (await self.bus.call(Replication.PREFLIGHT, {
                        "source_vm": vm, "ossea_config_id": config_id, "replication_type": "incremental"}))["checks"]
            return {"vm_name": name, "ready": all(c["status"] != "fail" for c in checks), "checks": checks}

        results = await asyncio.gather(*(one(n) for n in _names(names)))
        ready = sum(r["ready"] for r in results)
        return {"success": True, "ossea_config_id": config_id, "results": results,
                "summary": {"vms": len(results), "ready": ready, "not_ready": len(results) - ready}}
