"""Schedules' timing (issue 20): cron expressions, time windows, jitter, skip-if-running, and a
schedule that waits for its first group. The rules are pure functions (services/scheduler/timing.py);
the firing is the scheduler's own code on a real database."""
from __future__ import annotations

import random
from datetime import datetime, time, timedelta

import pytest
from sqlalchemy import select, update

from oma.services.scheduler import timing
from oma.services.scheduler.models import Execution, Schedule
from oma.services.scheduler.service import now_s
from oma.shared import errors
from oma.shared.schemas import GroupRequest, ScheduleRequest
from tests.conftest import assert_error_shape, login, running
from tests.test_scheduler import LIGHT, _scheduler_on

T0 = datetime(2026, 3, 2, 10, 7, 30)


def test_cron_gives_the_expressions_next_time_and_an_interval_counts_from_the_last_run():
    def cron(expr: str) -> datetime:
        return timing.next_run(T0, interval=None, cron=expr, window=None, jitter=0)
    assert cron("*/15 * * * *") == datetime(2026, 3, 2, 10, 15)
    assert cron("0 2 * * *") == datetime(2026, 3, 3, 2, 0)
    assert timing.next_run(T0, interval=600, cron=None, window=None, jitter=0) == T0 + timedelta(minutes=10)
    with pytest.raises(errors.BadRequest, match="not a cron expression"):
        timing.check_cron("every monday", 60)
    with pytest.raises(errors.BadRequest, match="60 s apart; at least 120"):
        timing.check_cron("* * * * *", 120)
    timing.check_cron("*/5 * * * *", 120)


def test_a_window_moves_a_run_to_its_opening_and_may_span_midnight():
    day = (time(9, 0), time(17, 0))
    night = (time(22, 0), time(4, 0))
    assert timing.in_window(T0, day) and not timing.in_window(T0, night)
    assert timing.in_window(datetime(2026, 3, 2, 23, 30), night)
    assert timing.in_window(datetime(2026, 3, 3, 3, 59), night)
    assert not timing.in_window(datetime(2026, 3, 2, 17, 0), day)  # the end is not inside
    # 10:07 + 8 h = 18:07: past the day window, so tomorrow 09:00; the night window opens at 22:00 today.
    assert timing.next_run(T0, interval=8 * 3600, cron=None, window=day, jitter=0) == datetime(2026, 3, 3, 9, 0)
    assert timing.next_run(T0, interval=600, cron=None, window=night, jitter=0) == datetime(2026, 3, 2, 22, 0)
    assert timing.next_run(T0, interval=None, cron="0 * * * *", window=night, jitter=0) == datetime(2026, 3, 2, 22, 0)
    with pytest.raises(errors.BadRequest, match="both or neither"):
        timing.window_of("09:00", None)
    with pytest.raises(errors.BadRequest, match="differ"):
        timing.window_of("09:00", "09:00")


def test_jitter_delays_within_its_bound_and_never_out_of_the_window():
    rng = random.Random(7)
    runs = {timing.next_run(T0, interval=600, cron=None, window=None, jitter=120, rng=rng) for _ in range(200)}
    base = T0 + timedelta(minutes=10)
    assert min(runs) >= base and max(runs) <= base + timedelta(seconds=120), (min(runs), max(runs))
    assert len(runs) > 50  # spread, not one fixed delay
    # 16:59:30 + up to 10 min would leave a window ending at 17:00: the jitter is dropped there.
    late = datetime(2026, 3, 2, 16, 59, 30)
    assert {timing.next_run(late - timedelta(minutes=1), interval=60, cron=None, window=(time(9), time(17)),
                            jitter=600, rng=random.Random(1)) for _ in range(5)} <= \
        {late} | {late + timedelta(seconds=s) for s in range(30)}


def _hhmm(at: datetime) -> str:
    return f"{at:%H:%M}"


async def _group(s, name: str, schedule_id: int | None, vms=("a", "b")) -> int:
    r = await s.groups(GroupRequest(action="create", group={"name": name, "ossea_config_id": 1,
                                                            "schedule_id": schedule_id, "vm_names": list(vms)}))
    return r.body["group"]["id"]


async def _executions(s, schedule_id: int) -> list[Execution]:
    async with s.sessions() as db:
        return list((await db.scalars(select(Execution).where(Execution.schedule_id == schedule_id)
                                      .order_by(Execution.id))).all())


async def test_a_schedule_waits_for_its_first_group_then_skips_while_the_last_run_runs(make_settings):
    """Created before its group, a schedule fires when the group is linked (its first run is not spent
    on nothing); with skip_if_running a run while the group's last execution runs is recorded skipped,
    without it a second execution is made."""
    s, engine = await _scheduler_on(make_settings(scheduler_min_interval=1), "one")
    try:
        r = await s.schedules(ScheduleRequest(action="create", schedule={"name": "s", "interval_seconds": 3600}))
        sid = r.body["schedule"]["id"]
        assert await s.fire_due() == 0 and await _executions(s, sid) == []
        gid = await _group(s, "g", sid)
        assert await s.fire_due() == 1
        first = await _executions(s, sid)
        assert [(e.group_id, e.status) for e in first] == [(gid, "running")]
        assert await s.fire_due() == 0  # not due again for an hour

        await s.schedules(ScheduleRequest(action="run", id=sid))
        assert await s.fire_due() == 1
        runs = await _executions(s, sid)
        assert [e.status for e in runs] == ["running", "skipped"] and "skip_if_running" in runs[1].message

        await s.schedules(ScheduleRequest(action="update", id=sid, schedule={"skip_if_running": False}))
        await s.schedules(ScheduleRequest(action="run", id=sid))
        assert await s.fire_due() == 1
        assert [e.status for e in await _executions(s, sid)] == ["running", "skipped", "running"]
    finally:
        await engine.dispose()


