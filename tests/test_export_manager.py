"""export_manager against real NATS, SQLite/MariaDB, nbdkit and nbd-server.

Devices are sparse files in tmp; data is written through the exports with `nbdcopy` and read
back from the backing files. Every behavioural test runs on both exporter backends.
"""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import signal
import socket
import uuid
from pathlib import Path

import orjson
import pytest
from conftest import MARIADB, mariadb_settings
from nbdutil import (
    MiB,
    digest,
    free_port,
    missing_tools,
    nbdcopy,
    random_file,
    sparse_file,
    wait_until,
)
from prometheus_client import REGISTRY
from sqlalchemy import inspect

from oma.plugins.nbd.base import pid_alive
from oma.services.export_manager import service as em
from oma.shared import db, errors
from oma.shared.plugins import get_backend, get_plugin_manager
from oma.runner import Appliance
from oma.shared.subjects import Exports, health

BACKENDS = ("nbdkit", "nbd-server")
RELOADS_PER_BATCH = {"nbdkit": 0, "nbd-server": 1}
MIGRATIONS = Path(em.__file__).parent / "migrations"


@pytest.fixture(scope="module", autouse=True)
def nbd_tools_installed():
    missing = missing_tools()
    if missing:
        pytest.fail(f"required NBD tools are not installed: {', '.join(missing)}")


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    return request.param


def vm() -> str:
    return str(uuid.uuid4())


@contextlib.asynccontextmanager
async def manager(settings):
    """The export_manager service alone; yields the live service instance."""
    async with Appliance(settings, ("export_manager",)) as appliance:
        yield appliance.services["export_manager"]


@pytest.fixture
def em_settings(make_settings, backend, tmp_path):
    def make(**kw):
        return make_settings(export_backend=backend, nbd_port=kw.pop("nbd_port", free_port()), **kw)
    return make


async def call(svc, subject: str, payload: dict | None = None, timeout: float = 30):
    return await svc.bus.call(subject, payload or {}, timeout=timeout)


def ensure_body(vm_id: str, unit: int, device: Path, vm_name: str = "pgtest1") -> dict:
    return {"vm_id": vm_id, "disk_unit_number": unit, "vm_name": vm_name, "device_path": str(device)}


async def collect_events(svc, into: list[dict]):
    async def cb(msg):
        into.append(orjson.loads(msg.data))
    return await svc.bus.nc.subscribe(Exports.EVT_CHANGED, cb=cb)


def sample(name: str, **labels) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_ensure_writes_through_export_then_reuses(em_settings, backend, tmp_path):
    dev = sparse_file(tmp_path / "vdc.img", 64 * MiB)
    vm_id = vm()
    async with manager(em_settings()) as svc:
        exp = svc.exporter
        events: list[dict] = []
        sub = await collect_events(svc, events)
        created_before = sample("oma_export_ensures_total", outcome="created")
        reused_before = sample("oma_export_ensures_total", outcome="reused")

        r = await call(svc, Exports.ENSURE, ensure_body(vm_id, 0, dev))
        name = f"migration-vm-{vm_id}-disk0"
        assert r == {"export_name": name, "device_path": str(dev), "port": exp.port,
                     "uri": f"nbd://127.0.0.1:{exp.port}/{name}", "reused": False,
                     "vm_id": vm_id, "disk_unit_number": 0, "action": "created", "message": r["message"]}
        assert exp.reloads == RELOADS_PER_BATCH[backend]

        # the export really takes writes: they land in the backing file
        src = random_file(tmp_path / "src.bin", 8 * MiB)
        await nbdcopy(src, f"nbd://127.0.0.1:{exp.port}/{name}", "--flush")
        assert digest(dev, 8 * MiB) == digest(src)
        assert os.path.getsize(dev) == 64 * MiB

        reloads = exp.reloads
        again = await call(svc, Exports.ENSURE, ensure_body(vm_id, 0, dev))
        assert again["reused"] is True and again["action"] == "reused" and again["export_name"] == name
        assert exp.reloads == reloads, "reuse must not touch the server"
        assert sample("oma_export_ensures_total", outcome="created") == created_before + 1
        assert sample("oma_export_ensures_total", outcome="reused") == reused_before + 1
        assert sample("oma_exports_active") == 1
        assert sample("oma_nbd_server_reloads_total", backend=backend) >= exp.reloads

        got = await call(svc, Exports.GET, {"export_name": name, "check": True})
        assert got["connectable"] is True and got["size"] == 64 * MiB and got["status"] == "active"
        by_key = await call(svc, Exports.GET, {"vm_id": vm_id, "disk_unit_number": 0})
        assert by_key["export_name"] == name and "connectable" not in by_key

        listed = await call(svc, Exports.LIST, {"vm_id": vm_id, "status": "active"})
        assert listed["count"] == 1 and listed["exports"][0]["device_path"] == str(dev)
        assert (await call(svc, Exports.LIST, {"status": "inactive"}))["count"] == 0

        h = await call(svc, health("export_manager"))
        assert h["status"] == "up" and h["database"] == "connected" and "reason" not in h
        assert h["exporter"]["backend"] == backend and h["exporter"]["running"] is True
        assert h["exporter"]["exports"] == 1 and h["exporter"]["port"] == exp.port

        await asyncio.sleep(0.2)
        await sub.unsubscribe()
        assert [(e["export_name"], e["action"]) for e in events] == [(name, "created")]
        assert events[0]["vm_id"] == vm_id and events[0]["disk_unit_number"] == 0 and events[0]["event_id"]
    assert not exp.state()["running"], "teardown stops the server"


