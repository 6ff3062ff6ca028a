"""VM contexts: the read model built from OMA_EVENTS, its queries through the gateway, idempotency,
dead-lettering, rebuild, durable catch-up, SSE, MariaDB.

The tests publish events as docs/events.md defines them (the replication service's contract).
The NATS server and its stream are shared by the session: each test purges the stream and uses its
own durable consumer name."""
from __future__ import annotations

import asyncio
import contextlib
import socket
import uuid
from datetime import datetime, timedelta, timezone
from typing import Any

import h11
import httpx
import nats
import orjson
import pytest
import uvicorn
from nats.js.errors import NotFoundError
from prometheus_client import REGISTRY
from sqlalchemy import inspect as sa_inspect
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from conftest import assert_error_shape, login, mariadb_settings, running, wait_for
from tests.mariadbutil import mariadb_exec
from oma.shared import errors
from oma.shared.db import read, read_engine
from oma.shared.bus import Bus
from oma.shared.settings import Settings
from oma.shared.subjects import EVENTS_STREAM, Contexts, Inventory, Replication

SERVICES = ("auth", "context_aggregator")
T0 = datetime(2025, 9, 9, 11, 48, 50, 123000, tzinfo=timezone.utc)
SUBJECT = {"created": Replication.EVT_CREATED, "status_changed": Replication.EVT_STATUS,
           "progressed": Replication.EVT_PROGRESS, "completed": Replication.EVT_COMPLETED,
           "failed": Replication.EVT_FAILED}


# Quicker tunables than production's, for tests.
TEST_TUNABLES = {"contexts_ack_wait": 5.0, "contexts_max_deliver": 5, "contexts_nak_delay": 0.1,
                 "contexts_batch": 100}


def ts(dt: datetime) -> str:
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


class Clock:
    """Event times one second apart, in publishing order."""

    def __init__(self, start: datetime = T0):
        self.now = start

    def tick(self) -> datetime:
        self.now += timedelta(seconds=1)
        return self.now


class Job:
    """Builds a job's events with the whole summary and an increasing `seq`."""

    def __init__(self, clock: Clock, vm: str, job_id: str, *, disks: int = 2, rtype: str = "initial"):
        self.clock, self.vm, self.job_id, self.seq = clock, vm, job_id, 0
        self.created = clock.now + timedelta(seconds=1)
        self.state: dict[str, Any] = dict(
            replication_type=rtype, status="queued", progress_percent=0.0, current_operation="Queued",
            vma_throughput_mbps=None, vma_eta_seconds=None, bytes_transferred=0, total_bytes=disks * 2**30,
            started_at=None, completed_at=None, error=None)
        self.disks = [{"unit_number": u, "disk_id": f"disk-{u:03d}", "path": f"[datastore1] {vm}/{vm}_{u}.vmdk",
                       "size_gb": 1, "capacity_bytes": 2**30, "datastore": "datastore1",
                       "volume_id": f"vol-{job_id}-{u}", "volume_name": f"migration-{vm}-disk-{u}",
                       "device_path": f"/dev/vd{chr(98 + u)}", "export_name": f"migration-vm-{vm}-disk{u}",
                       "status": "ready", "change_id": None} for u in range(disks)]

    def event(self, kind: str, **changes: Any) -> tuple[str, dict[str, Any]]:
        self.seq += 1
        at = self.clock.tick()
        self.state.update(changes)
        if kind == "completed":
            self.state.update(status="completed", progress_percent=100.0, current_operation="Completed",
                              completed_at=ts(at), bytes_transferred=self.state["total_bytes"])
            for d in self.disks:
                d["change_id"] = f"52 3c ec 1b-{self.job_id}/{d['unit_number']}"
        elif kind == "failed":
            self.state.update(status="failed", completed_at=ts(at), error=changes.get("error", "boom"))
        payload = {"event_id": uuid.uuid4().hex, "occurred_at": ts(at), "job_id": self.job_id, "seq": self.seq,
                   "vm": {"id": f"vm-{self.vm}", "uuid": f"4205-{self.vm}", "name": self.vm,
                          "path": f"/DatabanxDC/vm/{self.vm}", "datacenter": "DatabanxDC", "cpus": 2,
                          "memory_mb": 4096},
                   **self.state, "created_at": ts(self.created),
                   "disks": [dict(d) for d in self.disks]}
        return SUBJECT[kind], payload

    def lifecycle(self, progress_steps: int = 3, end: str = "completed") -> list[tuple[str, dict[str, Any]]]:
        out = [self.event("created"),
               self.event("status_changed", status="provisioning", current_operation="Provisioning"),
               self.event("status_changed", status="ready_for_sync", progress_percent=0.0,
                          current_operation="Ready for sync")]
        for i in range(1, progress_steps + 1):
            pct = round(90 * i / progress_steps, 2)
            out.append(self.event("progressed", status="replicating", progress_percent=pct,
                                  current_operation="Transferring Data", vma_throughput_mbps=11.46 + i,
                                  vma_eta_seconds=1631 - i, started_at=ts(self.created),
                                  bytes_transferred=int(self.state["total_bytes"] * pct / 100)))
        out.append(self.event(end))
        return out


