"""The config service through the gateway: the seed's unified OSSEA endpoint, secrets at rest,
connection tests against a real in-process CloudStack simulator, MariaDB."""
from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import logging
import ssl
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web
from prometheus_client import REGISTRY
from sqlalchemy import text

from oma.plugins.ossea.simulator import DEFAULT_VM_ID, CloudStackSimulator
from oma.shared import errors
from oma.shared.subjects import Config
from tests.conftest import (
    assert_error_shape,
    login,
    mariadb_settings,
    running,
    wait_for,
)

URL = "/api/v1/ossea/config"
API_KEY = "GdsWBVHco0OOW4vBlgfnyzjru65FV-U1l1kKJ7n2WwH0gn3soTaZQZZyXfgUsxX7PyP06WrOOOcNRKmhRWDSlA"
SECRET = "uTCroKUkHZaNybhBXkcQsCb_eKDvZKbhHaZK4I1nHrGJYLKN-j0O-t9EGUx9yBdHH3F8dN5wVelitvdpQjwdcQ"
SEED_CONFIG = {"name": "production-ossea", "api_url": "http://10.245.241.101:8080/client/api",
               "api_key": API_KEY, "secret_key": SECRET, "domain": "/", "zone": "OSSEA-Zone",
               "oma_vm_id": "f47ac10b-58cc-4372-a567-0e02b2c3d479"}
FIELDS = {"id", "name", "api_url", "api_key", "secret_key", "domain", "zone", "oma_vm_id", "is_active",
          "created_at", "updated_at"}
TIMEOUT = 2.0  # cloud_timeout of these tests: failures must come back within it


def rfc3339(value: str) -> dt.datetime:
    assert value.endswith("Z") and len(value) == 20, value
    return dt.datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ")


def assert_config(cfg: dict[str, Any], expected: dict[str, Any]) -> None:
    assert set(cfg) == FIELDS, cfg
    assert cfg["secret_key"] == "[REDACTED]"
    for key, value in expected.items():
        if key != "secret_key":
            assert cfg[key] == value, (key, cfg)
    assert rfc3339(cfg["created_at"]) <= rfc3339(cfg["updated_at"])


def count_results(result: str) -> float:
    return REGISTRY.get_sample_value("oma_ossea_config_tests_total", {"result": result}) or 0.0


@pytest.fixture
async def sim() -> AsyncIterator[CloudStackSimulator]:
    async with CloudStackSimulator(API_KEY, SECRET) as s:
        yield s


async def post(client, headers, body: dict[str, Any]):
    return await client.post(URL, json=body, headers=headers)


