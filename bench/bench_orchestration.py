"""Benchmark of OMA driving the VMA (a script, not a test).

One appliance (auth, config, inventory, export_manager, context_aggregator in-process; replication
as its own `oma-service replication` process, so its CPU can be measured), MariaDB, real nbdkit
exports, the CloudStack simulator, vcsim and the VMA simulator (`oma-vma-sim`, its own process, as a
real VMA is):

1. VMS VMs x 2 disks x SIZE are discovered through the VMA and `POST /api/v1/replications`-ed at
   once; timed from the first POST to the last `completed` (provisioning, replicate, the copy, the
   polls, completion). Then the volumes' backing files are made sparse again and `nbdcopy --flush`
   copies the very same source files into the same exports of the same NBD server, all at once
   (both write into unallocated space). Prints both aggregate MB/s and the ratio (goal >= 0.8).
2. FOLLOW jobs of one small disk are started with the simulator throttled so they keep running;
   the replication process's CPU (utime + stime from /proc) is measured over WINDOW seconds while
   it follows them all (goal < 5% of a core).

    python bench/bench_orchestration.py [--vms 8] [--size-mib 1024] [--follow 100] [--window 32]

Needs MariaDB at 127.0.0.1:3306 (root, no password; a scratch database is dropped at the end).
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sys
import time
import uuid
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import httpx  # noqa: E402
import uvicorn  # noqa: E402
from common import nbdcopy_seconds, run_in_scratch  # noqa: E402

from conftest import SEED_TOKEN, mariadb_exec, mariadb_settings  # noqa: E402
from nbdutil import MiB, digest, free_port  # noqa: E402
from oma.plugins.ossea.simulator import DEFAULT_VM_ID, CloudStackSimulator  # noqa: E402
from oma.plugins.vma.jobs import CHUNK  # noqa: E402 - the step of a throttled copy
from oma.plugins.vma.simulator import VmaSimulator  # noqa: E402
from oma.shared.natsserver import EmbeddedNats  # noqa: E402
from oma.runner import Appliance  # noqa: E402
from oma.shared.settings import Settings  # noqa: E402
from test_replication_faults import kill, start_service  # noqa: E402
from vcsim import DiskSpec, create_vm, running_vcsim  # noqa: E402

IN_PROCESS = ("auth", "config", "inventory", "export_manager", "context_aggregator")
TICKS = os.sysconf("SC_CLK_TCK")
FOLLOW_DISK = 32 * MiB


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime


class Oma:
    def __init__(self, c: httpx.AsyncClient, h: dict[str, str], config_id: int, vcenter: str):
        self.c, self.h, self.config_id, self.vcenter = c, h, config_id, vcenter

    async def discover(self, prefix: str) -> list[dict]:
        r = await self.c.get("/api/v1/vms/discover", params={"vcenter": self.vcenter}, headers=self.h)
        assert r.status_code == 200, r.text
        return sorted((v for v in r.json()["vms"] if v["name"].startswith(prefix)), key=lambda v: v["name"])

    async def start(self, vm: dict) -> str:
        r = await self.c.post("/api/v1/replications", headers=self.h, json={
            "source_vm": vm, "ossea_config_id": self.config_id, "replication_type": "initial"})
        assert r.status_code in (201, 202), r.text
        return r.json()["job_id"]

    async def job(self, job_id: str) -> dict:
        return (await self.c.get(f"/api/v1/replication/jobs/{job_id}", headers=self.h)).json()

    async def wait(self, job_ids: list[str], *statuses: str, poll: float = 0.1) -> list[dict]:
        while True:
            try:
                jobs = await asyncio.gather(*(self.job(j) for j in job_ids))
            except httpx.HTTPError:  # a busy machine: a read that failed is asked again
                jobs = []
            if jobs and all(j["status"] in statuses for j in jobs):
                return jobs
            await asyncio.sleep(poll)


class Sim:
    """`oma-vma-sim` in its own process, over a data dir whose source disks are made beforehand."""

    def __init__(self, work: Path, name: str, disk_size: int):
        self.data_dir, self.disk_size = work / name, disk_size
        self.layout = VmaSimulator(self.data_dir, disk_size=disk_size, density=1.0)  # paths and disks only
        self.proc: asyncio.subprocess.Process | None = None
        self.url = ""

    async def make_disks(self, vc, prefix: str) -> None:
        from oma.plugins.vsphere.source import VSphereSource
        for vm in await VSphereSource(vc.connection()).discover():
            if vm["name"].startswith(prefix):
                for d in vm["disks"]:
                    await self.layout.source_disk(f"{vc.host}:{vc.port}", vm, d)

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "oma.plugins.vma.simulator", "--port", "0", "--data-dir", str(self.data_dir),
            "--disk-size", str(self.disk_size), "--density", "1.0", "--insecure-vcenter", "--appliance-id",
            "test-vma", env={**os.environ, "OMA_VMA_SIM_TOKEN": SEED_TOKEN, "PYTHONPATH": str(ROOT)},
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
        self.url = (await self.proc.stdout.readline()).decode().strip()
        assert self.url.startswith("http://"), "oma-vma-sim did not start"

    async def faults(self, **faults) -> None:
        async with httpx.AsyncClient() as c:
            assert (await c.post(f"{self.url}/sim/faults", json=faults)).status_code == 200

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            await kill(self.proc, 15)


async def use(oma: Oma, sim: Sim) -> None:
    r = await oma.c.post("/api/v1/appliances", headers=oma.h, json={"action": "update", "appliance_id": "test-vma",
                                                                   "api_url": sim.url})
    assert r.status_code == 200, r.text


async def throughput(oma: Oma, vma: Sim, cloud: CloudStackSimulator, args, vc) -> None:
    vcenter = f"{vc.host}:{vc.port}"
    size = args.size_mib * MiB
    await use(oma, vma)
    vms = await oma.discover("orch-bench")
    await (await asyncio.create_subprocess_exec("sync")).wait()  # the new source disks on disk, as for nbdcopy
    t0 = time.monotonic()
    job_ids = await asyncio.gather(*(oma.start(vm) for vm in vms))
    jobs = await oma.wait(list(job_ids), "completed", "failed")
    t_oma = time.monotonic() - t0
    assert {j["status"] for j in jobs} == {"completed"}, [j["error"] for j in jobs]
    async with httpx.AsyncClient(base_url=vma.url) as c:  # the copy alone, as the VMA timed it
        spans = [(await c.get(f"/api/v1/progress/{j}")).json()["timing"] for j in job_ids]
    starts = [datetime.fromisoformat(t["start_time"].replace("Z", "+00:00")) for t in spans]
    ends = [datetime.fromisoformat(t["last_update"].replace("Z", "+00:00")) for t in spans]
    t_copy = (max(ends) - min(starts)).total_seconds()
    pairs = [(vma.layout.disk_path(vcenter, j["vm"]["path"], d["disk_id"][5:]), cloud.backing_path(d["volume_id"]),
              next(e["uri"] for e in j["nbd_exports"] if e["disk_unit_number"] == d["unit_number"]))
             for j in jobs for d in j["disks"]]
    ok = all(digest(src, size) == digest(dst, size) for src, dst, _ in pairs)
    # nbdcopy writes into unallocated space too, as the VMA did: overwriting the blocks the VMA's
    # copy allocated ran about twice as fast (measured: fresh 146-181 MB/s, overwrite 335-375 MB/s).
    for _, dst, _ in pairs:
        os.truncate(dst, 0)
        os.truncate(dst, size)
    await (await asyncio.create_subprocess_exec("sync")).wait()
    t_cp = await nbdcopy_seconds([(str(src), uri) for src, _, uri in pairs])
    ok = ok and all(digest(src, size) == digest(dst, size) for src, dst, _ in pairs)
    total = len(pairs) * size
    print(f"{len(vms)} VMs x 2 disks x {args.size_mib} MiB, through OMA -> VMA simulator -> nbdkit exports")
    print(f"  POST .. completed (OMA)  : {total / t_oma / 1e6:8.1f} MB/s  ({t_oma:.2f} s)  sha256 equal: {ok}")
    print(f"  of which the VMA's copy  : {total / t_copy / 1e6:8.1f} MB/s  ({t_copy:.2f} s, first start to last end)")
    print(f"  nbdcopy --flush, same    : {total / t_cp / 1e6:8.1f} MB/s  ({t_cp:.2f} s)")
    print(f"  ratio OMA/nbdcopy        : {t_cp / t_oma:8.2f}   (goal >= 0.8); copy alone/nbdcopy {t_cp / t_copy:.2f}")


async def follow_cpu(oma: Oma, vma: Sim, proc: asyncio.subprocess.Process, args) -> None:
    await use(oma, vma)
    vms = await oma.discover("orch-follow")
    # No copy moves until every job runs (on a loaded machine provisioning 100 jobs outlasts a copy);
    # then 4 MiB writes at 256 KiB/s: the bytes of each job move every 16 s, and a job runs about 2 minutes.
    await vma.faults(hang=True, throttle_bps=256 * 1024)  # throttled from the first step: 4 MiB each
    job_ids = []
    for i in range(0, len(vms), 10):  # in batches: provisioning 100 jobs at once is not what is measured
        job_ids += await asyncio.gather(*(oma.start(vm) for vm in vms[i:i + 10]))
    await oma.wait(job_ids, "replicating", poll=0.5)
    await vma.faults(throttle_bps=256 * 1024)
    await asyncio.sleep(8.0)  # the default window, 8..40 s after the release, sees every job move twice
    spy = None
    if args.profile:  # where the window's CPU goes: py-spy's collapsed stacks ("raw", flamegraph.pl's input)
        spy = await asyncio.create_subprocess_exec(
            "py-spy", "record", "-p", str(proc.pid), "-d", str(int(args.window)), "-r", "200", "-f", "raw",
            "-o", args.profile, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    moved0 = sum(j["bytes_transferred"] for j in await asyncio.gather(*(oma.job(j) for j in job_ids)))
    c0, t0 = cpu_seconds(proc.pid), time.monotonic()
    await asyncio.sleep(args.window)
    cpu, wall = cpu_seconds(proc.pid) - c0, time.monotonic() - t0
    if spy is not None:
        await spy.wait()
    jobs = await asyncio.gather(*(oma.job(j) for j in job_ids))
    states = {j["status"] for j in jobs}
    changes = (sum(j["bytes_transferred"] for j in jobs) - moved0) // CHUNK  # polls that saw bytes move
    polls = len(job_ids) * wall / args.poll  # job-intervals: a poll each while bytes move (fewer when quiet)
    print(f"replication following {len(job_ids)} running jobs (poll every {args.poll} s) for {args.window:g} s:")
    print(f"  CPU {100 * cpu / wall:.2f}% of a core   (goal < 5%)   {1000 * cpu / polls:.2f} ms of CPU per job and poll interval   "
          f"load average {os.getloadavg()[0]:.2f}")
    print(f"  {changes} polls saw bytes move (a progress write each); job states after the window: {sorted(states)}")


async def main(args, work: Path) -> None:
    logging.basicConfig(level=logging.ERROR)
    from oma.services.gateway.app import create_app

    db = f"oma_bench_{uuid.uuid4().hex[:8]}"
    await mariadb_exec(f"CREATE DATABASE `{db}`")
    nats = EmbeddedNats()
    (work / "dev").mkdir()
    cloud = CloudStackSimulator("bench-key", "bench-secret", device_dir=work / "dev", job_latency=0.05,
                                max_volumes=10_000, max_primary_gb=10_000_000,
                                max_data_disks=2 * args.vms + args.follow)
    cloud_url = await cloud.start()
    port = free_port()
    settings = Settings(nats_url=await nats.start(), data_dir=work / "data", appliance_tokens=f"test-vma={SEED_TOKEN}",
                        export_backend="nbdkit", nbd_port=free_port(), device_by_id_dir=work / "dev",
                        max_attached_disks=2 * args.vms + args.follow, provision_wait=0,
                        cloud_timeout=10, cloud_job_timeout=60, oma_url=f"http://127.0.0.1:{port}",
                        vma_poll_interval=args.poll, dependency_wait=60,
                        vma_stall_after=900,  # the follow part's jobs wait (hang) until all of them run
                        **mariadb_settings(db))
    proc = None
    sims = [Sim(work, "vma-copy", args.size_mib * MiB), Sim(work, "vma-follow", FOLLOW_DISK)]
    try:
        with running_vcsim() as vc:
            with vc.service_instance() as si:
                for i in range(args.vms):
                    gib = args.size_mib / 1024
                    create_vm(si, f"orch-bench{i:02d}", disks=(DiskSpec(gib, unit=0), DiskSpec(gib, unit=1)))
                for i in range(args.follow):
                    create_vm(si, f"orch-follow{i:03d}", disks=(DiskSpec(1, unit=0),))
            await sims[0].make_disks(vc, "orch-bench")  # before timing: a first copy would make them
            await sims[1].make_disks(vc, "orch-follow")
            for sim in sims:
                await sim.start()
            async with Appliance(settings, IN_PROCESS) as appliance:
                app = create_app(settings, appliance.nats_url)
                async with app.router.lifespan_context(app):
                    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, lifespan="off",
                                                           log_config=None, log_level="warning"))
                    serving = asyncio.create_task(server.serve())
                    proc = await start_service("replication", settings, work / "replication.log")
                    try:
                        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=600) as c:
                            while not server.started:
                                await asyncio.sleep(0.05)
                            oma = await setup(c, cloud_url, vc)
                            if args.vms:
                                await throughput(oma, sims[0], cloud, args, vc)
                            await follow_cpu(oma, sims[1], proc, args)
                    finally:
                        server.should_exit = True
                        await serving
    finally:
        if proc is not None:
            await kill(proc)
        for sim in sims:
            await sim.stop()
        await cloud.stop()
        await nats.stop()
        await mariadb_exec(f"DROP DATABASE IF EXISTS `{db}`")


async def setup(c: httpx.AsyncClient, cloud_url: str, vc) -> Oma:
    for _ in range(600):  # the replication process answers
        with contextlib.suppress(httpx.HTTPError):
            r = await c.post("/api/v1/auth/login", json={"appliance_id": "test-vma", "token": SEED_TOKEN})
            h = {"Authorization": f"Bearer {r.json()['session_token']}"}
            if (await c.get("/api/v1/replication/jobs", headers=h)).status_code == 200:
                break
        await asyncio.sleep(0.1)
    r = await c.post("/api/v1/ossea/config", headers=h, json={"action": "create", "configuration": {
        "name": "sim", "api_url": cloud_url, "api_key": "bench-key", "secret_key": "bench-secret",
        "zone": "OSSEA-Zone", "oma_vm_id": DEFAULT_VM_ID}})
    config_id = r.json()["configuration"]["id"]
    r = await c.post("/api/v1/vcenter/config", headers=h, json={"action": "create", "configuration": {
        "host": vc.host, "port": vc.port, "username": vc.username, "password": vc.password, "verify_tls": False,
        "appliance_id": "test-vma"}})
    assert r.status_code == 201, r.text
    return Oma(c, h, config_id, vc.host)


def cli() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vms", type=int, default=8, help="0: the CPU part only")
    p.add_argument("--size-mib", type=int, default=1024, help="size of each disk of the throughput part")
    p.add_argument("--follow", type=int, default=100, help="running jobs followed in the CPU part")
    p.add_argument("--window", type=float, default=32.0, help="seconds of CPU measurement")
    p.add_argument("--poll", type=float, default=2.0, help="OMA_VMA_POLL_INTERVAL")
    p.add_argument("--dir", default="/var/tmp")
    p.add_argument("--profile", metavar="FILE", help="py-spy record the replication process over the window")
    args = p.parse_args()
    run_in_scratch(main, args, "bench-orch-")


if __name__ == "__main__":
    cli()
