"""VM-context read model at scale (a script, not a test).

    python bench/bench_contexts.py [--vms 10000] [--jobs-per-vm 20] [--requests 1000] [--events 200000]

1. Read latency: a fresh MariaDB database, `oma-api -db-type mariadb` as a subprocess (real uvicorn
   gateway, every service, its own nats-server started here), then 10,000 VMs and 200,000 jobs
   (plus 2 disks per VM and 2 CBT records per completed job) bulk-inserted straight into the read
   model. Sequential GETs with keep-alive, one client: `GET /api/v1/vm-contexts?limit=100` (first
   page, a filtered page, the last page) and `GET /api/v1/vm-contexts/{vm_name}` of random VMs;
   prints p50/p99 (target p99 < 50 ms).
2. Apply rate: publishes --events replication events (10 per job, 2 jobs per VM) to OMA_EVENTS,
   times the live durable consumer until it has acked them all, then times REBUILD (wipe + replay
   of the whole stream) and prints events/s for both.

The database is dropped at the end. Needs MariaDB on 127.0.0.1:3306 (root, no password; or the
OMA_TEST_DB_* variables).
"""
from __future__ import annotations

import argparse
import asyncio
import random
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime, timedelta
from pathlib import Path

import httpx
import nats

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from oma.services.context_aggregator.models import CbtRecord, ContextDisk, ContextJob, VmContext  # noqa: E402
from oma.shared.bus import Bus  # noqa: E402
from oma.shared.natsserver import EmbeddedNats  # noqa: E402
from oma.shared.subjects import EVENTS_STREAM, Contexts, Replication  # noqa: E402
from tests.mariadbutil import MARIADB, mariadb_exec  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
from common import TOKEN, start_oma_api  # noqa: E402

T0 = datetime(2025, 1, 1)
STATUSES = ("completed",) * 8 + ("failed", "replicating")


def start_api(db_name: str, nats_url: str) -> tuple[subprocess.Popen, str]:
    proc, base, _ = start_oma_api("-db-type", "mariadb", "-db-host", MARIADB["host"], "-db-port", str(MARIADB["port"]),
                                  "-db-name", db_name, "-db-user", MARIADB["user"], "-nats-url", nats_url,
                                  env={"OMA_APPLIANCE_TOKENS": f"test-vma={TOKEN}", "OMA_DB_PASS": MARIADB["password"]})
    return proc, base


async def bulk_insert(db_name: str, vms: int, jobs_per_vm: int) -> float:
    """Rows as the aggregator would have written them, inserted in multi-row batches."""
    from sqlalchemy import insert
    from sqlalchemy.ext.asyncio import create_async_engine

    started = time.perf_counter()
    engine = create_async_engine(f"mysql+asyncmy://{MARIADB['user']}:{MARIADB['password']}@{MARIADB['host']}:{MARIADB['port']}/{db_name}")
    contexts, jobs, disks, cbt = [], [], [], []
    for v in range(vms):
        name = f"bench-vm-{v:05d}"
        done = failed = 0
        for j in range(jobs_per_vm):
            created = T0 + timedelta(minutes=v * jobs_per_vm + j)
            status = "replicating" if j == jobs_per_vm - 1 else STATUSES[j % 9]
            done += status == "completed"
            failed += status == "failed"
            job_id = f"job-{v:05d}-{j:03d}"
            jobs.append(dict(job_id=job_id, vm_name=name, status=status, replication_type="incremental" if j else "initial",
                             progress_percent=100.0 if status == "completed" else 42.5,
                             current_operation="Transferring Data", vma_throughput_mbps=11.46, vma_eta_seconds=1631,
                             bytes_transferred=21181880320, total_bytes=42949672960, error=None,
                             counted_outcome=status if status in ("completed", "failed") else None,
                             created_at=created, started_at=created, updated_at=created + timedelta(seconds=30),
                             completed_at=created + timedelta(seconds=30) if status != "replicating" else None,
                             last_seq=10))
            if status == "completed":
                cbt += [dict(vm_name=name, job_id=job_id, unit_number=u, change_id=f"52 3c ec 1b/{v}-{j}-{u}",
                             recorded_at=created + timedelta(seconds=30)) for u in (0, 1)]
        last = T0 + timedelta(minutes=v * jobs_per_vm + jobs_per_vm - 1)
        contexts.append(dict(context_id=f"ctx-{name}-20250101-000000", vm_name=name, vmware_vm_id=f"vm-{v}",
                             vm_uuid=str(uuid.UUID(int=v)), path=f"/DC/vm/{name}", datacenter="DC", cpu_count=2,
                             memory_mb=4096, current_status="replicating", current_job_id=jobs[-1]["job_id"],
                             total_jobs_run=jobs_per_vm, successful_jobs=done, failed_jobs=failed,
                             last_job_at=last, created_at=T0, updated_at=last))
        disks += [dict(vm_name=name, unit_number=u, disk_id=f"disk-{u}", path=f"[ds1] {name}/{name}_{u}.vmdk",
                       size_gb=40, capacity_bytes=42949672960, datastore="ds1", volume_id=f"vol-{v}-{u}",
                       device_path=f"/dev/vd{'bc'[u]}", export_name=f"migration-vm-{v}-disk{u}",
                       change_id=f"52 3c ec 1b/{v}-{u}") for u in (0, 1)]
    try:
        async with engine.begin() as conn:
            for model, rows in ((VmContext, contexts), (ContextJob, jobs), (ContextDisk, disks), (CbtRecord, cbt)):
                for i in range(0, len(rows), 5000):
                    await conn.execute(insert(model.__table__), rows[i:i + 5000])
    finally:
        await engine.dispose()
    print(f"inserted {len(contexts)} contexts, {len(jobs)} jobs, {len(disks)} disks, {len(cbt)} CBT records "
          f"in {time.perf_counter() - started:.1f}s")
    return time.perf_counter() - started