async def test_seed_examples_return_the_seed_shapes(make_settings) -> None:
    async with running(make_settings(), services=("auth", "config", "replication", "failover")) as client:
        h = await login(client)
        config_app = client.appliance.services["config"]
        events: list[dict[str, Any]] = []

        async def on_event(msg) -> None:
            events.append(orjson.loads(msg.data))
        sub = await config_app.bus.nc.subscribe(Config.EVT_CHANGED, cb=on_event)

        r = await post(client, h, {"action": "get"})
        assert r.status_code == 200 and r.json() == {"success": True, "configurations": []}

        r = await post(client, h, {"action": "create", "configuration": SEED_CONFIG})
        assert r.status_code == 201, r.text
        body = r.json()
        assert body["success"] is True and body["message"]
        created = body["configuration"]
        assert_config(created, {**SEED_CONFIG, "is_active": True})
        cid = created["id"]
        assert isinstance(cid, int) and created["created_at"] == created["updated_at"]

        r = await post(client, h, {"action": "get"})
        assert r.status_code == 200 and r.json() == {"success": True, "configurations": [created]}
        r = await post(client, h, {"action": "get", "id": cid})
        assert r.status_code == 200 and r.json() == {"success": True, "configuration": created}

        await asyncio.sleep(1.05)  # updated_at has second precision
        r = await post(client, h, {"action": "update", "id": cid, "configuration": {
            "name": "production-ossea-updated", "zone": "OSSEA-Zone-Updated"}})
        assert r.status_code == 200, r.text
        updated = r.json()["configuration"]
        assert r.json()["success"] is True
        assert_config(updated, {**SEED_CONFIG, "name": "production-ossea-updated", "zone": "OSSEA-Zone-Updated"})
        assert updated["created_at"] == created["created_at"]
        assert rfc3339(updated["updated_at"]) > rfc3339(created["updated_at"])
        r = await post(client, h, {"action": "get", "id": cid})
        assert r.json()["configuration"] == updated

        # A new secret is stored (encrypted) and returned decrypted to internal callers only.
        r = await post(client, h, {"action": "update", "id": cid, "configuration": {"secret_key": "rotated-secret"}})
        assert r.status_code == 200 and r.json()["configuration"]["secret_key"] == "[REDACTED]"
        creds = await config_app.bus.call(Config.CREDENTIALS, {"id": cid})
        assert creds == {"id": cid, "name": "production-ossea-updated", "api_url": SEED_CONFIG["api_url"],
                         "api_key": API_KEY, "secret_key": "rotated-secret", "domain": "/",
                         "zone": "OSSEA-Zone-Updated", "oma_vm_id": SEED_CONFIG["oma_vm_id"], "is_active": True}

        r = await post(client, h, {"action": "delete", "id": cid})
        assert r.status_code == 200 and r.json()["success"] is True
        r = await post(client, h, {"action": "get", "id": cid})
        assert assert_error_shape(r, 404) == {"success": False, "error": "Configuration not found",
                                              "details": f"No OSSEA configuration found with ID: {cid}"}
        r = await post(client, h, {"action": "get"})
        assert r.json() == {"success": True, "configurations": []}

        async def all_four() -> bool:
            return len(events) >= 4
        await wait_for(all_four)
        await sub.unsubscribe()
        assert [(e["id"], e["action"]) for e in events] == [(cid, "create"), (cid, "update"), (cid, "update"),
                                                            (cid, "delete")]
        assert events[0]["name"] == "production-ossea" and events[-1]["name"] == "production-ossea-updated"
        assert all(e["event_id"] and e["occurred_at"].endswith("Z") for e in events)
        assert not any(s in orjson.dumps(events).decode() for s in (SECRET, "rotated-secret", "v1:"))


async def test_bad_requests_name_the_problem(make_settings) -> None:
    async with running(make_settings(), services=("auth", "config")) as client:
        h = await login(client)
        r = await post(client, h, {"action": "explode"})
        assert "action" in assert_error_shape(r, 400)["details"]

        partial = {k: SEED_CONFIG[k] for k in ("api_url", "api_key", "domain")}
        r = await post(client, h, {"action": "create", "configuration": partial})
        details = assert_error_shape(r, 400)["details"]
        for name in ("name", "secret_key", "zone"):
            assert name in details, details
        assert "api_url" not in details
        r = await post(client, h, {"action": "create"})
        details = assert_error_shape(r, 400)["details"]
        assert all(n in details for n in ("name", "api_url", "api_key", "secret_key", "zone")), details

        for bad_url in ("10.245.241.101:8080/client/api", "ftp://host/client/api", "http://", "http://h:99999/x"):
            r = await post(client, h, {"action": "create", "configuration": {**SEED_CONFIG, "api_url": bad_url}})
            assert "api_url" in assert_error_shape(r, 400)["details"], bad_url

        for body, field in (({"action": "get", "id": "1"}, "id"), ({"action": "get", "id": 0}, "id"),
                            ({"action": "create", "configuration": {**SEED_CONFIG, "name": 123}}, "name"),
                            ({"action": "create", "configuration": {**SEED_CONFIG, "is_active": "maybe"}}, "is_active"),
                            ({"action": "create", "configuration": {**SEED_CONFIG, "bogus": 1}}, "bogus"),
                            ({"action": "create", "configuration": "production-ossea"}, "configuration")):
            r = await post(client, h, body)
            assert field in assert_error_shape(r, 400)["details"], body

        huge = "x" * (1 << 16)  # over every field's limit, under the 1 MiB body limit (413)
        for field in ("name", "api_key", "secret_key", "zone", "oma_vm_id", "domain"):
            r = await post(client, h, {"action": "create", "configuration": {**SEED_CONFIG, field: huge}})
            body = assert_error_shape(r, 400)
            assert field in body["details"] and huge[:100] not in r.text

        for action in ("update", "delete"):
            r = await post(client, h, {"action": action, "configuration": {"zone": "z"}})
            assert "id" in assert_error_shape(r, 400)["details"]
        r = await post(client, h, {"action": "test"})
        assert "configuration" in assert_error_shape(r, 400)["details"]
        r = await post(client, h, {"action": "test", "configuration": {"api_url": SEED_CONFIG["api_url"]}})
        details = assert_error_shape(r, 400)["details"]
        assert "api_key" in details and "secret_key" in details
        r = await post(client, h, {"action": "create", "id": 5, "configuration": SEED_CONFIG})
        assert "id" in assert_error_shape(r, 400)["details"]

        r = await post(client, h, {"action": "create", "configuration": SEED_CONFIG})
        cid = r.json()["configuration"]["id"]
        r = await post(client, h, {"action": "update", "id": cid, "configuration": {}})
        assert "configuration" in assert_error_shape(r, 400)["details"]
        r = await post(client, h, {"action": "update", "id": cid, "configuration": {"zone": huge}})
        assert "zone" in assert_error_shape(r, 400)["details"]
        r = await post(client, h, {"action": "get", "id": cid})
        assert r.json()["configuration"]["zone"] == "OSSEA-Zone"

        # The service validates again: a caller on the bus gets the same 400.
        bus = client.appliance.services["config"].bus
        with pytest.raises(errors.BadRequest) as info:
            await bus.call(Config.ACTION, {"action": "create", "configuration": {"name": "x" * 300}})
        assert "name" in str(info.value.details)
        with pytest.raises(errors.BadRequest):
            await bus.call(Config.ACTION, {"action": "drop tables"})
        with pytest.raises(errors.BadRequest):
            await bus.call(Config.CREDENTIALS, {"id": "1"})
        r = await client.post(URL, content=b"{not json", headers={**h, "Content-Type": "application/json"})
        assert_error_shape(r, 400)
        r = await client.post(URL, json={"action": "get"})
        assert_error_shape(r, 401)