def discovered(clock: Clock, vm: str, change: str = "new", cpus: int = 4) -> tuple[str, dict[str, Any]]:
    at = clock.tick()
    return Inventory.EVT_DISCOVERED, {
        "event_id": uuid.uuid4().hex, "occurred_at": ts(at), "vcenter": "vcenter.example.com", "change": change,
        "vm": {"id": f"vm-{vm}", "uuid": f"4205-{vm}", "name": vm, "path": f"/DatabanxDC/vm/{vm}",
               "datacenter": "DatabanxDC", "cpus": cpus, "memory_mb": 8192, "power_state": "poweredOn",
               "guest_os": "rhel8_64Guest",
               "cbt_enabled": True, "nics": [],
               "disks": [{"id": "disk-000", "unit_number": 0, "path": f"[datastore1] {vm}/{vm}.vmdk",
                          "size_gb": 40, "capacity_bytes": 40 * 2**30, "datastore": "datastore1"}]}}


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.fixture
async def bus(nats_url):
    """A publisher on the shared NATS, with the events stream emptied for this test."""
    nc = await nats.connect(nats_url)
    b = Bus(nc)
    await b.ensure_stream()
    await b.js.purge_stream(EVENTS_STREAM)
    b.consumers = []  # type: ignore[attr-defined]
    yield b
    for name in b.consumers:  # type: ignore[attr-defined]
        try:
            await b.js.delete_consumer(EVENTS_STREAM, name)
        except NotFoundError:
            pass
    await nc.drain()


@pytest.fixture
def ctx_settings(make_settings, bus):
    def make(**overrides: Any) -> Settings:
        # The stream is purged for each of these tests: replay all of it, as a fresh appliance does.
        overrides = {**TEST_TUNABLES, "contexts_deliver_policy": "all", **overrides}
        overrides.setdefault("contexts_consumer", f"context_aggregator-test-{uuid.uuid4().hex[:8]}")
        bus.consumers.append(overrides["contexts_consumer"])
        return make_settings(**overrides)
    return make


async def publish(bus: Bus, events: list[tuple[str, dict[str, Any]]], *, fresh_ids: bool = False) -> None:
    for subject, payload in events:
        if fresh_ids:  # a re-sent fact that JetStream's duplicate window does not drop
            payload = {**payload, "event_id": uuid.uuid4().hex}
        await bus.publish_event(subject, payload, msg_id=payload["event_id"])


async def get_ctx(client: httpx.AsyncClient, headers: dict[str, str], vm: str) -> httpx.Response:
    return await client.get(f"/api/v1/vm-contexts/{vm}", headers=headers)


async def until(client, headers, vm: str, check, timeout: float = 15.0) -> dict[str, Any]:
    async def ready():
        r = await get_ctx(client, headers, vm)
        return r.json() if r.status_code == 200 and check(r.json()) else None
    return await wait_for(ready, timeout)


