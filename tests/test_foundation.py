"""Foundation: flags and settings, the bus envelope end to end, backends, migrations, drain,
queue groups, health, and `oma-api` as a real process."""
from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from sqlalchemy import inspect as sa_inspect, text

import orjson

from conftest import assert_error_shape, login, mariadb_settings, running, wait_for
from oma.shared import bus as busmod, errors
from oma.shared.plugins import BackendNotFound
from oma.runner import Appliance
from oma.shared.service import BusRequest, ServiceApp, endpoint
from oma.shared.settings import SERVICES, FlagError, Settings, load_settings
from oma.shared.subjects import Config

TEST_SUBJECT = "oma.test.probe.run"


class ProbeService(ServiceApp):
    """A throwaway service for envelope, drain and queue-group tests."""
    name = "config"  # answers the config subject, so the gateway route reaches it

    @endpoint(Config.ACTION)
    async def action(self, req: BusRequest):
        data = req.json()
        if data.get("id") == 999:
            raise errors.NotFound("Configuration not found", "No OSSEA configuration found with ID: 999")
        if data.get("action") == "delete":
            raise RuntimeError("a bug")
        return {"success": True, "instance": id(self)}

    @endpoint(TEST_SUBJECT)
    async def slow(self, req: BusRequest):
        await asyncio.sleep(float(req.json().get("sleep", 0)))
        return {"done": True, "instance": id(self)}


# --- flags and settings -------------------------------------------------------------------------
@pytest.mark.parametrize("argv", [["-port", "8082", "-db-type", "memory"], ["--port", "8082", "--db-type=memory"],
                                  ["-port=8082"]])
def test_flags_both_spellings(argv):
    s, _ = load_settings(argv)
    assert s.port == 8082 and s.db_type == "memory"


def test_bool_flags():
    assert load_settings(["-auth-enabled=false"])[0].auth_enabled is False
    assert load_settings(["-debug"])[0].debug is True
    assert load_settings([])[0].auth_enabled is True


def test_seed_mariadb_flags():
    s, _ = load_settings("-port 8082 -db-type mariadb -db-host localhost -db-port 3306 -db-name migratekit_oma "
                         "-db-user oma_user -db-pass oma_password -debug".split())
    assert (s.db_type, s.db_host, s.db_port, s.db_name, s.db_user, s.db_pass, s.debug) == \
        ("mariadb", "localhost", 3306, "migratekit_oma", "oma_user", "oma_password", True)
    assert "oma_password" not in repr(s)


@pytest.mark.parametrize("argv,named", [(["-port", "abc"], "-port"), (["-port", "70000"], "-port"),
                                        (["-auth-enabled=maybe"], "-auth-enabled"), (["-bogus"], "-bogus"),
                                        (["-db-port", "x"], "-db-port")])
def test_bad_flags_name_the_culprit(argv, named):
    with pytest.raises(FlagError) as exc:
        load_settings(argv)
    assert named in exc.value.message and "\n" not in exc.value.message


def test_precedence_flag_over_env_over_default(monkeypatch):
    assert load_settings([])[0].port == 8080
    monkeypatch.setenv("OMA_PORT", "9000")
    assert load_settings([])[0].port == 9000
    assert load_settings(["-port", "9100"])[0].port == 9100
    monkeypatch.setenv("OMA_PORT", "notaport")
    with pytest.raises(FlagError) as exc:
        load_settings([])
    assert "OMA_PORT" in exc.value.message


