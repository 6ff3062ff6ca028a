"""Built-in storage backends: `mariadb` (asyncmy) and `memory` (aiosqlite, in memory)."""
from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
import uuid
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.pool import AsyncAdaptedQueuePool
from sqlalchemy.schema import CreateTable

from oma.shared import errors
from oma.shared.hookspecs import hookimpl
from oma.shared.retry import backoff_delay

log = logging.getLogger("oma.db")


@compiles(CreateTable, "sqlite")
def _ids_never_reused(create: CreateTable, compiler: Any, **kw: Any) -> str:
    """Every SQLite table (memory mode; the migrations and Alembic's batch copies alike) gets
    AUTOINCREMENT on its integer primary key: without it SQLite hands a deleted row's id out again
    (delete configuration 1, create another: id 1), so an old job's `ossea_config_id` would point
    at another cloud. MariaDB's AUTO_INCREMENT never reuses one either. SQLite applies it only
    to a single integer key column; other tables are unchanged."""
    create.element.dialect_options["sqlite"]["autoincrement"] = True
    return compiler.visit_create_table(create, **kw)


class MemoryStorage:
    """One private in-memory SQLite database per service.

    A single pooled connection serialises access (SQLite's shared cache would raise "table is
    locked" under concurrency); a keeper connection holds the database alive for the process.
    """

    def __init__(self, settings: Any):
        self.settings = settings
        self._keepers: list[sqlite3.Connection] = []

    async def create_engine(self, service: str) -> AsyncEngine:
        name = f"file:oma-{service}-{uuid.uuid4().hex[:8]}?mode=memory&cache=shared"
        self._keepers.append(sqlite3.connect(name, uri=True, check_same_thread=False))
        return create_async_engine(f"sqlite+aiosqlite:///{name}&uri=true", poolclass=AsyncAdaptedQueuePool,
                                   pool_size=1, max_overflow=0, pool_timeout=60, hide_parameters=True)


class MariaDBStorage:
    def __init__(self, settings: Any):
        self.settings = settings

    def url(self, database: str | None = None) -> URL:
        s = self.settings
        return URL.create("mysql+asyncmy", username=s.db_user, password=s.db_pass or None,
                          host=s.db_host, port=s.db_port, database=database,
                          query={"charset": "utf8mb4"})

    async def create_engine(self, service: str) -> AsyncEngine:
        s = self.settings
        await self._wait_and_create_database()
        return create_async_engine(self.url(s.db_name), pool_pre_ping=True, pool_recycle=3600,
                                   pool_size=10, max_overflow=10, hide_parameters=True)

    async def _wait_and_create_database(self) -> None:
        """Wait (bounded) for the server; create the database when it does not exist yet."""
        s = self.settings
        deadline = time.monotonic() + s.startup_timeout
        attempt = 0
        while True:
            attempt += 1
            engine = create_async_engine(self.url(), poolclass=None, hide_parameters=True)
            try:
                async with engine.connect() as conn:
                    await conn.execute(text(f"CREATE DATABASE IF NOT EXISTS `{s.db_name}` "
                                            "CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci"))
                return
            except Exception as exc:  # noqa: BLE001
                reason = str(getattr(exc, "orig", exc)).replace(s.db_pass, "***") if s.db_pass else str(exc)
                denied = "Access denied" in reason
                if denied or time.monotonic() >= deadline:
                    raise errors.Unavailable("Database unreachable",
                                             f"MariaDB at {s.db_host}:{s.db_port} as {s.db_user}: {reason[:300]}") from None
                log.warning("waiting for MariaDB", extra={"host": s.db_host, "port": s.db_port,
                                                          "attempt": attempt, "reason": reason[:200]})
                await asyncio.sleep(backoff_delay(attempt, 0.25, 2.0))
            finally:
                await engine.dispose()


@hookimpl
def oma_register_storage_backends(register):
    register("memory", MemoryStorage, description="SQLite in memory (development; lost at exit)")
    register("mariadb", MariaDBStorage, description="MariaDB through asyncmy (production)")
