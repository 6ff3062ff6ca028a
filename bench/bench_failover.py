"""Benchmark of a test failover (a script, not a test).

Against the in-process CloudStack simulator (every async job takes --job-latency, 300 ms by default):
a --disks VM (4 by default) is replicated, then test-failed-over and cleaned up --rounds times.
Printed: the wall time of each (POST -> completed, medians), and the floor: the async jobs that
cannot overlap times the job latency. The snapshots and the clones each run concurrently (one job's
time each); deploy, the stub ROOT's detach, the boot clone's attach, each data disk's attach (in
source order, so one at a time) and start are serial. Goal: wall <= 1.5 x floor.

    python bench/bench_failover.py [--job-latency 0.3] [--disks 4] [--rounds 3]
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

from oma.plugins.ossea.sim_vms import TEST_NETWORK_IDS  # noqa: E402

SERVICES = ("auth", "config", "replication", "export_manager", "failover")


def vm(name: str, disks: int, config_id: int) -> dict[str, Any]:
    return {"source_vm": {"id": f"vm-{name}", "name": name, "cpus": 1, "memory_mb": 1024,
                          "nics": [{"network": "VM Network", "mac_address": "00:50:56:00:00:01"}],
                          "disks": [{"id": f"disk-{i}", "size_gb": 10, "capacity_bytes": 10 * 1024 ** 3}
                                    for i in range(disks)]},
            "ossea_config_id": config_id, "replication_type": "initial"}


def floor_jobs(disks: int) -> int:
    """snapshot wave + clone wave + deploy + detach stub + attach ROOT + (disks - 1) data attaches + start."""
    return 6 + (disks - 1)


async def main() -> None:
    p = sim_arguments(__doc__)
    p.add_argument("--disks", type=int, default=4)
    args = p.parse_args()
    async with appliance_on_sim(SERVICES, args.job_latency, cloud_poll_interval=0.02) as (c, url):
        await run(c, url, args)


async def run(c: httpx.AsyncClient, url: str, args: argparse.Namespace) -> None:
    h, config_id = await sign_in_with_cloud(c, url)
    await c.post("/api/v1/network/mappings", headers=h, json={"action": "create", "mapping": {
        "source_network": "VM Network", "test_network_id": TEST_NETWORK_IDS[0]}})
    r = await c.post("/api/v1/replications", headers=h, json=vm("bench-vm", args.disks, config_id))
    assert r.status_code == 201, r.text
    # Its sync done (no VMA: reported on the copier's route): a test failover waits for a sync in flight.
    r = await c.post(f"/api/v1/replication/jobs/{r.json()['job_id']}/progress", headers=h, json={"status": "completed"})
    assert r.status_code == 200, r.text

    async def timed(action: str) -> tuple[float, dict[str, Any]]:
        t = time.monotonic()
        r = await c.post("/api/v1/failover", headers=h, json={"action": action, "vm_name": "bench-vm"})
        assert r.status_code == 202, r.text
        while True:
            job = (await c.get(f"/api/v1/failover/jobs/{r.json()['failover_id']}", headers=h)).json()
            if job["status"] not in ("running", "compensating"):
                assert job["status"] == "completed", job
                return time.monotonic() - t, job
            await asyncio.sleep(0.01)

    tests, cleanups, steps = [], [], {}
    for _ in range(args.rounds):
        wall, job = await timed("test")
        tests.append(wall)
        for s in job["steps"]:
            steps.setdefault(s["name"], []).append(s["duration_seconds"])
        cleanups.append((await timed("cleanup"))[0])
    floor = floor_jobs(args.disks) * args.job_latency
    m = statistics.median(tests)
    print(f"test failover of a {args.disks}-disk VM, async jobs {args.job_latency * 1000:.0f} ms, "
          f"{args.rounds} rounds (medians)")
    print(f"  wall: {m:.2f} s (rounds: {', '.join(f'{x:.2f}' for x in tests)})")
    print(f"  floor: {floor_jobs(args.disks)} serial jobs x {args.job_latency:.2f} s = {floor:.2f} s")
    print(f"  ratio wall / floor: {m / floor:.2f}   (goal <= 1.5)")
    print("  by step: " + ", ".join(f"{k} {statistics.median(v):.2f}" for k, v in steps.items()))
    print(f"  cleanup wall: {statistics.median(cleanups):.2f} s")


if __name__ == "__main__":
    asyncio.run(main())
