"""Benchmark: inventory discovery end to end vs. a bare pyvmomi read, and listing latency.

    python bench/bench_inventory.py [--repeat 3] [--requests 500] [--store-vms 10000]

1. Starts vcsim with 1,000 VMs (tests.vcsim.THOUSAND_VMS), the auth and inventory services on
   MariaDB (a fresh database on 127.0.0.1:3306, dropped afterwards; OMA_TEST_DB_* override) and
   the gateway in-process, and times `GET /api/v1/vms/discover` (first discovery: 1,000 new VMs;
   then re-discoveries: all unchanged) against `bare_property_read` of the same VMs, interleaved,
   best of N. Target: discovery <= 1.5x the bare read.
2. Times the store step alone (`service.upsert` of the 1,000 discovered VMs: all new, then all
   changed) against the same bare read. Target: <= 0.5x.
3. Stores `--store-vms` more VMs (copies of the discovered ones under another vCenter) and
   measures `GET /api/v1/vms?limit=100` p50/p99 through the gateway. Target: p99 < 50 ms.
"""
from __future__ import annotations

import argparse
import asyncio
import copy
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx

from bench.bench_vsphere_raw import bare_property_read
from oma.services.inventory import service
from oma.shared.natsserver import EmbeddedNats
from oma.shared.settings import Settings
from tests.mariadbutil import mariadb_exec, mariadb_settings
from tests.vcsim import THOUSAND_VMS, running_vcsim

TOKEN = "vma_bench_token_0123456789abcdef0123456789"


def copies(vms: list[dict], count: int) -> list[dict]:
    """`count` distinct VMs made from the discovered ones (new moref, UUID and name)."""
    out = []
    for i in range(count):
        vm = copy.deepcopy(vms[i % len(vms)])
        vm.update(id=f"vm-{100000 + i}", uuid=str(uuid.uuid4()), bios_uuid=str(uuid.uuid4()),
                  name=f"{vm['name']}-{i:05d}")
        out.append(vm)
    return out


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


async def run(args: argparse.Namespace) -> None:
    from oma.services.gateway.app import create_app
    from oma.runner import Appliance

    db_name = f"oma_bench_{uuid.uuid4().hex[:8]}"
    await mariadb_exec(f"CREATE DATABASE `{db_name}`")
    nats = EmbeddedNats()
    settings = Settings(nats_url=await nats.start(), data_dir=Path(tempfile.mkdtemp(prefix="oma-bench-")),
                        appliance_tokens=f"bench={TOKEN}", **mariadb_settings(db_name))
    try:
        with running_vcsim(THOUSAND_VMS) as sim:
            async with Appliance(settings, ("auth", "inventory")) as appliance:
                app = create_app(settings, appliance.nats_url)
                async with app.router.lifespan_context(app):
                    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://oma",
                                                 timeout=600) as client:
                        await bench(args, sim, appliance.services["inventory"], client)
    finally:
        await nats.stop()
        await mariadb_exec(f"DROP DATABASE IF EXISTS `{db_name}`")


async def bench(args: argparse.Namespace, sim, inv, client: httpx.AsyncClient) -> None:
    r = await client.post("/api/v1/auth/login", json={"appliance_id": "bench", "token": TOKEN, "version": "1.0.0"})
    h = {"Authorization": f"Bearer {r.json()['session_token']}"}
    r = await client.post("/api/v1/vcenter/config", headers=h, json={"action": "create", "configuration": {
        "host": sim.host, "port": sim.port, "username": sim.username, "password": sim.password, "verify_tls": False}})
    assert r.status_code == 201, r.text

    async def discover() -> tuple[float, dict, int]:
        started = time.perf_counter()
        r = await client.get("/api/v1/vms/discover", params={"vcenter": sim.host}, headers=h)
        assert r.status_code == 200, r.text
        return time.perf_counter() - started, r.json(), len(r.content)

    bares, discs = [], []
    for i in range(args.repeat + 1):  # interleaved, so drift hits both alike; run 0 is the first discovery
        bares.append(await asyncio.to_thread(bare_property_read, sim.host, sim.port, sim.username, sim.password))
        seconds, body, size = await discover()
        discs.append((seconds, body["summary"], size))
    bare = min(b["seconds"] for b in bares)
    first, first_summary, first_size = discs[0]
    again = min(d[0] for d in discs[1:])
    print(f"vcsim flags: {THOUSAND_VMS}; database: MariaDB; gateway in-process (ASGI)")
    print(f"bare PropertyCollector read (best of {len(bares)})   : {bare:.2f} s ({bares[0]['vm_count']} VMs)")
    print(f"discovery, first (1,000 new)             : {first:.2f} s = {first / bare:.2f}x bare  "
          f"summary {first_summary}, reply {first_size / 1e6:.2f} MB")
    print(f"re-discovery, all unchanged (best of {args.repeat})  : {again:.2f} s = {again / bare:.2f}x bare")

    # The store step alone, on the same database (another vCenter key, so nothing collides).
    from oma.plugins.vsphere.source import VSphereSource
    vms = await VSphereSource(sim.connection()).discover()
    changed = [{**vm, "cpus": (vm["cpus"] or 0) + 1} for vm in vms]
    for label, data in (("all new", vms), ("all changed", changed), ("all unchanged", changed)):
        started = time.perf_counter()
        async with inv.sessions.begin() as db:
            res = await service.upsert(db, "store-bench", data)
        seconds = time.perf_counter() - started
        print(f"store only, 1,000 VMs {label:<14}: {seconds:.3f} s = {seconds / bare:.2f}x bare  "
              f"(new {res.count('new')}, changed {res.count('changed')}, unchanged {res.count('unchanged')})")

    # 10,000 more VMs in the store, then the listing's latency through the gateway.
    started = time.perf_counter()
    async with inv.sessions.begin() as db:
        await service.upsert(db, "list-bench", copies(vms, args.store_vms))
    print(f"stored {args.store_vms} more VMs in {time.perf_counter() - started:.2f} s")
    r = await client.get("/api/v1/vms", params={"limit": 100}, headers=h)
    total = r.json()["total"]
    for _ in range(20):  # warm-up: connection pool, caches
        await client.get("/api/v1/vms", params={"limit": 100}, headers=h)
    times = []
    for i in range(args.requests):
        started = time.perf_counter()
        r = await client.get("/api/v1/vms", params={"limit": 100, "offset": (i * 100) % total}, headers=h)
        times.append(time.perf_counter() - started)
        assert r.status_code == 200 and len(r.json()["vms"]) > 0
    print(f"GET /api/v1/vms?limit=100 over {total} VMs, {args.requests} requests (offsets across the list): "
          f"p50 {statistics.median(times) * 1000:.1f} ms, p99 {pct(times, 0.99) * 1000:.1f} ms, "
          f"max {max(times) * 1000:.1f} ms")
    times = []
    for _ in range(args.requests):
        started = time.perf_counter()
        r = await client.get("/api/v1/vms", params={"limit": 100}, headers=h)
        times.append(time.perf_counter() - started)
    print(f"GET /api/v1/vms?limit=100 (first page), {args.requests} requests: "
          f"p50 {statistics.median(times) * 1000:.1f} ms, p99 {pct(times, 0.99) * 1000:.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="re-discoveries (and bare reads); the best is reported")
    parser.add_argument("--requests", type=int, default=500, help="listing requests timed")
    parser.add_argument("--store-vms", type=int, default=10_000, help="VMs added to the store for the listing")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