# --- the detail: the seed's shape -----------------------------------------------------------
async def test_job_lifecycle_gives_the_seed_shape(ctx_settings, bus):
    clock = Clock()
    job1 = Job(clock, "pgtest1", "job-20250909-114850-0001")
    applied_before = metric("oma_context_events_applied_total", type="progressed")
    async with running(ctx_settings(), SERVICES) as client:
        h = await login(client)
        await publish(bus, job1.lifecycle(progress_steps=3))
        body = await until(client, h, "pgtest1", lambda b: b["context"]["current_status"] == "completed")

        assert set(body) == {"context", "current_job", "job_history", "disks", "cbt_history"}
        ctx = body["context"]
        assert ctx["context_id"] == "ctx-pgtest1-20250909-114851"  # the first event's time
        assert {k: ctx[k] for k in ("vm_name", "current_status", "total_jobs_run", "successful_jobs",
                                    "failed_jobs")} == {"vm_name": "pgtest1", "current_status": "completed",
                                                        "total_jobs_run": 1, "successful_jobs": 1, "failed_jobs": 0}
        assert (ctx["cpu_count"], ctx["memory_mb"], ctx["datacenter"]) == (2, 4096, "DatabanxDC")
        cur = body["current_job"]
        assert {"id", "status", "progress_percent", "current_operation", "vma_throughput_mbps",
                "vma_eta_seconds"} <= set(cur)
        assert (cur["id"], cur["status"], cur["progress_percent"]) == (job1.job_id, "completed", 100.0)
        assert [j["id"] for j in body["job_history"]] == [job1.job_id]
        assert [(d["unit_number"], d["change_id"], d["device_path"]) for d in body["disks"]] == [
            (0, f"52 3c ec 1b-{job1.job_id}/0", "/dev/vdb"), (1, f"52 3c ec 1b-{job1.job_id}/1", "/dev/vdc")]
        assert [(c["job_id"], c["unit_number"]) for c in body["cbt_history"]] == [(job1.job_id, 0), (job1.job_id, 1)]
        assert metric("oma_context_events_applied_total", type="progressed") - applied_before == 3

        # A second job, mid-transfer: the context follows it; the seed's example, live.
        job2 = Job(clock, "pgtest1", "job-20250909-114850-0002", rtype="incremental")
        await publish(bus, [job2.event("created"),
                            job2.event("status_changed", status="replicating", current_operation="Transferring Data"),
                            job2.event("progressed", status="replicating", progress_percent=49.31,
                                       vma_throughput_mbps=11.46, vma_eta_seconds=1631)])
        body = await until(client, h, "pgtest1", lambda b: (b["current_job"] or {}).get("progress_percent") == 49.31)
        ctx, cur = body["context"], body["current_job"]
        assert (ctx["current_status"], ctx["total_jobs_run"], ctx["successful_jobs"], ctx["failed_jobs"]) == \
            ("replicating", 2, 1, 0)
        assert (cur["id"], cur["current_operation"], cur["vma_throughput_mbps"], cur["vma_eta_seconds"]) == \
            (job2.job_id, "Transferring Data", 11.46, 1631)
        assert [j["id"] for j in body["job_history"]] == [job2.job_id, job1.job_id]  # newest first
        assert body["disks"][0]["change_id"] == f"52 3c ec 1b-{job1.job_id}/0"  # the last completed one's
        assert len(body["cbt_history"]) == 2

        await publish(bus, [job2.event("failed", error="VMA lost the connection")])
        body = await until(client, h, "pgtest1", lambda b: b["context"]["current_status"] == "failed")
        assert (body["context"]["total_jobs_run"], body["context"]["successful_jobs"],
                body["context"]["failed_jobs"]) == (2, 1, 1)
        assert body["current_job"]["error"] == "VMA lost the connection"


async def test_history_is_last_10_jobs_and_20_cbt_records(ctx_settings, bus):
    clock = Clock()
    jobs = [Job(clock, "bigvm", f"job-{i:02d}") for i in range(1, 13)]
    events = []
    for job in jobs:
        events += job.lifecycle(progress_steps=1)
    async with running(ctx_settings(), SERVICES) as client:
        h = await login(client)
        await publish(bus, events)
        body = await until(client, h, "bigvm", lambda b: b["context"]["successful_jobs"] == 12)
        assert body["context"]["total_jobs_run"] == 12
        assert [j["id"] for j in body["job_history"]] == [f"job-{i:02d}" for i in range(12, 2, -1)]
        assert body["current_job"]["id"] == "job-12"
        cbt = [(c["job_id"], c["unit_number"]) for c in body["cbt_history"]]
        assert cbt == [(f"job-{i:02d}", u) for i in range(12, 2, -1) for u in (0, 1)]