async def test_not_found_and_duplicate_names(make_settings) -> None:
    async with running(make_settings(), services=("auth", "config")) as client:
        h = await login(client)
        exact = {"success": False, "error": "Configuration not found",
                 "details": "No OSSEA configuration found with ID: 999"}
        for body in ({"action": "get", "id": 999}, {"action": "delete", "id": 999},
                     {"action": "update", "id": 999, "configuration": {"zone": "z"}}, {"action": "test", "id": 999}):
            r = await post(client, h, body)
            assert r.status_code == 404 and r.json() == exact, (body, r.text)
        with pytest.raises(errors.NotFound) as info:
            await client.appliance.services["config"].bus.call(Config.CREDENTIALS, {"id": 999})
        assert (info.value.error, info.value.details) == (exact["error"], exact["details"])

        r = await post(client, h, {"action": "create", "configuration": SEED_CONFIG})
        assert r.status_code == 201
        r = await post(client, h, {"action": "create", "configuration": {**SEED_CONFIG, "zone": "Other"}})
        assert "production-ossea" in assert_error_shape(r, 409)["details"]
        r = await post(client, h, {"action": "create", "configuration": {**SEED_CONFIG, "name": "dr-ossea"}})
        assert r.status_code == 201
        other = r.json()["configuration"]["id"]
        r = await post(client, h, {"action": "update", "id": other, "configuration": {"name": "production-ossea"}})
        assert_error_shape(r, 409)
        # Renaming to its own name is no conflict.
        r = await post(client, h, {"action": "update", "id": other, "configuration": {"name": "dr-ossea"}})
        assert r.status_code == 200
        r = await post(client, h, {"action": "get"})
        assert [c["name"] for c in r.json()["configurations"]] == ["production-ossea", "dr-ossea"]


def self_signed_context(tmp: Path) -> ssl.SSLContext:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=1))
            .not_valid_after(now + dt.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .sign(key, hashes.SHA256()))
    (tmp / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                    serialization.NoEncryption()))
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(tmp / "cert.pem", tmp / "key.pem")
    return ctx


