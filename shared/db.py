"""Database plumbing: declarative base, engines from storage plugins, Alembic per service."""
from __future__ import annotations

import asyncio
import logging
import weakref
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

from alembic import command, context
from alembic.config import Config
from sqlalchemy import MetaData, or_, select, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncAttrs, AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase

from oma.shared import errors, metrics

log = logging.getLogger("oma.db")

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(AsyncAttrs, DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class StorageBackend(Protocol):
    async def create_engine(self, service: str) -> AsyncEngine: ...


def utcnow() -> datetime:
    """Naive UTC (what DATETIME columns store on both databases)."""
    return datetime.now(timezone.utc).replace(tzinfo=None)


def iso(dt: datetime | None) -> str | None:
    """RFC 3339 UTC, second precision, as the seed shows (`2025-08-06T11:25:47Z`)."""
    if not dt:
        return None
    # isoformat is 3x faster than strftime (the contexts list formats 300 stamps a page).
    return (dt.replace(tzinfo=None) if dt.tzinfo else dt).isoformat(timespec="seconds") + "Z"


def iso_ms(dt: datetime | None) -> str | None:
    """RFC 3339 UTC with milliseconds (the events' format, docs/events.md)."""
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z" if dt else None


def limit_offset(q: dict[str, Any], *, most: int = 1000) -> tuple[int, int]:
    """`limit` (1..most, default 100) and `offset` (>= 0) of a list request; 400 naming them if bad."""
    try:
        limit, offset = int(q.get("limit", 100)), int(q.get("offset", 0))
    except (TypeError, ValueError):
        raise errors.BadRequest("Validation failed", "limit/offset: expected integers") from None
    if not 1 <= limit <= most or offset < 0:
        raise errors.BadRequest("Validation failed", f"limit: 1..{most}; offset: >= 0")
    return limit, offset


def list_filters(q: dict[str, Any], status: Any, statuses: tuple[str, ...], vm_name: Any) -> list[Any]:
    """The `status` (one of `statuses`, else a 400) and `vm_name` conditions of a job list request."""
    conds = []
    if q.get("status"):
        if q["status"] not in statuses:
            raise errors.BadRequest("Validation failed", f"status: one of {', '.join(statuses)}")
        conds.append(status == q["status"])
    if q.get("vm_name"):
        conds.append(vm_name == q["vm_name"])
    return conds


async def free_id(db: Any, column: Any, base: str) -> str:
    """`base` (a seed-style `job-YYYYMMDD-HHMMSS`), else the first free `base-N` (N from 2) in `column`:
    ids stay unique and readable when two share a second. The unique index is what guarantees it: a
    caller whose insert then collides (two processes, one second) picks again."""
    taken = set((await db.scalars(select(column).where(or_(column == base, column.like(base + "-%"))))).all())
    n, found = 1, base
    while found in taken:
        n += 1
        found = f"{base}-{n}"
    return found


def sessionmaker(engine: AsyncEngine) -> async_sessionmaker:
    return async_sessionmaker(engine, expire_on_commit=False)


def read_engine(engine: AsyncEngine, pool_size: int = 5) -> AsyncEngine:
    """For a hot read path on MariaDB: a pool of its own without the ping at checkout (a round trip,
    a wake-up of mariadbd, per read); `read` retries a connection found dead instead. Reads stay in
    a transaction: a reply's statements see one snapshot. Any other database: the engine itself
    (memory mode has one connection)."""
    if engine.dialect.name != "mysql":
        return engine
    return create_async_engine(engine.url, pool_recycle=3600, pool_size=pool_size, max_overflow=pool_size,
                               hide_parameters=True)


async def read(engine: AsyncEngine, fn: Any, *args: Any) -> Any:
    """`await fn(connection, *args)`; once more when the pooled connection was dead (the database
    restarted: the pool then drops its other connections too)."""
    for attempt in (1, 2):
        try:
            async with engine.connect() as conn:
                return await fn(conn, *args)
        except DBAPIError as exc:
            if attempt == 2 or not exc.connection_invalidated:
                raise


def _upgrade(sync_conn: Any, script_location: str, version_table: str) -> None:
    cfg = Config()
    cfg.set_main_option("script_location", script_location)
    cfg.attributes["connection"] = sync_conn
    cfg.attributes["version_table"] = version_table
    command.upgrade(cfg, "head")


# One lock per event loop (an asyncio.Lock belongs to the loop it first waited on; a test may run an
# appliance on a second loop in a thread once the first is idle).
_migration_locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = weakref.WeakKeyDictionary()


async def run_migrations(engine: AsyncEngine, service: str, script_location: Path) -> None:
    """Apply the service's Alembic migrations (own version table); a second run is a no-op."""
    # Alembic's `context` is a module-global proxy: services in one process migrate one at a time.
    lock = _migration_locks.setdefault(asyncio.get_running_loop(), asyncio.Lock())
    try:
        async with lock, engine.begin() as conn:
            await conn.run_sync(_upgrade, str(script_location), f"alembic_version_{service}")
    except Exception:
        metrics.MIGRATIONS.labels(service=service, result="failure").inc()
        log.exception("migration failed", extra={"service": service})
        raise
    metrics.MIGRATIONS.labels(service=service, result="success").inc()
    log.info("migrations applied", extra={"service": service})


def alembic_env() -> None:
    """The body of every service's migrations/env.py: run online on the connection given."""
    cfg = context.config
    conn = cfg.attributes["connection"]
    context.configure(connection=conn, version_table=cfg.attributes["version_table"],
                      render_as_batch=conn.dialect.name == "sqlite")
    with context.begin_transaction():
        context.run_migrations()


async def ping(engine: AsyncEngine, service: str, timeout: float = 2.0) -> bool:
    try:
        async with asyncio.timeout(timeout):
            async with engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
        metrics.DB_UP.labels(service=service).set(1)
        return True
    except Exception:  # noqa: BLE001 - any failure means "not connected"
        metrics.DB_UP.labels(service=service).set(0)
        return False