async def test_twenty_concurrent_new_disks_share_one_reload(em_settings, backend, tmp_path):
    vm_id = vm()
    devs = [sparse_file(tmp_path / f"d{i}.img", (i + 1) * MiB) for i in range(20)]
    async with manager(em_settings()) as svc:
        exp = svc.exporter
        before = exp.reloads
        results = await asyncio.gather(*(call(svc, Exports.ENSURE, ensure_body(vm_id, i, d))
                                         for i, d in enumerate(devs)))
        assert [r["action"] for r in results] == ["created"] * 20
        assert exp.reloads - before == RELOADS_PER_BATCH[backend]
        sizes = await asyncio.gather(*(exp.check_export(r["export_name"]) for r in results))
        assert sizes == [(i + 1) * MiB for i in range(20)]
        assert (await call(svc, Exports.LIST, {"vm_id": vm_id}))["count"] == 20


async def test_ten_concurrent_ensures_of_one_disk_make_one_export(em_settings, backend, tmp_path):
    vm_id = vm()
    dev = sparse_file(tmp_path / "same.img", 4 * MiB)
    async with manager(em_settings()) as svc:
        results = await asyncio.gather(*(call(svc, Exports.ENSURE, ensure_body(vm_id, 3, dev)) for _ in range(10)))
        assert sorted(r["action"] for r in results) == ["created"] + ["reused"] * 9
        assert {r["export_name"] for r in results} == {f"migration-vm-{vm_id}-disk3"}
        assert (await call(svc, Exports.LIST, {"vm_id": vm_id}))["count"] == 1
        assert list(svc.exporter.list_exports()) == [f"migration-vm-{vm_id}-disk3"]
        assert svc.exporter.reloads == RELOADS_PER_BATCH[backend]


async def test_repoint_deactivate_reactivate_remove(em_settings, backend, tmp_path):
    vm_id = vm()
    a = sparse_file(tmp_path / "a.img", 2 * MiB)
    b = sparse_file(tmp_path / "b.img", 6 * MiB)
    name = f"migration-vm-{vm_id}-disk1"
    async with manager(em_settings()) as svc:
        exp = svc.exporter
        events: list[dict] = []
        sub = await collect_events(svc, events)
        await call(svc, Exports.ENSURE, ensure_body(vm_id, 1, a))
        assert await exp.check_export(name) == 2 * MiB

        r = await call(svc, Exports.ENSURE, ensure_body(vm_id, 1, b))
        assert r["action"] == "repointed" and r["reused"] is False and str(a) in r["message"]
        assert exp.list_exports()[name] == str(b)
        assert await exp.check_export(name) == 6 * MiB
        assert (await call(svc, Exports.GET, {"export_name": name}))["device_path"] == str(b)

        d = await call(svc, Exports.DEACTIVATE, {"vm_id": vm_id, "disk_unit_number": 1})
        assert d["status"] == "inactive" and d["removed_from_server"] is True
        assert name not in exp.list_exports()
        got = await call(svc, Exports.GET, {"export_name": name, "check": True})
        assert got["status"] == "inactive" and got["connectable"] is False and "no export named" in got["check_error"]
        assert (await call(svc, Exports.LIST, {"status": "inactive"}))["count"] == 1   # the row is kept
        again = await call(svc, Exports.DEACTIVATE, {"export_name": name})
        assert again["removed_from_server"] is False and "already" in again["message"]

        r = await call(svc, Exports.ENSURE, ensure_body(vm_id, 1, b))
        assert r["action"] == "reactivated" and await exp.check_export(name) == 6 * MiB

        gone = await call(svc, Exports.REMOVE, {"export_name": name})
        assert gone["removed_from_server"] is True
        assert (await call(svc, Exports.LIST, {}))["count"] == 0 and name not in exp.list_exports()
        with pytest.raises(errors.NotFound):
            await call(svc, Exports.GET, {"export_name": name})
        with pytest.raises(errors.NotFound):
            await call(svc, Exports.REMOVE, {"export_name": name})
        await asyncio.sleep(0.2)
        await sub.unsubscribe()
        assert [e["action"] for e in events] == ["created", "repointed", "deactivated", "reactivated", "removed"]


