"""Benchmark of the scheduler's overhead (a script, not a test).

`oma-service scheduler` runs alone in its own process (MariaDB by default), with --vms VMs in groups
of --group-size on one schedule; replication and inventory are played by this script over NATS (a
create answers at once, a job completes --job-seconds later), so the figures are the scheduler's own.
Printed, for two phases, the scheduler process's rounds per second (`oma_scheduler_ticks_total`),
the mean round time (`oma_scheduler_tick_duration_seconds`, wall: it includes waiting for the CPU on a
loaded machine) and its CPU (from /proc; per round, the figure that does not depend on the load):
- idle: every VM in a group, the schedule not due; rounds back to back (OMA_SCHEDULER_TICK=--tick);
- firing: the schedule runs: every VM is started (at most --max-concurrent per group at once),
  followed and completed; the wall time from `run` until every VM of every group is done.

    python bench/bench_scheduler.py [--vms 1000] [--group-size 10] [--max-concurrent 5] [--db mariadb]
"""
from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

import httpx  # noqa: E402
import orjson  # noqa: E402

from oma.shared import bus as busmod  # noqa: E402
from oma.shared.natsserver import EmbeddedNats, free_port  # noqa: E402
from oma.shared.subjects import Inventory, Replication, Scheduler  # noqa: E402

CLK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK  # utime + stime


async def metric(url: str, name: str) -> float:
    async with httpx.AsyncClient() as c:
        text = (await c.get(url)).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name) and not line.startswith("#"))


class FakeReplication:
    """Replication and inventory as the scheduler sees them: creates answer at once, jobs complete
    `seconds` after their creation; the inventory knows every VM."""

    def __init__(self, nc: Any, seconds: float):
        self.nc, self.seconds = nc, seconds
        self.created: dict[str, float] = {}
        self.in_flight_max = 0

    async def start(self) -> None:
        await self.nc.subscribe(Replication.CREATE, cb=self._create)
        await self.nc.subscribe(Replication.GET, cb=self._get)
        await self.nc.subscribe(Inventory.LIST, cb=self._inventory)

    async def _create(self, msg: Any) -> None:
        body = orjson.loads(msg.data)
        job_id = f"job-{uuid.uuid4().hex[:12]}"
        self.created[job_id] = time.monotonic()
        live = sum(1 for t in self.created.values() if time.monotonic() - t < self.seconds)
        self.in_flight_max = max(self.in_flight_max, live)
        await msg.respond(orjson.dumps({"job_id": job_id, "status": "ready_for_sync",
                                        "vm": body["source_vm"]["name"]}))

    async def _get(self, msg: Any) -> None:
        job_id = orjson.loads(msg.data)["job_id"]
        done = time.monotonic() - self.created.get(job_id, 0) >= self.seconds
        await msg.respond(orjson.dumps({"job_id": job_id, "status": "completed" if done else "replicating"}))

    async def _inventory(self, msg: Any) -> None:
        name = orjson.loads(msg.data)["name"]
        await msg.respond(orjson.dumps({"vms": [{"id": f"vm-{name}", "name": name, "path": f"/DC0/vm/{name}",
                                                 "disks": [{"id": "disk-2000", "size_gb": 1,
                                                            "capacity_bytes": 1 << 30}]}]}))


async def mariadb(sql: str) -> None:
    import asyncmy
    conn = await asyncmy.connect(host="127.0.0.1", port=3306, user="root", password="")
    try:
        async with conn.cursor() as cur:
            await cur.execute(sql)
    finally:
        conn.close()