async def test_connection_test_against_the_simulator(make_settings, sim: CloudStackSimulator, tmp_path: Path) -> None:
    async with running(make_settings(cloud_timeout=TIMEOUT), services=("auth", "config")) as client:
        h = await login(client)
        conn = {**{k: SEED_CONFIG[k] for k in ("api_key", "secret_key", "domain", "zone")}, "api_url": sim.url}

        before = count_results("success")
        r = await post(client, h, {"action": "test", "configuration": conn})
        assert r.status_code == 200, r.text
        assert r.json() == {"success": True, "message": "OSSEA connection test successful",
                            "details": {"zones_found": 1, "zone_verified": "OSSEA-Zone", "api_accessible": True}}
        assert count_results("success") == before + 1
        assert any(c["command"] == "listZones" and c["status"] == 200 for c in sim.calls)

        # A stored configuration, alone or overridden by the given fields.
        r = await post(client, h, {"action": "create", "configuration": {
            **conn, "name": "sim", "zone": "Wrong-Zone", "oma_vm_id": DEFAULT_VM_ID}})
        cid = r.json()["configuration"]["id"]
        r = await post(client, h, {"action": "test", "id": cid})
        body = assert_error_shape(r, 502)
        assert "Wrong-Zone" in body["details"] and "'OSSEA-Zone'" in body["details"], body
        r = await post(client, h, {"action": "test", "id": cid, "configuration": {"zone": "OSSEA-Zone"}})
        assert r.status_code == 200 and r.json()["details"]["zone_verified"] == "OSSEA-Zone", r.text
        r = await post(client, h, {"action": "get", "id": cid})
        assert r.json()["configuration"]["zone"] == "Wrong-Zone"  # a test changes nothing stored

        failures: list[tuple[dict[str, Any], int, tuple[str, ...]]] = [
            ({**conn, "secret_key": "not-the-secret"}, 502, ("api_key", "secret_key")),
            ({**conn, "api_key": "not-the-key"}, 502, ("api_key", "secret_key")),
            ({**conn, "zone": "Nowhere"}, 502, ("Nowhere", "'OSSEA-Zone'")),
            ({**conn, "oma_vm_id": "00000000-0000-4000-8000-000000000000"}, 502, ("oma_vm_id",)),
        ]
        for cfg, status, words in failures:
            r = await post(client, h, {"action": "test", "configuration": cfg})
            body = assert_error_shape(r, status)
            assert all(w in body["details"] for w in words), (cfg, body)
            assert "not-the-secret" not in r.text

        # TLS: the simulator behind a self-signed certificate.
        runner = web.AppRunner(CloudStackSimulator(API_KEY, SECRET).app(), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=self_signed_context(tmp_path)).start()
        port = runner.addresses[0][1]
        try:
            r = await post(client, h, {"action": "test", "configuration": {
                **conn, "api_url": f"https://127.0.0.1:{port}/client/api"}})
            body = assert_error_shape(r, 502)
            assert "certificate" in body["details"].lower() and f"127.0.0.1:{port}" in body["details"], body
        finally:
            await runner.cleanup()

        # Hanging: a clear 504 within the configured timeout.
        before = count_results("timeout")
        sim.hang("listZones")
        started = time.monotonic()
        r = await post(client, h, {"action": "test", "configuration": conn})
        elapsed = time.monotonic() - started
        body = assert_error_shape(r, 504)
        assert TIMEOUT - 0.2 <= elapsed <= TIMEOUT + 1.0, elapsed
        assert "did not answer" in body["details"] and f"{sim.port}" in body["details"], body
        assert count_results("timeout") == before + 1
        sim.release()

        # Stopped: unreachable, also within the timeout.
        url = sim.url
        await sim.stop()
        started = time.monotonic()
        r = await post(client, h, {"action": "test", "configuration": {**conn, "api_url": url}})
        elapsed = time.monotonic() - started
        body = assert_error_shape(r, 502)
        assert elapsed <= TIMEOUT + 1.0, elapsed
        assert body["error"] == "OSSEA unreachable" and "api_url" in body["details"], body