def pct(values: list[float], p: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(p) - 1] if p < 100 else max(values)


async def measure(client: httpx.AsyncClient, label: str, paths: list[str]) -> None:
    for path in paths[:20]:  # warm-up
        assert (await client.get(path)).status_code == 200, path
    times = []
    for path in paths:
        t = time.perf_counter()
        r = await client.get(path)
        times.append((time.perf_counter() - t) * 1000)
        assert r.status_code == 200, (path, r.status_code, r.text[:200])
    print(f"{label:<44} n={len(times):<5} p50={pct(times, 50):6.2f} ms  p99={pct(times, 99):6.2f} ms  "
          f"max={max(times):6.2f} ms")


def job_events(v: int, j: int, clock: datetime) -> list[tuple[str, dict]]:
    vm = {"id": f"vm-e{v}", "uuid": str(uuid.UUID(int=v)), "name": f"evt-vm-{v:05d}", "path": f"/DC/vm/evt-{v}",
          "datacenter": "DC", "cpus": 2, "memory_mb": 4096}
    job_id = f"job-e{v:05d}-{j}"
    disks = [{"unit_number": u, "disk_id": f"disk-{u}", "path": f"[ds1] evt-{v}_{u}.vmdk", "size_gb": 40,
              "capacity_bytes": 42949672960, "datastore": "ds1", "volume_id": f"vol-{v}-{j}-{u}",
              "device_path": f"/dev/vd{'bc'[u]}", "export_name": f"migration-vm-{v}-disk{u}", "change_id": None}
             for u in (0, 1)]
    steps = ([(Replication.EVT_CREATED, "queued", 0.0), (Replication.EVT_STATUS, "provisioning", 0.0),
              (Replication.EVT_STATUS, "ready_for_sync", 0.0)]
             + [(Replication.EVT_PROGRESS, "replicating", 15.0 * k) for k in range(1, 7)]
             + [(Replication.EVT_COMPLETED, "completed", 100.0)])
    out = []
    for seq, (subject, status, progress) in enumerate(steps, 1):
        at = clock + timedelta(seconds=seq)
        if status == "completed":
            disks = [{**d, "change_id": f"52 3c/{v}-{j}-{d['unit_number']}"} for d in disks]
        out.append((subject, {
            "event_id": f"{job_id}-{seq}", "occurred_at": at.strftime("%Y-%m-%dT%H:%M:%S.000Z"), "job_id": job_id,
            "seq": seq, "vm": vm, "replication_type": "initial" if j == 0 else "incremental", "status": status,
            "progress_percent": progress, "current_operation": "Transferring Data", "vma_throughput_mbps": 11.46,
            "vma_eta_seconds": 100, "bytes_transferred": int(42949672960 * progress / 100),
            "total_bytes": 42949672960, "created_at": clock.strftime("%Y-%m-%dT%H:%M:%S.000Z"),
            "completed_at": at.strftime("%Y-%m-%dT%H:%M:%S.000Z") if status == "completed" else None,
            "error": None, "disks": disks}))
    return out


