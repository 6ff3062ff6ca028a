"""Fault-injection benchmark of replication (a script, not a test).

Runs --jobs replication jobs (1-3 disks each, --parallel at a time) through the gateway while a chaos
task SIGKILLs the replication and export_manager processes at random (a supervisor restarts them
after 1-3 s, as systemd's Restart=on-failure would) and the CloudStack simulator fails calls at
random (transient 530s that are retried, a few permanent 431s that fail a job, slow createVolume /
attachVolume bursts). Each job is driven to ready_for_sync (or failed), then deleted. At the end the
chaos stops and the run settles; it reports jobs ready / failed / stuck (no decision within
--job-timeout, or a cleanup still pending) and orphaned volumes (simulator data volumes that no
`job_volumes` row holds). Targets: 0 stuck, 0 orphaned.

Real NATS (embedded nats-server), MariaDB (a fresh database on 127.0.0.1:3306, dropped afterwards),
nbdkit; replication and export_manager run as `oma-service` processes, auth, config and the gateway
in this process.

    python bench/bench_faults.py [--jobs 50] [--parallel 6] [--seed 7] [--chaos-every 0.5 2] [--timeout 900]

~2.5 minutes on 2 shared cores.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import random
import re
import signal
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import asyncmy  # noqa: E402
import httpx  # noqa: E402

from nbdutil import free_port  # noqa: E402
from oma.plugins.ossea.simulator import DEFAULT_VM_ID, CloudStackSimulator  # noqa: E402
from oma.shared.natsserver import EmbeddedNats  # noqa: E402
from oma.runner import Appliance  # noqa: E402
from oma.shared.settings import Settings, environ  # noqa: E402

TOKEN = "vma_bench_token_abc123def456789012345678"
DB = dict(host="127.0.0.1", port=3306, user="root", password="")
JOB_ID = re.compile(r"job-\d{8}-\d{6}(?:-\d+)?")
KILLABLE = ("replication", "export_manager")
TERMINAL = ("ready_for_sync", "failed", "cancelled")
PERMANENT = "Volume state must be in Allocated"  # the text of the injected permanent attach failure


async def sql(statement: str, database: str | None = None) -> list[tuple]:
    conn = await asyncmy.connect(**DB, database=database)
    try:
        async with conn.cursor() as cur:
            await cur.execute(statement)
            rows = list(await cur.fetchall())
        await conn.commit()
        return rows
    finally:
        conn.close()


class Supervisor:
    """The killable services as processes; a killed one comes back after 1-3 s."""

    def __init__(self, settings: Settings, logdir: Path):
        self.env = {**os.environ, "OMA_METRICS_PORT": "0", "PYTHONPATH": str(ROOT),
                    **environ(settings)}
        self.logdir = logdir
        self.procs: dict[str, asyncio.subprocess.Process] = {}
        self.kills: Counter[str] = Counter()
        self.running = True

    async def start(self, name: str) -> None:
        self.procs[name] = await asyncio.create_subprocess_exec(
            sys.executable, "-c", "from oma.cli import oma_service; oma_service()", name, env=self.env,
            stdout=(self.logdir / f"{name}.log").open("ab"), stderr=asyncio.subprocess.STDOUT)

    async def kill(self, name: str) -> None:
        proc = self.procs[name]
        if proc.returncode is not None:  # still down from an earlier kill: one instance only
            return
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
        self.kills[name] += 1
        await asyncio.sleep(random.uniform(1.0, 3.0))  # RestartSec
        await self.start(name)

    async def stop(self) -> None:
        for proc in self.procs.values():
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                await asyncio.wait_for(proc.wait(), 20)
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def chaos(sup: Supervisor, sim: CloudStackSimulator, faults: Counter[str], every: tuple[float, float]) -> None:
    while True:
        await asyncio.sleep(random.uniform(*every))
        roll = random.random()
        if roll < 0.45:
            await sup.kill(random.choice(KILLABLE))
        elif roll < 0.70:
            command = random.choice(("createVolume", "attachVolume", "detachVolume", "deleteVolume"))
            sim.fail(command, random.randint(1, 2), errorcode=530)
            faults[f"{command} 530 (transient)"] += 1
        elif roll < 0.80:
            sim.fail("attachVolume", 1, errorcode=431, errortext=PERMANENT)
            faults["attachVolume 431 (permanent)"] += 1
        else:
            command = random.choice(("createVolume", "attachVolume"))
            sim.set_latency(command, random.uniform(1.0, 3.0))
            faults[f"{command} slow"] += 1
            await asyncio.sleep(random.uniform(2.0, 5.0))
            sim.set_latency(command, 0)


class Driver:
    def __init__(self, c: httpx.AsyncClient, headers: dict[str, str], config_id: int, job_timeout: float):
        self.c, self.h, self.config_id, self.job_timeout = c, headers, config_id, job_timeout
        self.outcomes: Counter[str] = Counter()
        self.seconds: list[float] = []

    async def retry(self, method: str, url: str, **kw: Any) -> httpx.Response:
        """Until the service answers something other than unavailable / timeout (it is restarting)."""
        while True:
            r = await self.c.request(method, url, headers=self.h, **kw)
            if r.status_code not in (503, 504):
                return r
            await asyncio.sleep(1.0)

    async def submit(self, i: int) -> str | None:
        disks = random.randint(1, 3)
        name = f"chaos-{i:03d}"
        body = {"source_vm": {"id": f"vm-{name}", "name": name, "path": f"/DC/vm/{name}", "datacenter": "DC",
                              "disks": [{"id": f"d{u}", "size_gb": 1, "capacity_bytes": 1 << 30,
                                         "path": f"[ds1] {name}/{name}_{u}.vmdk", "datastore": "ds1"}
                                        for u in range(disks)]},
                "ossea_config_id": self.config_id, "replication_type": "initial"}
        while True:
            r = await self.c.post("/api/v1/replications", headers=self.h, json=body)
            if r.status_code in (201, 202):
                return r.json()["job_id"]
            found = JOB_ID.search(r.text)
            if r.status_code in (409, 502) and found:  # a POST lost in a kill did create it, or it failed
                return found.group(0)
            if r.status_code not in (503, 504):
                print(f"  job {i}: unexpected HTTP {r.status_code}: {r.text[:200]}")
                return None
            await asyncio.sleep(1.0)

    async def run(self, i: int) -> None:
        started = time.monotonic()
        job_id = await self.submit(i)
        if job_id is None:
            self.outcomes["rejected"] += 1
            return
        status = "?"
        while time.monotonic() - started < self.job_timeout:
            r = await self.retry("GET", f"/api/v1/replication/jobs/{job_id}")
            status = r.json().get("status", "?")
            if status in TERMINAL:
                break
            await asyncio.sleep(0.5)
        else:
            self.outcomes["stuck"] += 1
            print(f"  {job_id}: stuck in {status} after {self.job_timeout:.0f} s")
            return
        self.outcomes[status] += 1
        if status == "failed":  # expected only from an injected permanent failure
            self.outcomes["failed (injected 431)" if PERMANENT in str(r.json().get("error")) else
                          "failed (other)"] += 1
            if PERMANENT not in str(r.json().get("error")):
                print(f"  {job_id}: failed: {r.json().get('error')}")
        self.seconds.append(time.monotonic() - started)
        r = await self.retry("DELETE", f"/api/v1/replication/jobs/{job_id}")
        if r.status_code != 200:
            print(f"  {job_id}: DELETE answered {r.status_code}: {r.text[:200]}")


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", type=int, default=50)
    p.add_argument("--parallel", type=int, default=6)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--chaos-every", type=float, nargs=2, default=(0.5, 2.0), metavar=("MIN", "MAX"),
                   help="seconds between two chaos actions (a kill, a fault, a slow burst)")
    p.add_argument("--job-timeout", type=float, default=180.0, help="a job undecided after this is stuck")
    p.add_argument("--settle", type=float, default=90.0, help="seconds for cleanups and the sweep at the end")
    p.add_argument("--timeout", type=float, default=900.0, help="bound on the whole run")
    args = p.parse_args()
    random.seed(args.seed)
    logging.basicConfig(level=logging.ERROR)
    from oma.services.gateway.app import create_app

    db_name = f"oma_bench_faults_{uuid.uuid4().hex[:8]}"
    await sql(f"CREATE DATABASE `{db_name}`")
    with tempfile.TemporaryDirectory(prefix="oma-bench-faults-") as tmp:
        tmpdir = Path(tmp)
        (tmpdir / "dev").mkdir()
        nats = EmbeddedNats()
        sim = CloudStackSimulator("bench-key", "bench-secret", device_dir=tmpdir / "dev", job_latency=0.2,
                                  max_volumes=10_000, max_primary_gb=10_000_000)
        url = await sim.start()
        settings = Settings(
            nats_url=await nats.start(), data_dir=tmpdir / "data", appliance_tokens=f"bench={TOKEN}",
            db_type="mariadb", db_host=DB["host"], db_port=DB["port"], db_user=DB["user"], db_pass=DB["password"],
            db_name=db_name, export_backend="nbdkit", nbd_port=free_port(), device_by_id_dir=tmpdir / "dev",
            provision_wait=0.5, request_timeout=10, cloud_timeout=5, cloud_job_timeout=10,
            cloud_inflight_grace=4, dependency_wait=60, device_wait=5, cleanup_retry_interval=2,
            volume_sweep_interval=5)
        sup = Supervisor(settings, tmpdir)
        started = time.monotonic()
        try:
            async with Appliance(settings, ("auth", "config")) as appliance:
                for name in KILLABLE:
                    await sup.start(name)
                app = create_app(settings, appliance.nats_url)
                async with app.router.lifespan_context(app), httpx.AsyncClient(
                        transport=httpx.ASGITransport(app=app), base_url="http://oma", timeout=120) as c:
                    await asyncio.wait_for(run(c, url, sup, sim, args, db_name), args.timeout)
        finally:
            await sup.stop()
            await sim.stop()
            await nats.stop()
            await sql(f"DROP DATABASE IF EXISTS `{db_name}`")
        print(f"wall time {time.monotonic() - started:.0f} s")


async def run(c: httpx.AsyncClient, url: str, sup: Supervisor, sim: CloudStackSimulator,
              args: argparse.Namespace, db_name: str) -> None:
    r = await c.post("/api/v1/auth/login", json={"appliance_id": "bench", "token": TOKEN})
    h = {"Authorization": f"Bearer {r.json()['session_token']}"}
    r = await c.post("/api/v1/ossea/config", headers=h, json={"action": "create", "configuration": {
        "name": "sim", "api_url": url, "api_key": "bench-key", "secret_key": "bench-secret",
        "zone": "OSSEA-Zone", "oma_vm_id": DEFAULT_VM_ID}})
    driver = Driver(c, h, r.json()["configuration"]["id"], args.job_timeout)
    while (await c.get("/api/v1/replication/jobs", headers=h)).status_code != 200:
        await asyncio.sleep(0.5)

    faults: Counter[str] = Counter()
    chaos_task = asyncio.create_task(chaos(sup, sim, faults, tuple(args.chaos_every)))
    gate = asyncio.Semaphore(args.parallel)

    async def one(i: int) -> None:
        async with gate:
            await driver.run(i)
    t = time.monotonic()
    try:
        await asyncio.gather(*(one(i) for i in range(args.jobs)))
    finally:
        chaos_task.cancel()
        await asyncio.gather(chaos_task, return_exceptions=True)
    sim.reset_faults()
    for name in KILLABLE:  # a kill in the last moment: make sure both run again
        if sup.procs[name].returncode is not None:
            await sup.start(name)
    ran = time.monotonic() - t

    async def leftovers() -> tuple[list[str], int]:
        held = {row[0] for row in await sql("SELECT volume_id FROM job_volumes WHERE holds_volume = 1 "
                                            "AND volume_id IS NOT NULL", db_name)}
        pending = (await sql("SELECT COUNT(*) FROM replication_jobs WHERE cleanup_pending = 1", db_name))[0][0]
        return [v.id for v in sim.volumes.values() if v.type == "DATADISK" and v.id not in held], pending
    deadline = time.monotonic() + args.settle
    orphans, pending = await leftovers()
    while (orphans or pending) and time.monotonic() < deadline:
        await asyncio.sleep(1.0)
        orphans, pending = await leftovers()
    in_flight = (await sql("SELECT COUNT(*) FROM replication_jobs WHERE status IN "
                           "('queued','provisioning','ready_for_sync','replicating')", db_name))[0][0]

    o = driver.outcomes
    print(f"{args.jobs} jobs, {args.parallel} at a time, seed {args.seed}: {ran:.0f} s under chaos")
    print(f"  kills (SIGKILL): replication {sup.kills['replication']}, export_manager {sup.kills['export_manager']}")
    print(f"  simulator faults: {dict(faults) or 'none'}")
    print(f"  jobs ready_for_sync {o['ready_for_sync']}, failed {o['failed']} (by an injected 431: "
          f"{o['failed (injected 431)']}, other: {o['failed (other)']}), cancelled {o['cancelled']}, "
          f"stuck {o['stuck']}, rejected {o['rejected']}")
    if driver.seconds:
        s = sorted(driver.seconds)
        print(f"  seconds to a decision: median {s[len(s) // 2]:.1f}, max {s[-1]:.1f}")
    print(f"  after {args.settle:.0f} s settle: orphaned volumes {len(orphans)} (target 0), cleanups pending "
          f"{pending}, jobs still in flight {in_flight}, data volumes in the cloud {len(sim.volumes) - 1}")
    for vid in orphans:
        print(f"    orphan {vid} {sim.volumes[vid].name} vm={sim.volumes[vid].vm_id}")


if __name__ == "__main__":
    asyncio.run(main())
