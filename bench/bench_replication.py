"""Benchmark of the replication service (a script, not a test).

Against the in-process CloudStack simulator (every async job takes --job-latency, 300 ms by default;
attaches to the appliance VM run one at a time, as on CloudStack's per-VM work queue) and a real
nbdkit exporter, through the gateway, in one run:
1. a 1-disk VM and a 16-disk VM (--rounds times, medians): POST -> ready_for_sync time of each,
   beside the critical path of n disks, one createVolume then n attaches on the one appliance VM
   ((1 + n) job latencies; goal <= 1.15x that path), and the ratio 16-disk / 1-disk;
2. 8 VMs of 4 disks posted concurrently (32 disks = the cap): all ready, none failed, total time;
   a 9th waits `queued` (202) and becomes ready after one of the 8 is deleted.

    python bench/bench_replication.py [--job-latency 0.3] [--rounds 3]

The simulator's account limits (20 volumes, 200 GiB) are raised for the run. ~60 s on 2 cores.
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import httpx  # noqa: E402
from common import appliance_on_sim, sign_in_with_cloud, sim_arguments  # noqa: E402


SERVICES = ("auth", "config", "replication", "export_manager")


def vm(name: str, disks: int, config_id: int) -> dict[str, Any]:
    return {"source_vm": {"id": f"vm-{name}", "name": name, "path": f"/DC/vm/{name}", "datacenter": "DC",
                          "cpus": 2, "memory_mb": 4096,
                          "disks": [{"id": f"disk-{i}", "size_gb": 10, "capacity_bytes": 10 * 1024 ** 3,
                                     "path": f"[ds1] {name}/{name}_{i}.vmdk", "datastore": "ds1"}
                                    for i in range(disks)]},
            "ossea_config_id": config_id, "replication_type": "initial"}


async def main() -> None:
    p = sim_arguments(__doc__)
    args = p.parse_args()
    async with appliance_on_sim(SERVICES, args.job_latency, max_attached_disks=32) as (c, url):
        await run(c, url, args)


def critical_path(disks: int, job_latency: float) -> float:
    """The least time n disks can take: volumes are created in parallel (one job latency), then
    the appliance VM's work queue runs the n attaches one after another."""
    return (1 + disks) * job_latency


async def run(c: httpx.AsyncClient, url: str, args: argparse.Namespace) -> None:
    h, config_id = await sign_in_with_cloud(c, url)

    async def post(name: str, disks: int) -> tuple[float, httpx.Response]:
        t = time.monotonic()
        resp = await c.post("/api/v1/replications", headers=h, json=vm(name, disks, config_id))
        return time.monotonic() - t, resp

    async def delete(job_id: str) -> None:
        resp = await c.delete(f"/api/v1/replication/jobs/{job_id}", headers=h)
        assert resp.status_code == 200, resp.text

    # 1. one disk vs sixteen
    one, sixteen = [], []
    for i in range(args.rounds):
        t1, r1 = await post(f"one-{i}", 1)
        t16, r16 = await post(f"sixteen-{i}", 16)
        assert r1.status_code == 201 and r16.status_code == 201, (r1.text, r16.text)
        assert len(r16.json()["nbd_exports"]) == 16
        one.append(t1)
        sixteen.append(t16)
        await asyncio.gather(delete(r1.json()["job_id"]), delete(r16.json()["job_id"]))
    m1, m16 = statistics.median(one), statistics.median(sixteen)
    print(f"async job latency {args.job_latency * 1000:.0f} ms, {args.rounds} rounds (medians)")
    for label, n, median, rounds in (("1-disk VM ", 1, m1, one), ("16-disk VM", 16, m16, sixteen)):
        path = critical_path(n, args.job_latency)
        print(f"  {label}: {median:6.2f} s   critical path {path:5.2f} s (1 create + {n} attach), "
              f"{median / path:.2f}x (goal <= 1.15)   (rounds: {', '.join(f'{x:.2f}' for x in rounds)})")
    print(f"  ratio 16-disk / 1-disk: {m16 / m1:.2f}")

    # 2. eight 4-disk VMs at once: 32 disks, the cap
    t = time.monotonic()
    results = await asyncio.gather(*(post(f"batch-{i}", 4) for i in range(8)))
    total = time.monotonic() - t
    statuses = [resp.status_code for _, resp in results]
    ready = sum(resp.status_code == 201 and resp.json()["status"] == "ready_for_sync" for _, resp in results)
    print(f"8 x 4-disk jobs concurrently: {ready}/8 ready_for_sync, {8 - ready} failed or waiting "
          f"(HTTP {sorted(set(statuses))}), total {total:.2f} s, slowest {max(x for x, _ in results):.2f} s")
    path = critical_path(32, args.job_latency)
    print(f"  critical path {path:.2f} s (1 create + 32 attaches on the one appliance VM), {total / path:.2f}x")
    r = await c.get("/api/v1/replication/jobs", headers=h, params={"status": "failed"})
    print(f"  failed jobs in the whole run: {r.json()['total']}")

    t9, r9 = await post("ninth", 4)
    job9 = r9.json()["job_id"]
    print(f"9th 4-disk job: HTTP {r9.status_code}, status {r9.json()['status']} (answered in {t9:.2f} s)")
    t = time.monotonic()
    await delete(results[0][1].json()["job_id"])
    while True:
        r = await c.get(f"/api/v1/replication/jobs/{job9}", headers=h)
        if r.json()["status"] in ("ready_for_sync", "failed"):
            break
        await asyncio.sleep(0.05)
    print(f"  after deleting one of the 8: {r.json()['status']} in {time.monotonic() - t:.2f} s "
          f"(delete + provisioning 4 disks)")


if __name__ == "__main__":
    asyncio.run(main())