async def test_validation_errors(em_settings, tmp_path):
    dev = sparse_file(tmp_path / "v.img", MiB)
    async with manager(em_settings()) as svc:
        with pytest.raises(errors.BadRequest) as exc:
            await call(svc, Exports.ENSURE, {"vm_id": vm(), "vm_name": "x", "device_path": str(dev)})
        assert "disk_unit_number" in str(exc.value.details)
        with pytest.raises(errors.BadRequest) as exc:
            await call(svc, Exports.ENSURE, ensure_body("../etc", 0, dev))
        assert "vm_id" in str(exc.value.details)
        with pytest.raises(errors.BadRequest):
            await call(svc, Exports.ENSURE, {**ensure_body(vm(), 0, dev), "device_path": "vdc.img"})
        with pytest.raises(errors.NotFound) as exc:
            await call(svc, Exports.ENSURE, ensure_body(vm(), 0, tmp_path / "missing.img"))
        assert exc.value.status == 404
        with pytest.raises(errors.BadRequest):
            await call(svc, Exports.GET, {"vm_id": vm()})
        with pytest.raises(errors.BadRequest):
            await call(svc, Exports.LIST, {"status": "gone"})
        assert (await call(svc, Exports.LIST))["count"] == 0 and svc.exporter.list_exports() == {}


async def test_reconcile_repairs_server_and_reports_missing_devices(em_settings, backend, tmp_path):
    vm_id = vm()
    devs = [sparse_file(tmp_path / f"r{i}.img", (i + 1) * MiB) for i in range(3)]
    stray = sparse_file(tmp_path / "stray.img", MiB)
    names = [f"migration-vm-{vm_id}-disk{i}" for i in range(3)]
    async with manager(em_settings()) as svc:
        exp = svc.exporter
        for i, d in enumerate(devs):
            await call(svc, Exports.ENSURE, ensure_body(vm_id, i, d))
        # behind the service's back: an export deleted, a stray one added, a device gone
        assert await exp.remove_export(names[0]) is True
        assert await exp.add_export("stray-export", str(stray)) is True
        devs[2].unlink()

        report = await call(svc, Exports.RECONCILE)
        assert report["readded"] == [names[0]] and report["removed"] == ["stray-export"]
        assert [m["export_name"] for m in report["missing_devices"]] == [names[2]]
        assert report["failed"] == [] and report["active"] == 3
        assert sample("oma_exports_missing_device") == 1
        assert set(exp.list_exports()) == set(names)
        assert await exp.check_export(names[0]) == MiB
        # the mapping whose device vanished is reported, not dropped
        got = await call(svc, Exports.GET, {"export_name": names[2]})
        assert got["status"] == "active"

        clean = await call(svc, Exports.RECONCILE)
        assert clean["readded"] == clean["removed"] == clean["repointed"] == []