def test_cli_bad_flag_exits_nonzero_with_one_line():
    r = subprocess.run([sys.executable, "-c", "from oma.cli import oma_api; oma_api()", "-port", "abc"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "-port" in r.stderr


# --- backends --------------------------------------------------------------------------------
async def test_unknown_db_type_names_installed_backends(make_settings):
    with pytest.raises(BackendNotFound) as exc:
        async with Appliance(make_settings(db_type="oracle"), ("auth",)):
            pass
    assert "'oracle'" in exc.value.message and "mariadb, memory" in exc.value.message


def test_cli_unknown_db_type(tmp_path):
    env = {**os.environ, "OMA_DATA_DIR": str(tmp_path), "OMA_NBD_PORT": str(_free_port())}
    r = subprocess.run([sys.executable, "-c", "from oma.cli import oma_api; oma_api()", "-db-type", "oracle",
                        "-port", str(_free_port())], capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode != 0 and "mariadb, memory" in r.stderr.strip().splitlines()[-1]


# --- the envelope end to end -----------------------------------------------------------------
async def test_not_found_travels_as_seed_404(make_settings):
    settings = make_settings()
    async with Appliance(settings, ("auth",)) as appliance:
        probe = ProbeService(settings, await busmod.connect(appliance.nats_url, "probe"), appliance.services["auth"].pm)
        await probe.start()
        try:
            from oma.services.gateway.app import create_app
            app = create_app(settings, appliance.nats_url)
            async with app.router.lifespan_context(app):
                async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://oma") as c:
                    headers = await login(c)
                    r = await c.post("/api/v1/ossea/config", json={"action": "get", "id": 999}, headers=headers)
                    assert r.json() == {"success": False, "error": "Configuration not found",
                                        "details": "No OSSEA configuration found with ID: 999"}
                    assert r.status_code == 404
                    r = await c.post("/api/v1/ossea/config", json={"action": "delete", "id": 1}, headers=headers)
                    body = assert_error_shape(r, 500)
                    assert body["error"] == "Internal server error"
        finally:
            await probe.stop()
            await probe.bus.nc.drain()


async def test_no_responders_is_503_not_a_timeout(make_settings):
    async with running(make_settings(), ("auth",)) as client:
        headers = await login(client)
        t0 = time.monotonic()
        r = await client.get("/api/v1/replication/jobs", headers=headers)
        assert_error_shape(r, 503)
        assert time.monotonic() - t0 < 2


async def test_http_errors_in_seed_shape(make_settings):
    async with running(make_settings(), ("auth",)) as client:
        assert_error_shape(await client.get("/no/such/route"), 404)
        assert_error_shape(await client.get("/api/v1/auth/login"), 405)
        body = assert_error_shape(await client.post("/api/v1/auth/login", content=b"{not json",
                                                    headers={"content-type": "application/json"}), 400)
        assert body["error"] == "Invalid JSON"
        body = assert_error_shape(await client.post("/api/v1/auth/login", json={"appliance_id": "x"}), 400)
        assert "token" in body["details"]


# --- drain and queue groups ------------------------------------------------------------------
async def test_in_flight_request_gets_reply_during_shutdown(make_settings, nats_url):
    settings = make_settings()
    from oma.shared.plugins import get_plugin_manager
    pm = get_plugin_manager()
    probe = ProbeService(settings, await busmod.connect(nats_url, "probe"), pm)
    await probe.start()
    caller = busmod.Bus(await busmod.connect(nats_url, "caller"))
    pending = asyncio.create_task(caller.call(TEST_SUBJECT, {"sleep": 0.5}, timeout=5))
    await asyncio.sleep(0.1)  # the request is in flight
    await probe.stop()
    await probe.bus.nc.drain()
    assert (await pending)["done"] is True
    with pytest.raises(errors.Unavailable):  # nobody answers any more, and we learn it at once
        await caller.call(TEST_SUBJECT, {}, timeout=5)
    await caller.nc.drain()


async def test_two_instances_share_requests(make_settings, nats_url):
    settings = make_settings()
    from oma.shared.plugins import get_plugin_manager
    pm = get_plugin_manager()
    probes = [ProbeService(settings, await busmod.connect(nats_url, f"probe{i}"), pm) for i in range(2)]
    for p in probes:
        await p.start()
    caller = busmod.Bus(await busmod.connect(nats_url, "caller"))
    try:
        seen = {(await caller.call(TEST_SUBJECT, {}))["instance"] for _ in range(40)}
        assert seen == {id(p) for p in probes}
        # $SRV.PING finds both instances.
        from oma.services.gateway.routers.health import _ping_all
        assert (await _ping_all(caller.nc, 1.0))["config"] == 2
    finally:
        for p in probes:
            await p.stop()
            await p.bus.nc.drain()
        await caller.nc.drain()


# --- health ----------------------------------------------------------------------------------
async def test_health_healthy_then_degraded(make_settings):
    async with running(make_settings(health_cache_ttl=0)) as client:  # no reuse of the healthy answer
        r = await client.get("/health")
        body = r.json()
        assert r.status_code == 200 and body["status"] == "healthy" and body["database"] == "connected"
        assert set(body["services"]) == {"auth", "config", "inventory", "replication", "export_manager",
                                         "context_aggregator", "failover", "scheduler"} == set(SERVICES)
        assert body["version"] == "1.0.0" and body["timestamp"].endswith("Z")
        await client.appliance.services["inventory"].stop()
        r = await client.get("/health")
        assert r.status_code == 503
        assert r.json()["status"] == "degraded" and r.json()["down"] == ["inventory"]


async def test_swagger_and_openapi_open(make_settings):
    async with running(make_settings(), ("auth",)) as client:
        r = await client.get("/swagger/")
        assert r.status_code == 200 and "swagger-ui" in r.text
        assert (await client.get("/swagger/static/swagger-ui-bundle.js")).status_code == 200
        spec = (await client.get("/openapi.json")).json()
        assert "/api/v1/ossea/config" in spec["paths"]
        media = spec["paths"]["/api/v1/ossea/config"]["post"]["requestBody"]["content"]["application/json"]
        assert {"action": "delete", "id": 1} in [e["value"] for e in media["examples"].values()]


# --- migrations ------------------------------------------------------------------------------
async def test_migrations_mariadb_twice_is_noop(make_settings, mariadb_name):
    settings = make_settings(**mariadb_settings(mariadb_name))
    async with Appliance(settings, ("auth",)) as a:
        async with a.services["auth"].engine.connect() as conn:
            tables = await conn.run_sync(lambda c: set(sa_inspect(c).get_table_names()))
            first = (await conn.execute(text("SELECT version_num FROM alembic_version_auth"))).scalar()
    assert {"appliances", "sessions", "alembic_version_auth"} <= tables
    async with Appliance(settings, ("auth",)) as a:
        async with a.services["auth"].engine.connect() as conn:
            rows = (await conn.execute(text("SELECT version_num FROM alembic_version_auth"))).all()
    assert rows == [(first,)]


async def test_migrations_sqlite(make_settings):
    async with Appliance(make_settings(), ("auth",)) as a:
        async with a.services["auth"].engine.connect() as conn:
            tables = await conn.run_sync(lambda c: set(sa_inspect(c).get_table_names()))
    assert {"appliances", "sessions", "alembic_version_auth"} <= tables


async def test_mariadb_unreachable_fails_clearly(make_settings):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    settings = make_settings(db_type="mariadb", db_host="127.0.0.1", db_port=port, db_user="root",
                             startup_timeout=1.0)
    with pytest.raises(errors.Unavailable) as exc:
        async with Appliance(settings, ("auth",)):
            pass
    assert f"127.0.0.1:{port}" in str(exc.value.details)


# --- oma-api as a process --------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


@pytest.mark.parametrize("db", ["memory", "mariadb"])
def test_oma_api_process(tmp_path: Path, db: str, request):
    port = _free_port()
    args = ["oma-api", "-port", str(port), "-db-type", db]
    if db == "mariadb":
        name = f"oma_test_proc_{os.getpid()}"
        args += ["-db-host", "127.0.0.1", "-db-name", name, "-db-user", "root"]
        request.addfinalizer(lambda: subprocess.run(["mysql", "-uroot", "-h127.0.0.1", "-e",
                                                     f"DROP DATABASE IF EXISTS {name}"], check=False))
    env = {**os.environ, "OMA_DATA_DIR": str(tmp_path), "OMA_NBD_PORT": str(_free_port())}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        body = None
        while time.monotonic() < deadline:
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
                body = r.json()
                if r.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            time.sleep(0.2)
        assert body and body["status"] == "healthy" and len(body["services"]) == len(SERVICES) == 8, body
        assert httpx.get(f"http://127.0.0.1:{port}/swagger/").status_code == 200
        nats_children = _children(proc.pid)
        assert nats_children, "the embedded nats-server runs as a child"
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=5)
        assert time.monotonic() - t0 < 5
        assert proc.returncode in (0, -signal.SIGTERM)
        for pid in nats_children:
            assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text().lower()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.nats_forbidden  # reads $SRV.STATS over the gateway's connection, a test's shortcut
async def test_two_oma_service_processes_share_a_queue_group(make_settings, nats_url, tmp_path):
    """Two `oma-service config` processes on one NATS: both take requests; health stays up while
    either runs."""
    env = {**os.environ, "OMA_DATA_DIR": str(tmp_path), "OMA_NBD_PORT": str(_free_port()),
           "OMA_ALLOW_EPHEMERAL_WITH_EXTERNAL_NATS": "true"}
    procs = [subprocess.Popen(["oma-service", "config", "-nats-url", nats_url, "-db-type", "memory",
                               "-metrics-port", "0"], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL) for _ in range(2)]
    try:
        async with running(make_settings(), ("auth",)) as client:
            nc = client.app.state.bus.nc
            from oma.services.gateway.routers.health import _ping_all

            async def both_up():
                return (await _ping_all(nc, 0.5))["config"] == 2
            await wait_for(both_up, timeout=60, interval=0.2)
            headers = await login(client)
            for _ in range(30):
                r = await client.post("/api/v1/ossea/config", json={"action": "get"}, headers=headers)
                assert r.status_code == 200, r.text
            stats = []
            inbox = nc.new_inbox()
            sub = await nc.subscribe(inbox)
            await nc.publish("$SRV.STATS.config", b"", reply=inbox)
            for _ in range(2):
                msg = await sub.next_msg(timeout=2)
                stats.append(sum(e["num_requests"] for e in orjson.loads(msg.data)["endpoints"]))
            await sub.unsubscribe()
            assert len(stats) == 2 and all(n > 0 for n in stats) and sum(stats) >= 30, stats
            procs[0].send_signal(signal.SIGTERM)
            procs[0].wait(timeout=10)
            r = await client.get("/health")
            assert r.json()["services"]["config"]["status"] == "up"
            assert r.json()["services"]["config"]["instances"] == 1
            r = await client.post("/api/v1/ossea/config", json={"action": "get"}, headers=headers)
            assert r.status_code == 200
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
                p.wait(timeout=10)


async def test_appliance_comes_up_when_the_nbd_server_cannot(make_settings):
    """A busy NBD port (or a missing nbdkit) leaves the appliance up but /health 503 degraded with
    the reason; exports answer 503 with the reason instead of the whole appliance failing to start."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        async with running(make_settings(nbd_port=busy.getsockname()[1])) as client:
            r = await client.get("/health")
            body = r.json()
            assert r.status_code == 503 and body["status"] == "degraded" and body["down"] == ["export_manager"]
            reason = body["services"]["export_manager"]["reason"]
            assert reason.startswith("NBD exporter not serving: ") and "in use" in reason
            from oma.shared.subjects import Exports
            with pytest.raises(errors.Unavailable) as exc:
                await client.appliance.services["replication"].bus.call(Exports.ENSURE, {"vm_id": "x", "disk_unit_number": 0,
                                                                 "vm_name": "x", "device_path": "/dev/null"})
            assert "in use" in str(exc.value.details)


async def test_correlation_id_travels_to_the_service(make_settings, caplog):
    import logging
    caplog.set_level(logging.INFO)
    async with running(make_settings(), ("auth",)) as client:
        r = await client.post("/api/v1/auth/login", json={"appliance_id": "test-vma", "token": "wrong"},
                              headers={"X-Request-ID": "trace-abc-123"})
        assert r.status_code == 401 and r.headers["x-request-id"] == "trace-abc-123"
        assert (await client.get("/health")).headers["x-request-id"]  # generated when absent
    from oma.shared.logging import _Formatter
    lines = [_Formatter("json").format(rec) for rec in caplog.records if rec.name == "oma.auth"]
    assert any('"correlation_id": "trace-abc-123"' in line and "login failed" in line for line in lines), lines


async def test_nats_unreachable_fails_clearly(make_settings, caplog):
    import logging
    caplog.set_level(logging.WARNING)
    port = _free_port()
    t0 = time.monotonic()
    with pytest.raises(errors.Unavailable) as exc:
        async with Appliance(make_settings(nats_url=f"nats://127.0.0.1:{port}", startup_timeout=3), ("auth",)):
            pass
    assert time.monotonic() - t0 < 10
    assert f"nats://127.0.0.1:{port}" in exc.value.details
    assert any(r.getMessage() == "waiting for NATS" for r in caplog.records)


async def test_db_up_metric_follows_the_database(make_settings):
    """oma_db_up drops when the database goes away, without anyone asking /health."""
    from prometheus_client import REGISTRY
    from sqlalchemy.ext.asyncio import create_async_engine

    async def db_up(expected: float):
        return REGISTRY.get_sample_value("oma_db_up", {"service": "auth"}) == expected

    async with Appliance(make_settings(db_ping_interval=0.1), ("auth",)) as a:
        auth = a.services["auth"]
        assert await db_up(1)
        # The database vanishes: the service's engine now points at a port nobody listens on.
        await auth.engine.dispose()
        auth.engine = create_async_engine(f"mysql+asyncmy://root@127.0.0.1:{_free_port()}/gone")
        await wait_for(lambda: db_up(0), timeout=10)


async def test_start_up_keeps_an_operators_stream_limits(make_settings, nats_url):
    from nats.js.api import StreamConfig
    from oma.shared.subjects import EVENTS_STREAM, EVENTS_WILDCARD
    caller = busmod.Bus(await busmod.connect(nats_url, "operator"))
    try:
        await caller.ensure_stream()
        await caller.js.update_stream(StreamConfig(name=EVENTS_STREAM, subjects=[EVENTS_WILDCARD],
                                                   duplicate_window=120.0, max_age=30 * 86400))
        async with Appliance(make_settings(), ("auth",)):
            pass
        assert (await caller.js.stream_info(EVENTS_STREAM)).config.max_age == 30 * 86400
    finally:
        await caller.js.update_stream(StreamConfig(name=EVENTS_STREAM, subjects=[EVENTS_WILDCARD],
                                                   duplicate_window=120.0, max_age=0))
        await caller.nc.drain()