async def test_inventory_discovered_then_jobs(ctx_settings, bus):
    clock = Clock()
    async with running(ctx_settings(), SERVICES) as client:
        h = await login(client)
        await publish(bus, [discovered(clock, "newvm", cpus=4)])
        body = await until(client, h, "newvm", lambda b: True)
        ctx = body["context"]
        assert ctx["current_status"] == "discovered" and ctx["cpu_count"] == 4
        # The inventory's place and state, under the original GUI's names; no job yet.
        assert (ctx["vmware_vm_id"], ctx["vcenter_host"], ctx["os_type"], ctx["power_state"], ctx["last_job_at"]) == \
            ("vm-newvm", "vcenter.example.com", "rhel8_64Guest", "poweredOn", None)
        assert body["current_job"] is None and body["job_history"] == [] and body["cbt_history"] == []
        assert [(d["unit_number"], d["size_gb"]) for d in body["disks"]] == [(0, 40)]

        job = Job(clock, "newvm", "job-newvm-1", disks=1)
        await publish(bus, [job.event("created"), discovered(clock, "newvm", change="changed", cpus=8)])
        body = await until(client, h, "newvm", lambda b: b["context"]["cpu_count"] == 8)
        assert body["context"]["current_status"] == "queued"  # inventory never overrides a job's status
        # A job's VM (no guest OS, no power state) keeps what the inventory said.
        assert (body["context"]["os_type"], body["context"]["power_state"]) == ("rhel8_64Guest", "poweredOn")
        assert body["context"]["last_job_at"] is not None
        assert body["disks"][0]["export_name"] == "migration-vm-newvm-disk0"


# --- idempotency ------------------------------------------------------------------------------
async def test_duplicates_and_out_of_order_change_nothing(ctx_settings, bus):
    clock = Clock()
    job = Job(clock, "dupvm", "job-dup-1")
    events = job.lifecycle(progress_steps=3)
    async with running(ctx_settings(), SERVICES) as client:
        h = await login(client)
        await publish(bus, events)
        await until(client, h, "dupvm", lambda b: b["context"]["current_status"] == "completed")
        before = (await get_ctx(client, h, "dupvm")).content
        skipped = metric("oma_context_events_skipped_total", type="progressed")

        # Every event again (a redelivery), then old progress reports after the completion.
        await publish(bus, events, fresh_ids=True)
        await publish(bus, [events[4], events[3], events[0]], fresh_ids=True)
        marker = Job(clock, "markervm", "job-marker")  # processed after all of the above
        await publish(bus, [marker.event("created")])
        await until(client, h, "markervm", lambda b: True)

        assert (await get_ctx(client, h, "dupvm")).content == before
        assert metric("oma_context_events_skipped_total", type="progressed") - skipped == 5
        body = orjson.loads(before)
        assert (body["context"]["total_jobs_run"], body["context"]["successful_jobs"]) == (1, 1)
        assert len(body["cbt_history"]) == 2


async def test_malformed_event_is_dead_lettered_and_does_not_block(ctx_settings, bus):
    clock = Clock()
    failed0 = metric("oma_context_events_failed_total")
    dead0 = metric("oma_context_events_dead_lettered_total")
    settings = ctx_settings(contexts_max_deliver=3, contexts_nak_delay=0.2)
    async with running(settings, SERVICES) as client:
        h = await login(client)
        bad = {"event_id": "bad-1", "occurred_at": ts(clock.tick()), "job_id": "job-bad", "vm": {"name": "x"}}
        await bus.js.publish(Replication.EVT_PROGRESS, b"{not json", headers={"Nats-Msg-Id": "bad-0"})
        await publish(bus, [(Replication.EVT_PROGRESS, bad)])  # no seq, no status
        good = Job(clock, "goodvm", "job-good")
        await publish(bus, [good.event("created")])
        await until(client, h, "goodvm", lambda b: True, timeout=5)  # not held back by the bad ones

        async def dead():
            return metric("oma_context_events_dead_lettered_total") - dead0 == 2
        await wait_for(dead, timeout=15)
        assert metric("oma_context_events_failed_total") - failed0 == 6  # 2 events x max_deliver

        async def settled():
            info = await bus.js.consumer_info(EVENTS_STREAM, settings.contexts_consumer)
            return info.num_ack_pending == 0 and info.num_pending == 0
        await wait_for(settled, timeout=10)
        await asyncio.sleep(1.0)  # terminated: never delivered again
        assert metric("oma_context_events_failed_total") - failed0 == 6
        assert_error_shape(await get_ctx(client, h, "x"), 404)

        await publish(bus, [good.event("completed")])  # and the feed goes on
        await until(client, h, "goodvm", lambda b: b["context"]["successful_jobs"] == 1)