async def test_restart_keeps_mappings_and_reserves_them(em_settings, backend, tmp_path, mariadb_name):
    vm_id = vm()
    devs = [sparse_file(tmp_path / f"p{i}.img", (i + 2) * MiB) for i in range(2)]
    names = [f"migration-vm-{vm_id}-disk{i}" for i in range(2)]
    settings = em_settings(**mariadb_settings(mariadb_name))
    async with manager(settings) as svc:
        for i, d in enumerate(devs):
            await call(svc, Exports.ENSURE, ensure_body(vm_id, i, d))
        state = svc.exporter.dir
    # the server is down; its export state for disk 0 is lost
    lost = [p for p in state.rglob(f"{names[0]}*") if p.is_symlink() or p.suffix == ".conf"]
    assert lost
    for p in lost:
        p.unlink()

    async with manager(settings) as svc:
        exp = svc.exporter
        assert set(exp.list_exports()) == set(names), "start-up reconcile serves every active mapping"
        assert [await exp.check_export(n) for n in names] == [2 * MiB, 3 * MiB]
        reloads = exp.reloads
        r = await call(svc, Exports.ENSURE, ensure_body(vm_id, 1, devs[1]))
        assert r["reused"] is True and exp.reloads == reloads
        src = random_file(tmp_path / "after.bin", MiB)
        await nbdcopy(src, exp.uri(names[0]), "--flush")
        assert digest(devs[0], MiB) == digest(src)


async def test_insert_race_between_processes_mariadb(make_settings, mariadb_name, tmp_path):
    """Two replicas do not share the in-process lock: the unique key decides, the loser reads
    the winner's row back and reuses it (no duplicate, no error)."""
    settings = make_settings(**mariadb_settings(mariadb_name))
    pm = get_plugin_manager()
    storage = get_backend(pm, "storage", "mariadb").factory(settings)
    engine = await storage.create_engine("export_manager")
    exporter = get_backend(pm, "exporter", "nbdkit").factory(
        make_settings(nbd_port=free_port(), data_dir=tmp_path / "race"))
    await exporter.start()
    try:
        await db.run_migrations(engine, "export_manager", MIGRATIONS)
        events: list[str] = []

        async def publish(action, m):
            events.append(action)
        replicas = [em.ExportManager(db.sessionmaker(engine), exporter, publish) for _ in range(5)]
        # open the pool's connections first, so the replicas' transactions really overlap
        await asyncio.gather(*(r.list(em.ListRequest()) for r in replicas))
        for disk in range(3):
            dev = sparse_file(tmp_path / f"race{disk}.img", MiB)
            req = em.EnsureRequest(**ensure_body(vm(), disk, dev))
            results = await asyncio.gather(*(replicas[i % 5].ensure(req) for i in range(10)))
            assert sorted(r["action"] for r in results) == ["created"] + ["reused"] * 9
        assert events == ["created"] * 3
        assert sum(r.insert_races for r in replicas) >= 1, "the unique key never had to decide"
        assert (await replicas[0].list(em.ListRequest()))["count"] == 3
        assert len(exporter.list_exports()) == 3
        for r in replicas:
            r.close()
    finally:
        await exporter.stop()
        await engine.dispose()


async def _mariadb_conn(name: str):
    import asyncmy
    return await asyncmy.connect(host=MARIADB["host"], port=MARIADB["port"], user=MARIADB["user"],
                                 password=MARIADB["password"], database=name, autocommit=True)