async def apply_rate(nats_url: str, n_events: int) -> None:
    nc = await nats.connect(nats_url)
    bus = Bus(nc)
    try:
        events: list[tuple[str, dict]] = []
        v = 0
        while len(events) < n_events:  # two jobs per VM, 10 events per job
            for j in (0, 1):
                events += job_events(v, j, T0 + timedelta(hours=v, minutes=10 * j))
            v += 1
        events = events[:n_events]
        started = time.perf_counter()
        for i in range(0, len(events), 1000):  # concurrent publishes, JetStream acks awaited per chunk
            await asyncio.gather(*(bus.publish_event(s, p, msg_id=p["event_id"]) for s, p in events[i:i + 1000]))
        published = time.perf_counter() - started
        print(f"published {len(events)} events ({v} VMs) in {published:.1f}s ({len(events) / published:,.0f}/s)")

        while True:  # the live durable consumer has been applying since the first publish
            info = await bus.js.consumer_info(EVENTS_STREAM, "context_aggregator-readmodel")
            if info.num_pending == 0 and info.num_ack_pending == 0:
                break
            await asyncio.sleep(0.2)
        live = time.perf_counter() - started
        print(f"live consumer applied {len(events)} events in {live:.1f}s from the first publish "
              f"({len(events) / live:,.0f} events/s, publishing included)")

        result = await bus.call(Contexts.REBUILD, {}, timeout=3600)
        print(f"REBUILD (wipe + replay): {result['events_applied']} events applied in {result['seconds']:.1f}s "
              f"({result['events_applied'] / result['seconds']:,.0f} events/s), failed={result['events_failed']}")
    finally:
        await nc.drain()


@asynccontextmanager
async def seeded_api(vms: int, jobs_per_vm: int) -> AsyncIterator[tuple[str, str, str]]:
    """A fresh MariaDB database holding `vms` VMs' contexts, its own nats-server and `oma-api` on
    them as a subprocess: yields the API's base URL, the NATS URL and the database's name; all
    stopped and dropped afterwards."""
    db_name = f"oma_bench_{uuid.uuid4().hex[:8]}"
    await mariadb_exec(f"CREATE DATABASE `{db_name}`")
    server = EmbeddedNats()
    nats_url = await server.start()
    proc = None
    try:
        proc, base = start_api(db_name, nats_url)
        await bulk_insert(db_name, vms, jobs_per_vm)
        yield base, nats_url, db_name
    finally:  # end oma-api (SIGTERM, then kill), the benchmark's nats-server, and drop its database
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        await server.stop()
        await mariadb_exec(f"DROP DATABASE IF EXISTS `{db_name}`")


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vms", type=int, default=10_000)
    ap.add_argument("--jobs-per-vm", type=int, default=20)
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--events", type=int, default=200_000)
    args = ap.parse_args()

    async with seeded_api(args.vms, args.jobs_per_vm) as (base, nats_url, db_name):
        async with httpx.AsyncClient(base_url=base, timeout=30) as client:
            r = await client.post("/api/v1/auth/login", json={"appliance_id": "test-vma", "token": TOKEN})
            client.headers["Authorization"] = f"Bearer {r.json()['session_token']}"
            n, rnd = args.requests, random.Random(7)
            print(f"gateway: oma-api subprocess (uvicorn) at {base}, MariaDB {MARIADB['host']}:{MARIADB['port']}/{db_name}")
            await measure(client, "GET /api/v1/vm-contexts?limit=100", ["/api/v1/vm-contexts?limit=100"] * n)
            await measure(client, "GET /api/v1/vm-contexts?status=..&limit=100",
                          ["/api/v1/vm-contexts?status=replicating&limit=100&offset=5000"] * n)
            await measure(client, "GET /api/v1/vm-contexts?limit=100&offset=9900",
                          [f"/api/v1/vm-contexts?limit=100&offset={args.vms - 100}"] * n)
            await measure(client, "GET /api/v1/vm-contexts/{vm_name} (random VM)",
                          [f"/api/v1/vm-contexts/bench-vm-{rnd.randrange(args.vms):05d}" for _ in range(n)])
        if args.events:
            await apply_rate(nats_url, args.events)

if __name__ == "__main__":
    asyncio.run(main())