async def main(args: argparse.Namespace) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="oma-bench-sched-"))
    nats = EmbeddedNats()
    url = await nats.start()
    db_name = f"oma_bench_sched_{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "OMA_NATS_URL": url, "OMA_DATA_DIR": str(tmp), "OMA_SCHEDULER_TICK": str(args.tick),
           "OMA_SCHEDULER_MIN_INTERVAL": "1", "OMA_ALLOW_EPHEMERAL_WITH_EXTERNAL_NATS": "true",
           "OMA_LOG_FORMAT": "logfmt"}
    if args.db == "mariadb":
        await mariadb(f"CREATE DATABASE `{db_name}`")
        env.update(OMA_DB_TYPE="mariadb", OMA_DB_HOST="127.0.0.1", OMA_DB_NAME=db_name, OMA_DB_USER="root")
    port = free_port()
    env["OMA_METRICS_PORT"] = str(port)
    metrics_url = f"http://127.0.0.1:{port}/metrics"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "from oma.cli import oma_service; oma_service()", "scheduler",
        env=env, stdout=(tmp / "scheduler.log").open("wb"), stderr=asyncio.subprocess.STDOUT)
    nc = await busmod.connect(url, "bench")
    bus = busmod.Bus(nc, timeout=60)
    fake = FakeReplication(nc, args.job_seconds)
    await fake.start()
    try:
        for _ in range(600):
            try:
                await bus.call(Scheduler.SCHEDULES, {"action": "get"})
                break
            except Exception:  # noqa: BLE001 - not up yet
                await asyncio.sleep(0.1)
        sched = (await bus.call(Scheduler.SCHEDULES, {"action": "create", "schedule": {
            "name": "bench", "interval_seconds": 86400, "max_concurrent": args.max_concurrent,
            "enabled": False}}))["schedule"]
        groups = (args.vms + args.group_size - 1) // args.group_size
        for g in range(groups):
            names = [f"vm-{g:04d}-{i:03d}" for i in range(args.group_size) if g * args.group_size + i < args.vms]
            await bus.call(Scheduler.GROUPS, {"action": "create", "group": {
                "name": f"group-{g:04d}", "ossea_config_id": 1, "schedule_id": sched["id"], "vm_names": names}})
        print(f"scheduler: {args.vms} VMs in {groups} groups of {args.group_size}, max_concurrent "
              f"{args.max_concurrent}, database {args.db}, tick {args.tick}s, fake jobs of {args.job_seconds}s")

        async def window(seconds: float | None, until: Any = None) -> tuple[float, float, float, float]:
            t0, c0 = time.monotonic(), cpu_seconds(proc.pid)
            k0 = await metric(metrics_url, "oma_scheduler_ticks_total")
            s0 = await metric(metrics_url, "oma_scheduler_tick_duration_seconds_sum")
            if until is None:
                await asyncio.sleep(seconds)
            else:
                while not await until():
                    await asyncio.sleep(0.2)
            wall = time.monotonic() - t0
            ticks = await metric(metrics_url, "oma_scheduler_ticks_total") - k0
            spent = await metric(metrics_url, "oma_scheduler_tick_duration_seconds_sum") - s0
            return wall, ticks, spent, cpu_seconds(proc.pid) - c0

        wall, ticks, spent, cpu = await window(args.seconds)
        per_round = cpu / max(ticks, 1)
        print(f"idle    : {ticks / wall:8.1f} rounds/s, {1000 * spent / max(ticks, 1):7.2f} ms a round (wall), "
              f"{1000 * per_round:6.2f} ms CPU a round, CPU {100 * cpu / wall:5.1f} % of a core over {wall:.1f} s"
              f" -> at the default 5 s tick: {100 * per_round / 5:.2f} % of a core")
        await bus.call(Scheduler.SCHEDULES, {"action": "update", "id": sched["id"], "schedule": {"enabled": True}})

        async def all_done() -> bool:
            r = await bus.call(Scheduler.EXECUTIONS, {"schedule_id": sched["id"], "limit": 1000})
            return len(r["executions"]) == groups and all(e["status"] == "completed" for e in r["executions"])
        wall, ticks, spent, cpu = await window(None, all_done)
        r = await bus.call(Scheduler.EXECUTIONS, {"schedule_id": sched["id"], "limit": 1000})
        started = sum(e["vms_started"] for e in r["executions"])
        floor = args.job_seconds * -(-args.group_size // args.max_concurrent)
        print(f"firing  : {ticks / wall:8.1f} rounds/s, {1000 * spent / max(ticks, 1):7.2f} ms a round (wall), "
              f"CPU {100 * cpu / wall:5.1f} % of a core, {cpu:.1f} s CPU; {started} VMs started and completed "
              f"in {wall:.1f} s "
              f"(floor {floor:.1f} s: {-(-args.group_size // args.max_concurrent)} waves of {args.job_seconds} s); "
              f"{len(fake.created)} creates, at most {fake.in_flight_max} jobs in flight "
              f"(limit {groups * args.max_concurrent})")
    finally:
        proc.terminate()
        await proc.wait()
        await nc.drain()
        await nats.stop()
        if args.db == "mariadb":
            await mariadb(f"DROP DATABASE IF EXISTS `{db_name}`")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vms", type=int, default=1000)
    p.add_argument("--group-size", type=int, default=10)
    p.add_argument("--max-concurrent", type=int, default=5)
    p.add_argument("--job-seconds", type=float, default=2.0)
    p.add_argument("--tick", type=float, default=0.05, help="seconds between rounds (the setting's default is 5)")
    p.add_argument("--seconds", type=float, default=10.0, help="length of the idle window")
    p.add_argument("--db", choices=("mariadb", "memory"), default="mariadb")
    asyncio.run(main(p.parse_args()))