# --- rebuild, durable catch-up ----------------------------------------------------------------
async def test_rebuild_reproduces_every_context_byte_for_byte(ctx_settings, bus):
    clock = Clock()
    events = [discovered(clock, "inv-only"), discovered(clock, "vm-a")]
    for n, vm in enumerate(("vm-a", "vm-b", "vm-c")):
        for k in range(3):
            job = Job(clock, vm, f"job-{vm}-{k}")
            events += job.lifecycle(progress_steps=2, end="failed" if (n + k) % 3 == 0 else "completed")
    tail = Job(clock, "vm-a", "job-vm-a-live")
    events += [tail.event("created"), tail.event("progressed", status="replicating", progress_percent=12.5)]
    stale = [events[5], events[2]]  # re-sent later: skipped
    async with running(ctx_settings(), SERVICES) as client:
        h = await login(client)
        await publish(bus, events)
        await publish(bus, stale, fresh_ids=True)
        await until(client, h, "vm-a", lambda b: (b["current_job"] or {}).get("progress_percent") == 12.5)
        vms = ("inv-only", "vm-a", "vm-b", "vm-c")
        before = {vm: (await get_ctx(client, h, vm)).content for vm in vms}
        listing = (await client.get("/api/v1/vm-contexts", headers=h)).content

        result = await bus.call(Contexts.REBUILD, {}, timeout=60)
        assert result["events_applied"] == len(events) and result["seconds"] >= 0

        for vm in vms:
            assert (await get_ctx(client, h, vm)).content == before[vm], vm
        assert (await client.get("/api/v1/vm-contexts", headers=h)).content == listing


async def test_catch_up_after_restart_on_mariadb(ctx_settings, bus, mariadb_name):
    """Events published while the aggregator is down are applied after its restart (durable
    consumer, MariaDB read model); also runs the migrations on MariaDB."""
    clock = Clock()
    settings = ctx_settings(**mariadb_settings(mariadb_name))
    job1 = Job(clock, "durable-vm", "job-d-1")
    events = job1.lifecycle(progress_steps=2)
    async with running(settings, SERVICES) as client:
        h = await login(client)
        await publish(bus, events[:3])
        await until(client, h, "durable-vm", lambda b: b["context"]["current_status"] == "ready_for_sync")

    job2 = Job(clock, "durable-vm", "job-d-2")
    await publish(bus, events[3:] + [job2.event("created"), discovered(clock, "while-down")])
    info = await bus.js.consumer_info(EVENTS_STREAM, settings.contexts_consumer)
    assert info.num_pending == 5  # waiting in the stream for the durable consumer

    async with running(settings, SERVICES) as client:
        h = await login(client)
        body = await until(client, h, "durable-vm", lambda b: b["context"]["total_jobs_run"] == 2)
        assert (body["context"]["successful_jobs"], body["context"]["current_status"]) == (1, "queued")
        assert [j["id"] for j in body["job_history"]] == ["job-d-2", "job-d-1"]
        assert len(body["cbt_history"]) == 2
        await until(client, h, "while-down", lambda b: b["context"]["current_status"] == "discovered")

    # The migrations made the tables and the indexes the queries use.
    s = settings
    engine = create_async_engine(f"mysql+asyncmy://{s.db_user}:{s.db_pass}@{s.db_host}:{s.db_port}/{s.db_name}")
    try:
        async with engine.connect() as conn:
            def describe(sync_conn):
                i = sa_inspect(sync_conn)
                return ({t for t in i.get_table_names()},
                        {ix["name"] for ix in i.get_indexes("context_jobs")},
                        {c["name"]: getattr(c["type"], "fsp", None) for c in i.get_columns("vm_contexts")})
            tables, job_indexes, columns = await conn.run_sync(describe)
    finally:
        await engine.dispose()
    assert {"vm_contexts", "context_jobs", "context_disks", "cbt_history",
            "alembic_version_context_aggregator"} <= tables
    assert "ix_context_jobs_vm_created" in job_indexes
    assert columns["last_job_at"] == 3  # milliseconds kept: "newest first" stays exact


