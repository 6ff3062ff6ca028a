"""When a schedule runs next: an interval or a cron expression (croniter), inside a daily UTC time
window, delayed by a random jitter. Pure functions of their arguments (the random source is given),
so every rule is tested without a clock."""
from __future__ import annotations

import random
from datetime import datetime, time, timedelta

from croniter import croniter

from oma.shared import errors

DAY = timedelta(days=1)


def parse_time(value: str | None) -> time | None:
    """"HH:MM" (UTC) or None; "" also means none (how an update removes a window)."""
    return time.fromisoformat(value) if value else None


def window_of(start: str | None, end: str | None) -> tuple[time, time] | None:
    """The window (start, end) or None; 400 when only one end is given or both are equal."""
    a, b = parse_time(start), parse_time(end)
    if a is None and b is None:
        return None
    if a is None or b is None:
        raise errors.BadRequest("Validation failed", "schedule.window_start and window_end: give both or neither")
    if a == b:
        raise errors.BadRequest("Validation failed", "schedule.window_start and window_end must differ")
    return a, b


def in_window(at: datetime, window: tuple[time, time] | None) -> bool:
    """Start inclusive, end exclusive; a window whose end is before its start spans midnight."""
    if window is None:
        return True
    start, end, t = window[0], window[1], at.time()
    return start <= t < end if start < end else (t >= start or t < end)


def window_open(at: datetime, window: tuple[time, time] | None) -> datetime:
    """`at` when it is inside the window, else the window's next opening."""
    if in_window(at, window):
        return at
    opening = datetime.combine(at.date(), window[0])  # type: ignore[index]
    return opening if opening > at else opening + DAY


def check_cron(expr: str, min_interval: float) -> None:
    """400 for an expression croniter does not take, or one that fires more often than allowed."""
    if not croniter.is_valid(expr):
        raise errors.BadRequest("Validation failed", f"schedule.cron: {expr!r} is not a cron expression "
                                                     "(5 fields: minute hour day month weekday)")
    it = croniter(expr, datetime(2026, 1, 1))
    first = it.get_next(datetime)
    gap = (it.get_next(datetime) - first).total_seconds()
    if gap < min_interval:
        raise errors.BadRequest("Validation failed", f"schedule.cron: runs {gap:g} s apart; at least "
                                                     f"{min_interval:g} (OMA_SCHEDULER_MIN_INTERVAL)")


def next_run(after: datetime, *, interval: int | None, cron: str | None, window: tuple[time, time] | None,
             jitter: int, rng: random.Random | None = None) -> datetime:
    """The run after `after` (an interval from it, or the cron expression's next time), moved to the
    window's opening when outside, then delayed by up to `jitter` seconds (dropped when it would leave
    the window). Whole seconds, as the database keeps them."""
    base = croniter(cron, after).get_next(datetime) if cron else after + timedelta(seconds=interval or 0)
    base = window_open(base.replace(microsecond=0), window)
    if jitter > 0:
        late = base + timedelta(seconds=(rng or random).randint(0, jitter))
        if in_window(late, window):
            return late
    return base