async def test_outside_its_window_a_due_schedule_does_not_fire_and_waits_for_the_opening(make_settings):
    s, engine = await _scheduler_on(make_settings(scheduler_min_interval=1), "one")
    try:
        now = now_s()
        opening = (now + timedelta(hours=2)).replace(second=0)
        r = await s.schedules(ScheduleRequest(action="create", schedule={
            "name": "night", "interval_seconds": 60, "window_start": _hhmm(opening),
            "window_end": _hhmm(opening + timedelta(hours=1))}))
        sched = r.body["schedule"]
        assert sched["next_run_at"] == opening.isoformat() + "Z"  # created outside: the first run at the opening
        await _group(s, "g", sched["id"])
        async with s.sessions.begin() as db:  # as if due now (a run left from before a window change)
            await db.execute(update(Schedule).where(Schedule.id == sched["id"]).values(next_run_at=now))
        assert await s.fire_due() == 0
        assert await _executions(s, sched["id"]) == []
        async with s.sessions() as db:
            assert (await db.get(Schedule, sched["id"])).next_run_at == opening

        # Inside the window (now .. now + 1 h) it fires, and the next run stays inside it.
        await s.schedules(ScheduleRequest(action="update", id=sched["id"], schedule={
            "window_start": _hhmm(now - timedelta(minutes=1)), "window_end": _hhmm(now + timedelta(hours=1))}))
        await s.schedules(ScheduleRequest(action="run", id=sched["id"]))
        assert await s.fire_due() == 1
        assert [e.status for e in await _executions(s, sched["id"])] == ["running"]
        # One end moves alone (the other is kept); removing the window takes "" for both, not one end.
        r = await s.schedules(ScheduleRequest(action="update", id=sched["id"], schedule={
            "window_end": _hhmm(now + timedelta(hours=2))}))
        assert r["schedule"]["window_end"] == _hhmm(now + timedelta(hours=2)) and r["schedule"]["window_start"]
        r = await s.schedules(ScheduleRequest(action="update", id=sched["id"], schedule={
            "window_start": "", "window_end": ""}))
        assert (r["schedule"]["window_start"], r["schedule"]["window_end"]) == (None, None)
        with pytest.raises(errors.BadRequest, match="both or neither"):
            await s.schedules(ScheduleRequest(action="update", id=sched["id"], schedule={"window_start": "01:00"}))
    finally:
        await engine.dispose()


async def test_cron_schedules_through_the_api(make_settings):
    async with running(make_settings(scheduler_min_interval=120), services=LIGHT) as c:
        h = await login(c)
        r = await c.post("/api/v1/schedules", headers=h, json={"action": "create", "schedule": {
            "name": "quarter", "cron": "*/15 * * * *", "jitter_seconds": 30}})
        assert r.status_code == 201, r.text
        sched = r.json()["schedule"]
        assert (sched["cron"], sched["interval_seconds"], sched["jitter_seconds"]) == ("*/15 * * * *", None, 30)
        at = datetime.fromisoformat(sched["next_run_at"].rstrip("Z"))
        assert at.minute % 15 == 0 and 0 <= at.second <= 30 and at > now_s() - timedelta(seconds=1), at
        for bad in ({"name": "x", "cron": "*/15 * * * *", "interval_seconds": 600},
                    {"name": "x", "cron": "every day at noon"},
                    {"name": "x", "cron": "* * * * *"},            # every minute: below the 120 s floor
                    {"name": "x", "interval_seconds": 600, "window_start": "25:00", "window_end": "02:00"},
                    {"name": "x", "interval_seconds": 600, "window_start": "22:00"},
                    {"name": "x", "interval_seconds": 600, "jitter_seconds": -1},
                    {"name": "x"}):
            assert_error_shape(await c.post("/api/v1/schedules", headers=h, json={
                "action": "create", "schedule": bad}), 400)
        # An interval replaces the cron expression, and back.
        r = await c.post("/api/v1/schedules", headers=h, json={"action": "update", "id": sched["id"],
                                                                "schedule": {"interval_seconds": 600}})
        assert (r.json()["schedule"]["cron"], r.json()["schedule"]["interval_seconds"]) == (None, 600), r.text
        r = await c.post("/api/v1/schedules", headers=h, json={"action": "update", "id": sched["id"],
                                                                "schedule": {"cron": "0 3 * * *"}})
        assert (r.json()["schedule"]["cron"], r.json()["schedule"]["interval_seconds"]) == ("0 3 * * *", None)