async def test_mariadb_detail_through_the_read_engine_follows_updates(ctx_settings, bus, mariadb_name):
    """On MariaDB (the aggregator's read engine, the reply caches): more jobs and CBT
    records than shown, text to escape, a job still running; a read after an update shows it."""
    clock = Clock()
    settings = ctx_settings(**mariadb_settings(mariadb_name))
    events = []
    for i in range(11):
        job = Job(clock, "many-jobs", f"job-mj-{i:02d}", rtype="incremental" if i else "initial")
        events += job.lifecycle(progress_steps=1)
    failing = Job(clock, "many-jobs", "job-mj-11")
    events += [failing.event("created"), failing.event("failed", error='disk "0" \\ gone\n\u00e9\u2603')]
    running_job = Job(clock, "many-jobs", "job-mj-12")
    events += [running_job.event("created"), running_job.event(
        "progressed", status="replicating", progress_percent=0.1 + 0.2, vma_throughput_mbps=7.0,
        current_operation="Transferring Data", started_at=ts(clock.now))]
    async with running(settings, SERVICES) as client:
        h = await login(client)
        await publish(bus, events)
        body = await until(client, h, "many-jobs", lambda b: b["context"]["total_jobs_run"] == 13)
        assert len(body["job_history"]) == 10 and len(body["cbt_history"]) == 20
        assert body["current_job"] == body["job_history"][0] and body["current_job"]["progress_percent"] == 0.1 + 0.2
        assert body["job_history"][1]["error"] == 'disk "0" \\ gone\n\u00e9\u2603'
        assert b'"vma_throughput_mbps":7.0' in (await get_ctx(client, h, "many-jobs")).content

        await publish(bus, [running_job.event("completed")])
        body = await until(client, h, "many-jobs", lambda b: b["current_job"]["status"] == "completed")
        assert body["context"]["successful_jobs"] == 12 and body["job_history"][0]["status"] == "completed"


async def test_read_engine_survives_a_killed_connection(mariadb_name):
    """The read engine has no ping at checkout: a pooled connection the server dropped (a restart,
    wait_timeout) costs one retry, not an error."""
    m = mariadb_settings(mariadb_name)
    main = create_async_engine(f"mysql+asyncmy://{m['db_user']}:{m['db_pass']}@{m['db_host']}:{m['db_port']}/"
                               + mariadb_name)
    reads = read_engine(main)

    async def one(conn, sql: str):
        return (await conn.execute(text(sql))).scalar()
    try:
        first = await read(reads, one, "SELECT CONNECTION_ID()")
        await mariadb_exec(f"KILL CONNECTION {first}")
        second = await read(reads, one, "SELECT CONNECTION_ID()")
        assert second != first
    finally:
        await reads.dispose()
        await main.dispose()


async def test_fresh_database_under_an_old_consumer_replays(ctx_settings, bus):
    """Memory mode forgets the model on restart while the durable consumer remembers its acks:
    start-up notices and replays instead of showing an empty model."""
    clock = Clock()
    settings = ctx_settings()
    job = Job(clock, "memvm", "job-mem-1")
    async with running(settings, SERVICES) as client:
        h = await login(client)
        await publish(bus, job.lifecycle(progress_steps=1))
        first = await until(client, h, "memvm", lambda b: b["context"]["successful_jobs"] == 1)
    async with running(settings, SERVICES) as client:
        h = await login(client)
        assert await until(client, h, "memvm", lambda b: True) == first