async def test_secret_never_in_responses_logs_or_rows(make_settings, caplog) -> None:
    secret = "Zq9-very-distinct-secret-" + "k" * 40
    sim = await CloudStackSimulator(API_KEY, secret).__aenter__()
    caplog.set_level(logging.DEBUG)
    for name in ("sqlalchemy.engine", "oma", "aiohttp", "nats", "plugins"):
        caplog.set_level(logging.DEBUG, logger=name)
    texts: list[str] = []
    async with running(make_settings(debug=True, cloud_timeout=TIMEOUT), services=("auth", "config")) as client:
        h = await login(client)
        cfg = {**SEED_CONFIG, "api_url": sim.url, "oma_vm_id": DEFAULT_VM_ID}
        bodies = [{"action": "create", "configuration": {**cfg, "secret_key": secret}},
                  {"action": "get"}, {"action": "get", "id": 1},
                  {"action": "test", "id": 1},
                  {"action": "test", "configuration": {**cfg, "secret_key": secret}},
                  {"action": "test", "configuration": {**cfg, "secret_key": secret, "zone": "Nowhere"}},
                  {"action": "update", "id": 1, "configuration": {"secret_key": secret, "zone": "OSSEA-Zone"}},
                  {"action": "create", "configuration": {**cfg, "secret_key": secret}}]  # 409
        for body in bodies:
            r = await post(client, h, body)
            texts.append(r.text)
        assert [orjson.loads(t).get("success") for t in texts] == [True, True, True, True, True, False, True, False]
        creds = await client.appliance.services["config"].bus.call(Config.CREDENTIALS, {"id": 1})
        assert creds["secret_key"] == secret

        async with client.appliance.services["config"].sessions() as db:
            stored = await db.scalar(text("SELECT secret_key FROM ossea_configs WHERE id = 1"))
        assert stored.startswith("v1:") and secret not in stored
        assert client.appliance.services["config"].keys.decrypt(stored) == secret

    await sim.stop()
    key_file = make_settings().secret_key_path
    assert key_file.exists() and key_file.stat().st_mode & 0o777 == 0o600
    assert all(secret not in t for t in texts)
    assert any(r.name.startswith("sqlalchemy.engine") for r in caplog.records), "SQL was not logged"
    assert any("ossea" in r.getMessage() for r in caplog.records)
    for record in caplog.records:
        rendered = record.getMessage() + repr(record.__dict__)
        assert secret not in rendered, (record.name, record.getMessage())


async def test_mariadb_migrations_and_wide_secret(make_settings, mariadb_name: str, sim: CloudStackSimulator,
                                                  tmp_path: Path) -> None:
    settings = make_settings(cloud_timeout=TIMEOUT, **mariadb_settings(mariadb_name))
    # 500 characters of 4-byte UTF-8: the largest secret a request may carry.
    wide_secret = "\U0001F511" * 500
    async with running(settings, services=("auth", "config", "replication", "failover")) as client:
        h = await login(client)
        config_app = client.appliance.services["config"]
        r = await post(client, h, {"action": "create", "configuration": {**SEED_CONFIG, "secret_key": wide_secret}})
        assert r.status_code == 201, r.text
        cid = r.json()["configuration"]["id"]
        assert (await config_app.bus.call(Config.CREDENTIALS, {"id": cid}))["secret_key"] == wide_secret
        r = await post(client, h, {"action": "create", "configuration": SEED_CONFIG})
        assert_error_shape(r, 409)
        r = await post(client, h, {"action": "create", "configuration": {
            **SEED_CONFIG, "name": "sim", "api_url": sim.url}})
        sim_id = r.json()["configuration"]["id"]
        r = await post(client, h, {"action": "test", "id": sim_id})
        assert r.status_code == 200 and r.json()["details"]["zones_found"] == 1, r.text
        r = await post(client, h, {"action": "update", "id": cid, "configuration": {"is_active": False}})
        assert r.json()["configuration"]["is_active"] is False
        async with config_app.sessions() as db:
            columns = {row[0]: row[1] for row in await db.execute(text(
                "SELECT COLUMN_NAME, COLUMN_TYPE FROM information_schema.COLUMNS "
                "WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = 'ossea_configs'"))}
            stored = await db.scalar(text("SELECT secret_key FROM ossea_configs WHERE id = :id"), {"id": cid})
        assert columns["name"] == "varchar(255)" and columns["api_url"] == "varchar(500)"
        assert columns["secret_key"] == "varchar(2707)" and stored.startswith("v1:")
        r = await post(client, h, {"action": "delete", "id": cid})
        assert r.status_code == 200
    # A restart on the same database: the migration is not applied twice, the data is still there.
    # With another key file the stored secret cannot be read: say so, and let an update repair it.
    other_key = make_settings(secret_key_file=tmp_path / "other.key", cloud_timeout=TIMEOUT,
                              **mariadb_settings(mariadb_name))
    async with running(other_key, services=("auth", "config")) as client:
        h = await login(client)
        r = await post(client, h, {"action": "get"})
        assert [c["name"] for c in r.json()["configurations"]] == ["sim"]
        r = await post(client, h, {"action": "test", "id": sim_id})
        body = assert_error_shape(r, 500)
        assert body["error"] == "Stored secret cannot be decrypted" and "update" in body["details"], body
        r = await post(client, h, {"action": "update", "id": sim_id, "configuration": {"secret_key": SECRET}})
        assert r.status_code == 200
        r = await post(client, h, {"action": "test", "id": sim_id})
        assert r.status_code == 200, r.text