async def test_schema_on_mariadb_matches_the_seed(make_settings, mariadb_name):
    settings = make_settings(**mariadb_settings(mariadb_name))
    engine = await get_backend(get_plugin_manager(), "storage", "mariadb").factory(settings).create_engine("x")
    try:
        await db.run_migrations(engine, "export_manager", MIGRATIONS)
        await db.run_migrations(engine, "export_manager", MIGRATIONS)   # a second run is a no-op
    finally:
        await engine.dispose()
    import asyncmy.errors
    conn = await _mariadb_conn(mariadb_name)
    try:
        async with conn.cursor() as cur:
            await cur.execute("SHOW CREATE TABLE vm_export_mappings")
            ddl = (await cur.fetchone())[1]
            for part in ("`id` bigint(20) NOT NULL AUTO_INCREMENT", "`vm_id` varchar(36) NOT NULL",
                         "`disk_unit_number` int(11) NOT NULL", "`vm_name` varchar(255) NOT NULL",
                         "`export_name` varchar(255) NOT NULL", "`device_path` varchar(255) NOT NULL",
                         "`status` enum('active','inactive') DEFAULT 'active'",
                         "`created_at` datetime(3) DEFAULT current_timestamp(3)",
                         "`updated_at` datetime(3) DEFAULT current_timestamp(3) ON UPDATE current_timestamp(3)",
                         "PRIMARY KEY (`id`)", "UNIQUE KEY `export_name` (`export_name`)",
                         "UNIQUE KEY `unique_vm_disk` (`vm_id`,`disk_unit_number`)",
                         "KEY `idx_vm_id` (`vm_id`)", "KEY `idx_export_name` (`export_name`)",
                         "KEY `idx_device_path` (`device_path`)", "KEY `idx_status` (`status`)"):
                assert part in ddl, (part, ddl)

            insert = ("INSERT INTO vm_export_mappings (vm_id, disk_unit_number, vm_name, export_name, device_path) "
                      "VALUES (%s, %s, %s, %s, %s)")
            await cur.execute(insert, ("vm-a", 0, "a", "migration-vm-vm-a-disk0", "/dev/vdb"))
            with pytest.raises(asyncmy.errors.IntegrityError) as exc:       # same (vm_id, unit)
                await cur.execute(insert, ("vm-a", 0, "a", "other-name", "/dev/vdc"))
            assert "unique_vm_disk" in str(exc.value)
            with pytest.raises(asyncmy.errors.IntegrityError) as exc:       # same export_name
                await cur.execute(insert, ("vm-b", 0, "b", "migration-vm-vm-a-disk0", "/dev/vdd"))
            assert "export_name" in str(exc.value)
            with pytest.raises(asyncmy.errors.DataError):                   # only active/inactive
                await cur.execute("SET SESSION sql_mode = 'STRICT_ALL_TABLES'")
                await cur.execute("UPDATE vm_export_mappings SET status = 'gone'")
            await cur.execute("SELECT status, created_at, updated_at FROM vm_export_mappings")
            status, created, updated = await cur.fetchone()
            assert status == "active" and created is not None and created == updated
            await asyncio.sleep(0.01)
            await cur.execute("UPDATE vm_export_mappings SET device_path = '/dev/vdz'")
            await cur.execute("SELECT created_at, updated_at FROM vm_export_mappings")
            created2, updated2 = await cur.fetchone()
            assert created2 == created and updated2 > updated                # ON UPDATE, in milliseconds
            await cur.execute("SELECT COUNT(*) FROM vm_export_mappings")
            assert (await cur.fetchone())[0] == 1
    finally:
        conn.close()


async def test_schema_on_sqlite(make_settings):
    settings = make_settings()
    engine = await get_backend(get_plugin_manager(), "storage", "memory").factory(settings).create_engine("x")
    try:
        await db.run_migrations(engine, "export_manager", MIGRATIONS)

        def check(sync_conn):
            insp = inspect(sync_conn)
            idx = {i["name"]: i["column_names"] for i in insp.get_indexes("vm_export_mappings")}
            assert idx == {"idx_vm_id": ["vm_id"], "idx_export_name": ["export_name"],
                           "idx_device_path": ["device_path"], "idx_status": ["status"]}
            uniques = {u["name"]: u["column_names"] for u in insp.get_unique_constraints("vm_export_mappings")}
            assert uniques == {"export_name": ["export_name"], "unique_vm_disk": ["vm_id", "disk_unit_number"]}
        async with engine.connect() as conn:
            await conn.run_sync(check)
        from sqlalchemy import text
        from sqlalchemy.exc import IntegrityError
        insert = text("INSERT INTO vm_export_mappings (vm_id, disk_unit_number, vm_name, export_name, device_path) "
                      "VALUES (:v, :u, 'n', :e, '/dev/vdb')")
        async with engine.begin() as conn:
            await conn.execute(insert, {"v": "vm-a", "u": 0, "e": "e0"})
        for dup in ({"v": "vm-a", "u": 0, "e": "e1"}, {"v": "vm-b", "u": 0, "e": "e0"}):
            with pytest.raises(IntegrityError):
                async with engine.begin() as conn:
                    await conn.execute(insert, dup)
        async with engine.connect() as conn:
            row = (await conn.execute(text("SELECT id, status, created_at FROM vm_export_mappings"))).one()
            assert row.id == 1 and row.status == "active" and row.created_at is not None
    finally:
        await engine.dispose()