# --- the list -----------------------------------------------------------------------------------
async def test_list_filters_and_pagination(ctx_settings, bus):
    clock = Clock()
    events = [discovered(clock, f"d-{i:02d}") for i in range(5)]
    for i in range(10):
        job = Job(clock, f"r-{i:02d}", f"job-r-{i}")
        events += [job.event("created"), job.event("progressed", status="replicating", progress_percent=10.0 + i,
                                                   current_operation="Transferring Data")]
    for i in range(10):
        events += Job(clock, f"c-{i:02d}", f"job-c-{i}").lifecycle(progress_steps=1)
    async with running(ctx_settings(), SERVICES) as client:
        h = await login(client)
        await publish(bus, events)

        async def all_in():
            r = await client.get("/api/v1/vm-contexts", params={"status": "completed"}, headers=h)
            return r.json()["total"] == 10
        await wait_for(all_in, timeout=15)

        r = await client.get("/api/v1/vm-contexts", headers=h)
        body = r.json()
        assert r.status_code == 200 and body["success"] is True
        assert (body["total"], body["limit"], body["offset"], len(body["vm_contexts"])) == (25, 100, 0, 25)
        names = [c["vm_name"] for c in body["vm_contexts"]]
        assert names == sorted(names)
        row = next(c for c in body["vm_contexts"] if c["vm_name"] == "r-03")
        assert {"context_id", "vm_name", "current_status", "total_jobs_run", "successful_jobs", "failed_jobs",
                "current_operation", "progress_percent", "cpu_count", "memory_mb", "datacenter",
                "current_job_id", "last_job_at", "updated_at"} <= set(row)
        assert (row["current_status"], row["current_operation"], row["progress_percent"]) == \
            ("replicating", "Transferring Data", 13.0)

        disc = (await client.get("/api/v1/vm-contexts", params={"status": "discovered"}, headers=h)).json()
        assert disc["total"] == 5 and [c["vm_name"] for c in disc["vm_contexts"]] == [f"d-{i:02d}" for i in range(5)]
        assert all(c["current_operation"] is None and c["total_jobs_run"] == 0 for c in disc["vm_contexts"])

        pages = []
        for offset in (0, 10, 20):
            page = (await client.get("/api/v1/vm-contexts", params={"limit": 10, "offset": offset},
                                     headers=h)).json()
            assert page["total"] == 25 and (page["limit"], page["offset"]) == (10, offset)
            pages += [c["vm_name"] for c in page["vm_contexts"]]
        assert pages == names
        page = (await client.get("/api/v1/vm-contexts", params={"status": "replicating", "limit": 3, "offset": 8},
                                 headers=h)).json()
        assert page["total"] == 10 and [c["vm_name"] for c in page["vm_contexts"]] == ["r-08", "r-09"]
        assert (await client.get("/api/v1/vm-contexts", params={"status": "nope"}, headers=h)).json()["total"] == 0

        assert_error_shape(await client.get("/api/v1/vm-contexts", params={"limit": 0}, headers=h), 400)
        assert_error_shape(await client.get("/api/v1/vm-contexts"), 401)
        assert metric("oma_vm_contexts") >= 25


async def test_unknown_vm_is_404_in_the_seed_shape(ctx_settings, bus):
    async with running(ctx_settings(), SERVICES) as client:
        h = await login(client)
        body = assert_error_shape(await get_ctx(client, h, "no-such-vm"), 404)
        assert body["error"] == "VM context not found" and "no-such-vm" in body["details"]
        assert_error_shape(await client.get("/api/v1/vm-contexts/no-such-vm/events", headers=h), 404)
        with pytest.raises(errors.BadRequest):
            await bus.call(Contexts.GET, {"vm_name": ""})


# --- live updates: core NATS -> the gateway's SSE route -----------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.asynccontextmanager
async def served(app):
    """The app on a real server: httpx's in-process transport buffers whole responses."""
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, lifespan="off", log_config=None))
    serving = asyncio.create_task(server.serve())
    try:
        await wait_for(lambda: asyncio.sleep(0, server.started), timeout=10)
        yield port
    finally:
        server.should_exit = True
        await serving


def sse_events(text: str) -> tuple[list[tuple[str, Any]], str]:
    """The complete events in `text` as (event, JSON data), comments skipped; and the rest."""
    *frames, rest = text.split("\n\n")
    events = []
    for frame in frames:
        lines = dict(line.split(": ", 1) for line in frame.splitlines() if not line.startswith(":"))
        if lines:
            events.append((lines["event"], orjson.loads(lines["data"])))
    return events, rest


