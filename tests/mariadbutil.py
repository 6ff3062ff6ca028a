"""The machine's MariaDB server for tests and benchmarks (127.0.0.1:3306, root, no password; the
OMA_TEST_DB_* variables override): its address, one statement run on it, settings that use it."""
from __future__ import annotations

import os
from typing import Any

MARIADB = dict(host=os.environ.get("OMA_TEST_DB_HOST", "127.0.0.1"),
               port=int(os.environ.get("OMA_TEST_DB_PORT", "3306")),
               user=os.environ.get("OMA_TEST_DB_USER", "root"),
               password=os.environ.get("OMA_TEST_DB_PASS", ""))


async def mariadb_exec(sql: str, database: str | None = None) -> None:
    """Run one statement (CREATE/DROP DATABASE, ...) and commit."""
    import asyncmy
    conn = await asyncmy.connect(host=MARIADB["host"], port=MARIADB["port"], user=MARIADB["user"],
                                 password=MARIADB["password"], database=database)
    try:
        async with conn.cursor() as cur:
            await cur.execute(sql)
        await conn.commit()
    finally:
        conn.close()


def mariadb_settings(name: str) -> dict[str, Any]:
    """Settings fields for database `name` on that server."""
    return dict(db_type="mariadb", db_host=MARIADB["host"], db_port=MARIADB["port"], db_name=name,
                db_user=MARIADB["user"], db_pass=MARIADB["password"])