async def test_keep_running_leaves_open_connections_alone(em_settings, backend, tmp_path, mariadb_name):
    """With nbd_keep_running, a service restart leaves the NBD server up: a copy streaming through an export survives it, and the next
    start attaches to the same server."""
    settings = em_settings(nbd_keep_running=True, **mariadb_settings(mariadb_name))
    vm_id = vm()
    dev = sparse_file(tmp_path / "live.img", 64 * MiB)
    name = f"migration-vm-{vm_id}-disk0"
    data = random_file(tmp_path / "live.bin", 32 * MiB).read_bytes()
    async with manager(settings) as svc:
        exp = svc.exporter
        await call(svc, Exports.ENSURE, ensure_body(vm_id, 0, dev))
        proc = await asyncio.create_subprocess_exec("nbdcopy", "--flush", "-", exp.uri(name),
                                                    stdin=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        proc.stdin.write(data[:16 * MiB])
        await proc.stdin.drain()
        pid = exp.pid
    latest = exp                    # the exporter that last supervised the server
    try:
        assert exp.state()["running"] and proc.returncode is None
        async with manager(settings) as svc:
            latest = svc.exporter
            if backend == "nbdkit":
                assert svc.exporter.pid == pid and svc.exporter.attached
            # nbd-server may restart its main process when conf.d looks newer than it (children,
            # which serve the open connection, survive that); either way nothing was reloaded by us
            assert name in svc.exporter.list_exports()
            proc.stdin.write(data[16 * MiB:])
            await proc.stdin.drain()
            proc.stdin.close()
            _, err = await proc.communicate()
            assert proc.returncode == 0, err.decode()
            r = await call(svc, Exports.ENSURE, ensure_body(vm_id, 0, dev))
            assert r["reused"] is True
        assert digest(dev, len(data)) == hashlib.sha256(data).hexdigest()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await latest.stop()         # nobody supervises it any more: end the server we started
    assert not latest.state()["running"]


def squat(port: int = 0) -> socket.socket:
    """Another process's listener on the NBD port: accepts connections, never speaks NBD."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", port))
    s.listen()
    return s


async def squat_when_free(port: int) -> socket.socket:
    # a killed multi-threaded server shows as a zombie before its last thread closed the socket
    for _ in range(100):
        try:
            return squat(port)
        except OSError:
            await asyncio.sleep(0.01)
    return squat(port)


async def assert_not_serving(svc, dev: Path, because: str) -> None:
    """Health degraded with the reason; ready and ensure 503 in the seed's shape; no mapping written."""
    h = await call(svc, health("export_manager"))
    assert h["status"] == "degraded", h
    assert h["reason"].startswith("NBD exporter not serving: ") and because in h["reason"], h["reason"]
    for subject, body in ((Exports.READY, {}), (Exports.ENSURE, ensure_body(vm(), 0, dev))):
        with pytest.raises(errors.Unavailable) as exc:
            await call(svc, subject, body)
        assert exc.value.status == 503 and because in exc.value.details
        assert exc.value.body() == {"success": False, "error": "NBD exporter not serving",
                                    "details": exc.value.details}
    assert (await call(svc, Exports.LIST))["count"] == 0


async def test_port_squatted_at_start_degrades_health_and_refuses_exports(em_settings, tmp_path):
    dev = sparse_file(tmp_path / "sq.img", MiB)
    with squat() as s:
        async with manager(em_settings(nbd_port=s.getsockname()[1])) as svc:
            await assert_not_serving(svc, dev, "already in use")


async def test_server_killed_and_port_squatted_then_freed(em_settings, backend, tmp_path):
    """The server dies and another process takes its port: the watchdog cannot restart it (logged,
    backing off), health and exports say so; once the port is free the watchdog brings it back."""
    dev = sparse_file(tmp_path / "sq.img", 4 * MiB)
    async with manager(em_settings(nbd_watchdog_interval=0.1, nbd_watchdog_max_backoff=0.4)) as svc:
        exp = svc.exporter
        assert await call(svc, Exports.READY) == {"serving": True, "backend": backend, "port": exp.port,
                                                  "tls": False}
        async with exp._lock:                   # the watchdog waits while the port changes hands
            pid = exp.pid
            os.kill(pid, signal.SIGKILL)
            await wait_until(lambda: not pid_alive(pid), what="server death")
            s = await squat_when_free(exp.port)
        with s:
            await wait_until(lambda: exp.last_error and "already in use" in exp.last_error, what="watchdog failure")
            await assert_not_serving(svc, dev, "already in use")
            assert exp.restarts == 0
        await wait_until(lambda: exp.restarts == 1, timeout=10, what="restart once the port is free")
        assert (await call(svc, Exports.READY))["serving"] is True
        assert (await call(svc, health("export_manager")))["status"] == "up"
        r = await call(svc, Exports.ENSURE, ensure_body(vm(), 0, dev))
        src = random_file(tmp_path / "src.bin", MiB)
        await nbdcopy(src, r["uri"], "--flush")
        assert digest(dev, MiB) == digest(src)