async def test_sse_stream_sends_the_update(ctx_settings, bus):
    clock = Clock()
    job = Job(clock, "ssevm", "job-sse-1")
    async with running(ctx_settings(), SERVICES) as client:
        h = await login(client)
        await publish(bus, [job.event("created")])
        await until(client, h, "ssevm", lambda b: True)

        async with served(client.app) as port:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=15) as http:
                async with http.stream("GET", "/api/v1/vm-contexts/ssevm/events", headers=h) as r:
                    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
                    frames = r.aiter_text()
                    buf, got = "", []

                    async def next_event() -> tuple[str, dict[str, Any]]:
                        nonlocal buf
                        while not got:
                            buf += await asyncio.wait_for(anext(frames), timeout=10)
                            events, buf = sse_events(buf)
                            got.extend(events)
                        return got.pop(0)

                    kind, first = await next_event()
                    assert kind == "context" and first["current_job"]["status"] == "queued"
                    await publish(bus, [job.event("progressed", status="replicating", progress_percent=33.3,
                                                  current_operation="Transferring Data")])
                    # The `created` batch's own update may still be on its way: it comes first then.
                    kind, update = await next_event()
                    while kind == "update" and update["context"]["current_job"]["progress_percent"] == 0:
                        kind, update = await next_event()
                    assert kind == "update" and update["vm_name"] == "ssevm"
                    assert update["context"]["current_job"]["progress_percent"] == 33.3
                    assert update["context"] == (await get_ctx(client, h, "ssevm")).json()


async def test_sse_slow_client_gets_a_resync_not_a_gap(ctx_settings, bus):
    """A client that stops reading while updates pour in: the server's buffers and its queue fill,
    the rest are dropped, and the client then reads every queued update in order, `resync` with the
    VM's whole context (never a silent gap), and the updates after it."""
    clock = Clock()
    job = Job(clock, "slowvm", "job-slow-1")
    resyncs = metric("oma_sse_resyncs_total", route="/api/v1/vm-contexts/{vm_name:path}/events")
    async with running(ctx_settings(), SERVICES) as client:
        h = await login(client)
        await publish(bus, [job.event("created")])
        await until(client, h, "slowvm", lambda b: True)
        async with served(client.app) as port:
            # A raw socket with a small receive buffer: the client's reading is ours to stop.
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
            reader, writer = await asyncio.open_connection(sock=sock, limit=4096)
            subscribed = len(client.app.state.bus.nc._subs)
            conn = h11.Connection(h11.CLIENT)
            writer.write(conn.send(h11.Request(method="GET", target="/api/v1/vm-contexts/slowvm/events",
                                               headers=[("Host", "oma"), ("Authorization", h["Authorization"])])))
            writer.write(conn.send(h11.EndOfMessage()))
            text, events = "", []

            async def read_until(done) -> None:
                nonlocal text
                while not done():
                    conn.receive_data(await asyncio.wait_for(reader.read(65536), timeout=15))
                    while (event := conn.next_event()) not in (h11.NEED_DATA, h11.PAUSED):
                        if isinstance(event, h11.Response):
                            assert event.status_code == 200
                        elif isinstance(event, h11.Data):
                            text += event.data.decode()
                            new, text = sse_events(text)
                            events.extend(new)

            await read_until(lambda: events)
            assert events[0][0] == "context"

            # Stop reading; 8 KiB updates fill the socket buffers, then the route's queue.
            pad = "x" * 8192
            sent = 0
            while metric("oma_sse_resyncs_total", route="/api/v1/vm-contexts/{vm_name:path}/events") == resyncs:
                assert sent < 5000, "the client never fell behind"
                for _ in range(50):
                    await bus.nc.publish(Contexts.EVT_UPDATED, orjson.dumps(
                        {"vm_name": "slowvm", "context": {"seq": sent, "pad": pad}}))
                    sent += 1
                await bus.nc.flush()
                await asyncio.sleep(0.05)

            await read_until(lambda: any(kind == "resync" for kind, _ in events))
            kinds = [kind for kind, _ in events]
            at = kinds.index("resync")
            seqs = [data["context"]["seq"] for kind, data in events[1:at]]
            assert kinds[1:at] == ["update"] * len(seqs) and seqs == list(range(len(seqs)))  # in order, no gap
            assert len(seqs) < sent  # some were dropped: the resync stands for them
            assert events[at][1] == (await get_ctx(client, h, "slowvm")).json()  # the whole context, fresh
            # Updates flow again after the resync.
            await bus.nc.publish(Contexts.EVT_UPDATED, orjson.dumps({"vm_name": "slowvm", "context": {"seq": -1}}))
            await read_until(lambda: any(kind == "update" and data["context"]["seq"] == -1
                                         for kind, data in events[at:]))
            writer.close()
            # The stream's subscription ends with it (nats-py has no public count of them).
            gateway_nc = client.app.state.bus.nc
            await wait_for(lambda: asyncio.sleep(0, subscribed == len(gateway_nc._subs)), timeout=10)
