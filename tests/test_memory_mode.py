"""Memory mode (SQLite in memory): it never hands out a deleted row's id again, as MariaDB's
AUTO_INCREMENT does not (an old job's `ossea_config_id` must never point at another cloud); and the
console scripts refuse it with an external NATS, whose stream outlives the database."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
from sqlalchemy import text

from oma.shared.settings import SERVICES
from tests.conftest import free_port, login, running

OSSEA = {"api_url": "http://127.0.0.1:9/client/api", "api_key": "k", "secret_key": "s", "zone": "Z"}
VCENTER = {"username": "administrator@vsphere.local", "password": "p"}


async def test_delete_then_create_never_reuses_an_id(make_settings):
    async with running(make_settings(), SERVICES) as client:
        h = await login(client)
        for url, config in (("/api/v1/ossea/config", lambda n: {"name": n, **OSSEA}),
                            ("/api/v1/vcenter/config", lambda n: {"host": f"{n}.example.com", **VCENTER})):
            seen: set[int] = set()
            for i in range(3):  # delete the newest each time: plain SQLite would give its id back
                r = await client.post(url, headers=h, json={"action": "create", "configuration": config(f"c{i}")})
                assert r.status_code == 201, r.text
                cid = r.json()["configuration"]["id"]
                assert cid not in seen, (url, cid, seen)
                seen.add(cid)
                r = await client.post(url, headers=h, json={"action": "delete", "id": cid})
                assert r.status_code == 200, r.text

        # Every table of every service whose key is one integer column counts up the same way.
        counted = []
        for name, svc in client.appliance.services.items():
            async with svc.engine.connect() as conn:
                tables = (await conn.execute(text(
                    "SELECT name, sql FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"))).all()
                for table, sql in tables:
                    keys = [row for row in (await conn.execute(text(f'PRAGMA table_info("{table}")'))).all()
                            if row.pk]
                    if len(keys) == 1 and keys[0].type.upper() in ("INTEGER", "BIGINT"):
                        assert "AUTOINCREMENT" in sql.upper(), (name, table, sql)
                        counted.append(table)
        assert {"ossea_configs", "vcenter_configs", "appliances", "sessions", "replication_jobs",
                "job_volumes"} <= set(counted), counted


@pytest.mark.parametrize("argv", [["oma_api"], ["oma_service", "config"], ["oma_service", "replication"]])
def test_memory_with_external_nats_is_refused_at_start(tmp_path, nats_url, argv):
    entry, *args = argv
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMA_")}
    env.update(OMA_DATA_DIR=str(tmp_path), OMA_NBD_PORT=str(free_port()))
    r = subprocess.run([sys.executable, "-c", f"from oma.cli import {entry}; {entry}()", *args,
                        "-db-type", "memory", "-nats-url", nats_url, "-port", str(free_port()), "-metrics-port", "0"],
                       capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 2, (r.returncode, r.stderr)
    [line] = r.stderr.strip().splitlines()
    assert "-db-type memory with -nats-url" in line and "OMA_ALLOW_EPHEMERAL_WITH_EXTERNAL_NATS" in line, line
