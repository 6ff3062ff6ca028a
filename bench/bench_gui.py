"""The operator GUI at scale (a script, not a test).

    python bench/bench_gui.py [--vms 10000] [--requests 200] [--live-vms 100] [--seconds 10] [--rate 5]

1. Page time: a fresh MariaDB database, `oma-api -db-type mariadb` as a subprocess (real uvicorn
   gateway, every service, its own nats-server started here), --vms VMs with 2 jobs each inserted
   into the read model (bench_contexts.bulk_insert), an operator from `oma-admin user add`, signed
   in through /ui/login. Sequential GETs, one client: the dashboard's first page (the service's own
   paging), a status-filtered page, a name filter and a sort by progress (both read the whole list
   in the gateway), each warm and with the gateway's copy of the context replies dropped before
   each request; prints the client's p50/p99 and the server's split from Server-Timing (session
   check, bus reads, template) (target: first page < 300 ms server time).
2. Live stream: one /ui/events stream watching --live-vms VMs while --rate context updates per VM
   per second are published for --seconds on the live subject; prints the updates received per VM
   per second (target: at most 1), the gaps between two updates of one VM as the client saw them,
   and whether every VM's last update arrived (the stream did not fall behind).

The set-up is bench_contexts.seeded_api's (MariaDB as there, the database dropped at the end).
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import nats
import orjson

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH.parent), str(BENCH)]

from bench_contexts import measure, pct, seeded_api  # noqa: E402

from oma.services.gateway.ui.render import vm_key  # noqa: E402
from oma.shared.subjects import Contexts  # noqa: E402
from tests.mariadbutil import MARIADB  # noqa: E402

PASSWORD = "bench operator password"


def add_operator(db_name: str) -> None:
    flags = ["-db-type", "mariadb", "-db-host", MARIADB["host"], "-db-port", str(MARIADB["port"]), "-db-name", db_name,
             "-db-user", MARIADB["user"]]
    r = subprocess.run(["oma-admin", *flags, "user", "add", "bench", "--role", "operator"], input=PASSWORD + "\n",
                       capture_output=True, text=True, env={**os.environ, "OMA_DB_PASS": MARIADB["password"]}, timeout=120)
    if r.returncode:
        raise SystemExit(f"oma-admin user add failed: {r.stderr}")


async def sign_in(client: httpx.AsyncClient) -> None:
    page = await client.get("/ui/login")
    token = re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)
    r = await client.post("/ui/login", data={"username": "bench", "password": PASSWORD, "csrf_token": token})
    if r.status_code != 303:
        raise SystemExit(f"sign-in failed: {r.status_code} {r.text[:200]}")


def context(vm: str, pct: float) -> dict:
    job = {"id": f"job-{vm}", "status": "replicating", "replication_type": "initial", "progress_percent": pct,
           "current_operation": "Transferring Data", "vma_throughput_mbps": 180.0, "vma_eta_seconds": 240,
           "bytes_transferred": 0, "total_bytes": 0, "error": None, "created_at": None, "started_at": None,
           "completed_at": None, "updated_at": None}
    return {"context": {"vm_name": vm, "current_status": "replicating"}, "current_job": job, "job_history": [job],
            "disks": [], "cbt_history": []}


async def dashboard(client: httpx.AsyncClient, nc: nats.NATS, label: str, path: str, n: int, cold: bool) -> None:
    """Sequential GETs of one dashboard view: the client's time and the server's own split
    (Server-Timing: session check, bus reads, template). `cold`: a change notification drops the
    gateway's copy of the context replies before each request, as a running migration does (the
    aggregator still answers from its own cache); warm is a page read again with nothing changed."""
    total: list[float] = []
    split: dict[str, list[float]] = collections.defaultdict(list)
    for i in range(n + 10):
        if cold:
            await nc.publish(Contexts.EVT_CHANGED, orjson.dumps({"vm_names": None}))
            await nc.flush()
            await asyncio.sleep(0.005)  # the gateway has handled it
        t = time.perf_counter()
        r = await client.get(path)
        elapsed = (time.perf_counter() - t) * 1000
        assert r.status_code == 200, r.text[:200]
        if i < 10:
            continue  # warm-up
        total.append(elapsed)
        for name, ms in re.findall(r"(\w+);dur=([\d.]+)", r.headers["server-timing"]):
            split[name].append(float(ms))
    parts = ", ".join(f"{k} {pct(v, 50):.1f}/{pct(v, 99):.1f}" for k, v in split.items())
    print(f"{label + (' (cold)' if cold else ' (warm)'):<48} n={n:<4} client p50/p99 {pct(total, 50):6.1f}/"
          f"{pct(total, 99):6.1f} ms; server p50/p99: {parts} ms")


async def page_times(client: httpx.AsyncClient, nats_url: str, n: int, vms: int) -> None:
    nc = await nats.connect(nats_url)
    try:
        for label, path, count in (
                ("GET /ui/ (first page, 25 VMs)", "/ui/", n),
                ("GET /ui/?status=replicating&page=100", "/ui/?status=replicating&page=100", n),
                ("GET /ui/?size=100", "/ui/?size=100", n),
                ("GET /ui/?q=bench-vm-09 (whole list read)", "/ui/?q=bench-vm-09", max(25, n // 10)),
                ("GET /ui/?sort=-progress (whole list read)", "/ui/?sort=-progress", max(25, n // 10))):
            for cold in (False, True):
                await dashboard(client, nc, label, path, count, cold)
    finally:
        await nc.close()
    await measure(client, "GET /ui/vms/{name}", [f"/ui/vms/bench-vm-{vms // 2:05d}"] * n)


async def live_stream(base: str, cookies: httpx.Cookies, nats_url: str, n_vms: int, seconds: float,
                      rate: float) -> None:
    vms = [f"live-vm-{i:03d}" for i in range(n_vms)]
    keys = {vm_key(v): v for v in vms}
    arrivals: dict[str, list[float]] = collections.defaultdict(list)
    last_value: dict[str, str] = {}
    received = 0
    started = time.monotonic()

    async def read() -> None:
        nonlocal received
        params = [("vm", v) for v in vms]
        async with httpx.AsyncClient(base_url=base, cookies=cookies, timeout=None) as c:
            async with c.stream("GET", "/ui/events", params=params) as r:
                event = None
                async for line in r.aiter_lines():
                    if line.startswith("event: "):
                        event = line[7:]
                    elif line.startswith("data: ") and event and event.endswith("-progress"):
                        # an event's first data line (a fragment spans several)
                        vm, event = keys[event[:-len("-progress")]], None
                        arrivals[vm].append(time.monotonic())
                        m = re.search(r'value="([\d.]+)"', line)
                        if m:
                            last_value[vm] = m.group(1)
                        received += 1

    reader = asyncio.create_task(read())
    await asyncio.sleep(1.0)  # the stream is subscribed
    nc = await nats.connect(nats_url)
    published, step = 0, 1.0 / rate
    final = {}
    try:
        t_end = time.monotonic() + seconds
        k = 0
        while time.monotonic() < t_end:
            k += 1
            for v in vms:
                pct = round(min(100.0, k * 100.0 / (seconds * rate)), 1)
                final[v] = pct
                await nc.publish(Contexts.EVT_UPDATED, orjson.dumps({"vm_name": v, "context": context(v, pct)}))
                published += 1
            await asyncio.sleep(step)
        await nc.flush()
        await asyncio.sleep(2.5)  # the last coalesced updates are due within a second
    finally:
        await nc.close()
        reader.cancel()
    caught_up = sum(1 for v in vms if last_value.get(v) == str(final[v]))
    gaps = sorted(b - a for times in arrivals.values() for a, b in zip(times, times[1:]))
    per_vm = received / n_vms / (time.monotonic() - started - 1.0)  # the stream was up a second before
    print(f"live: {n_vms} VMs x {rate:g} updates/s for {seconds:g}s: published {published} updates, "
          f"received {received} progress fragments ({per_vm:.2f} per VM per second); gap between two updates of "
          f"one VM at the client: min {gaps[0]:.2f} s, p1 {gaps[len(gaps) // 100]:.2f} s, p50 "
          f"{gaps[len(gaps) // 2]:.2f} s (the server spaces them >= 1 s; less is delivery jitter); "
          f"VMs whose last update arrived: {caught_up}/{n_vms}")


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vms", type=int, default=10_000)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--live-vms", type=int, default=100)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--rate", type=float, default=5.0)
    ap.add_argument("--live-only", action="store_true", help="skip the page times")
    args = ap.parse_args()

    async with seeded_api(args.vms, 2) as (base, nats_url, db_name):
        add_operator(db_name)
        async with httpx.AsyncClient(base_url=base, timeout=60) as client:
            await sign_in(client)
            n = args.requests
            print(f"gateway: oma-api subprocess (uvicorn) at {base}, MariaDB {MARIADB['host']}:{MARIADB['port']}/{db_name}, "
                  f"{args.vms} VMs")
            if not args.live_only:
                await page_times(client, nats_url, n, args.vms)
            await live_stream(base, client.cookies, nats_url, args.live_vms, args.seconds, args.rate)

if __name__ == "__main__":
    asyncio.run(main())
