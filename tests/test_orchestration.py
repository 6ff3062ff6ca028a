"""OMA drives the VMA (issue 16), end to end: every service on real NATS and MariaDB, the CloudStack
simulator, real nbdkit exports, vcsim, and the VMA simulator (a real libnbd copy into the exports).

A VM is discovered through the VMA, `POST /api/v1/replications` alone runs it to `completed`, the
bytes in the CloudStack volume's backing file equal the source disk, the change ids the copier
records end in the CBT history, and an incremental copies only what changed. A VMA that stops
answering makes the job `stalled`, then `failed`, its volumes kept for the retry.
"""
from __future__ import annotations

import asyncio
import contextlib
from fractions import Fraction
from pathlib import Path

import pytest
import uvicorn
from sqlalchemy import update

from oma.plugins.ossea.simulator import DEFAULT_VM_ID, CloudStackSimulator
from oma.plugins.vma.client import HttpVmaClient
from oma.plugins.vma.simulator import VmaSimulator
from oma.services.replication.driver import Follow, schedule
from oma.services.replication.models import ReplicationJob
from oma.shared.settings import SERVICES, Settings
from tests.conftest import SEED_TOKEN, assert_error_shape, free_port, login, mariadb_settings, running, wait_for
from tests.nbdutil import digest
from tests.test_replication import API_KEY, SECRET, settings_for
from tests.test_replication_faults import kill, start_service
from tests.vcsim import DiskSpec, create_vm, running_vcsim

SCALE = Fraction(1, 64)  # a 1 GiB vCenter disk is a 16 MiB simulated disk
DISK = (1 << 30) // 64
VM = "orch-vm"


@contextlib.asynccontextmanager
async def orchestrated(make_settings, tmp_path: Path, services: tuple[str, ...] = SERVICES,
                       vm_spec: dict | None = None, **overrides):
    """The appliance (gateway also on a real port, for the copier's calls), vcsim with one VM of two
    disks (and `vm_spec`'s create_vm arguments), the VMA simulator logged in as `test-vma`, and OSSEA +
    vCenter configurations."""
    (tmp_path / "dev").mkdir()
    cloud = CloudStackSimulator(API_KEY, SECRET, device_dir=tmp_path / "dev", job_latency=0.05)
    cloud_url = await cloud.start()
    port = free_port()
    settings = settings_for(make_settings, tmp_path, oma_url=f"http://127.0.0.1:{port}", vma_poll_interval=0.2,
                            **overrides)
    with running_vcsim() as vc:
        with vc.service_instance() as si:
            create_vm(si, VM, **{"disks": (DiskSpec(1, unit=0), DiskSpec(1, unit=1)), "cbt": True, **(vm_spec or {})})
        try:
            async with running(settings, services=services) as client, \
                    VmaSimulator(tmp_path / "vma", disk_scale=SCALE, verify_tls=False, appliance_id="test-vma",
                                 appliance_token=SEED_TOKEN) as vma:
                server = uvicorn.Server(uvicorn.Config(client.app, host="127.0.0.1", port=port, lifespan="off",
                                                       log_config=None))
                serving = asyncio.create_task(server.serve())
                try:
                    h = await login(client)
                    r = await client.post("/api/v1/appliances", headers=h, json={
                        "action": "update", "appliance_id": "test-vma", "api_url": vma.url})
                    assert r.status_code == 200 and r.json()["appliance"]["api_url"] == vma.url, r.text
                    r = await client.post("/api/v1/ossea/config", headers=h, json={
                        "action": "create", "configuration": {
                            "name": "sim", "api_url": cloud_url, "api_key": API_KEY, "secret_key": SECRET,
                            "zone": "OSSEA-Zone", "oma_vm_id": DEFAULT_VM_ID}})
                    assert r.status_code == 201, r.text
                    client.config_id = r.json()["configuration"]["id"]
                    client.settings = settings
                    r = await client.post("/api/v1/vcenter/config", headers=h, json={
                        "action": "create", "configuration": {
                            "host": vc.host, "port": vc.port, "username": vc.username, "password": vc.password,
                            "verify_tls": False, "appliance_id": "test-vma"}})
                    assert r.status_code == 201 and r.json()["configuration"]["appliance_id"] == "test-vma", r.text
                    yield client, h, cloud, vma, vc
                finally:
                    server.should_exit = True
                    await serving
        finally:
            await cloud.stop()


async def discovered_vm(client, h, vc) -> dict:
    r = await client.get("/api/v1/vms/discover", params={"vcenter": vc.host}, headers=h)
    assert r.status_code == 200, r.text
    vm = next(v for v in r.json()["vms"] if v["name"] == VM)
    assert [(d["unit_number"], d["capacity_bytes"]) for d in vm["disks"]] == [(0, 1 << 30), (1, 1 << 30)]
    assert vm["snapshot_count"] is None  # unknown: the VMA's /discover does not report snapshots
    return vm


async def job_in(client, h, job_id: str, *statuses: str, timeout: float = 60) -> dict:
    async def check():
        r = await client.get(f"/api/v1/replication/jobs/{job_id}", headers=h)
        return r.json() if r.json()["status"] in statuses else None
    return await wait_for(check, timeout=timeout, interval=0.1)


async def start(client, h, vm: dict, kind: str = "initial") -> str:
    r = await client.post("/api/v1/replications", headers=h, json={
        "source_vm": vm, "ossea_config_id": client.config_id, "replication_type": kind})
    assert r.status_code in (201, 202), r.text
    return r.json()["job_id"]


def assert_volumes_equal_source(cloud, vma, vc, vm: dict, job: dict) -> None:
    for d in job["disks"]:
        source = vma.disk_path(f"{vc.host}:{vc.port}", vm["path"], d["disk_id"].removeprefix("disk-"))
        assert digest(cloud.backing_path(d["volume_id"]), DISK) == digest(source), d


class ReplicationApart:
    """`oma-service replication` as its own process, to be SIGKILLed and started again."""

    def __init__(self, client, h, log: Path) -> None:
        self.client, self.h, self.log, self.proc = client, h, log, None

    async def start(self) -> None:
        self.proc = await start_service("replication", self.client.settings, self.log)

        async def answering():
            return (await self.client.get("/api/v1/replication/jobs", headers=self.h)).status_code == 200
        await wait_for(answering, timeout=60)

    async def kill(self) -> None:
        await kill(self.proc)


@contextlib.asynccontextmanager
async def replication_apart(make_settings, tmp_path: Path, mariadb_name: str):
    """`orchestrated` on MariaDB with replication apart: (client, h, cloud, vma, vc, replication); its
    log must hold no traceback at the end."""
    others = tuple(s for s in SERVICES if s != "replication")
    async with orchestrated(make_settings, tmp_path, services=others, dependency_wait=30,
                            **mariadb_settings(mariadb_name)) as (client, h, cloud, vma, vc):
        rep = ReplicationApart(client, h, tmp_path / "replication.log")
        await rep.start()
        try:
            yield client, h, cloud, vma, vc, rep
        finally:
            await rep.kill()
    text = rep.log.read_text(errors="replace")
    assert "Traceback" not in text, text[-3000:]


async def test_a_job_runs_to_the_end_through_the_vma(make_settings, tmp_path):
    async with orchestrated(make_settings, tmp_path) as (client, h, cloud, vma, vc):
        vm = await discovered_vm(client, h, vc)
        job_id = await start(client, h, vm)
        job = await job_in(client, h, job_id, "completed", "failed")
        assert job["status"] == "completed", job
        assert job["bytes_transferred"] == 2 * DISK and job["progress_percent"] == 100.0
        assert_volumes_equal_source(cloud, vma, vc, vm, job)
        # The copier recorded each disk's change id through OMA's routes, with its bearer token.
        posts = [c for c in vma.reporter.calls if c["method"] == "POST"]
        assert len(posts) == 2 and all(c["sent"] and c["status"] == 200 for c in posts), posts
        assert {d["disk_id"]: d["change_id"] for d in job["disks"]} == \
            {c["body"]["disk_id"]: c["body"]["change_id"] for c in posts}

        async def context_done():
            r = await client.get(f"/api/v1/vm-contexts/{VM}", headers=h)
            return r.json() if r.status_code == 200 and r.json()["context"]["current_status"] == "completed" \
                else None
        ctx = await wait_for(context_done, timeout=20)
        assert ctx["current_job"]["id"] == job_id
        assert {c["change_id"] for c in ctx["cbt_history"]} == {d["change_id"] for d in job["disks"]}

        # The copier's lookup: the last change id; an unknown disk or VM answers empty, not 404.
        r = await client.get("/api/v1/replications/changeid", headers=h,
                             params={"vm_path": vm["path"], "disk_id": job["disks"][0]["disk_id"]})
        assert r.status_code == 200 and r.json()["change_id"] == job["disks"][0]["change_id"], r.text
        for params in ({"vm_path": vm["path"], "disk_id": "disk-9999"},
                       {"vm_path": "/DC0/vm/nope", "disk_id": "disk-2000"}):
            r = await client.get("/api/v1/replications/changeid", headers=h, params=params)
            assert r.status_code == 200 and r.json()["change_id"] == "", r.text
        assert_error_shape(await client.get("/api/v1/replications/changeid", params={
            "vm_path": vm["path"], "disk_id": "disk-2000"}), 401)
        assert_error_shape(await client.post(f"/api/v1/replications/{job_id}/changeid", headers=h, json={
            "change_id": "x", "disk_id": "disk-9999"}), 404)
        r = await client.post("/api/v1/appliances", headers=h, json={"action": "get"})
        assert [(a["appliance_id"], a["reachable"]) for a in r.json()["appliances"]] == [("test-vma", True)]
        assert r.json()["appliances"][0]["last_seen"]
        assert_error_shape(await client.post("/api/v1/appliances", headers=h, json={"action": "update"}), 400)
        assert_error_shape(await client.post("/api/v1/appliances", headers=h, json={
            "action": "update", "appliance_id": "nope", "api_url": "http://127.0.0.1:1"}), 404)
        assert_error_shape(await client.post("/api/v1/appliances", headers=h, json={
            "action": "update", "appliance_id": "test-vma", "api_url": "file:///etc/passwd"}), 400)

        # A guest writes 1% of disk 0; the incremental moves only that, and the volumes match again.
        written = (await vma.mutate(vm["path"], vm["disks"][0]["id"], 1))["bytes_written"]
        inc_id = await start(client, h, vm, "incremental")
        inc = await job_in(client, h, inc_id, "completed", "failed")
        assert inc["status"] == "completed", inc
        assert 0.005 * DISK <= inc["bytes_transferred"] <= 0.02 * DISK and inc["bytes_transferred"] == written
        assert [d["previous_change_id"] for d in inc["disks"]] == [d["change_id"] for d in job["disks"]]
        assert_volumes_equal_source(cloud, vma, vc, vm, inc)


async def test_a_ready_job_met_by_start_up_recovery_is_started_once(make_settings, tmp_path):
    """Start-up recovery (in the background, once the services answer) can meet a job that became
    ready meanwhile: its sync is started once, not a second /replicate that the VMA refuses and
    that failed the job (seen in CI on a loaded machine)."""
    async with orchestrated(make_settings, tmp_path) as (client, h, cloud, vma, vc):
        vm = await discovered_vm(client, h, vc)
        r = await client.post("/api/v1/replications", headers=h, json={
            "source_vm": vm, "ossea_config_id": client.config_id, "replication_type": "initial",
            "start_sync": False})  # ready, not started: the two starts below race for it
        assert r.status_code == 201, r.text
        job_id = r.json()["job_id"]
        replication = client.appliance.services["replication"]
        async with replication.sessions.begin() as db:
            await db.execute(update(ReplicationJob).where(ReplicationJob.job_id == job_id).values(start_sync=None))
        driver = replication.jobs.driver
        await asyncio.gather(driver.start(job_id), driver.resume())
        done = await job_in(client, h, job_id, "completed", "failed")
        assert done["status"] == "completed", done
        assert vma.replicate_calls[job_id] == 1


def test_a_quiet_job_is_polled_less_often_and_a_stall_is_still_seen_in_time():
    """The CPU of following many jobs (issue 16): each poll that sees nothing move doubles the job's
    wait, up to 4 intervals and at most a quarter of vma_stall_after; a move brings back every interval.
    `due` is half an interval early: the loop's round that comes then polls it."""
    f = Follow("job-1", "vma-01", client=None)  # type: ignore[arg-type]

    def waits(settings: Settings, *moves: bool) -> list[float]:
        out = []
        for moved in moves:
            schedule(f, moved, 100.0, settings)
            out.append(round(f.due - 100.0 + settings.vma_poll_interval / 2, 3))
        return out
    default = Settings(vma_poll_interval=2.0, vma_stall_after=60.0)
    assert waits(default, True, False, False, False, False, True) == [2.0, 4.0, 8.0, 8.0, 8.0, 2.0]
    tight = Settings(vma_poll_interval=0.2, vma_stall_after=1.0)  # as the stall test below
    assert waits(tight, False, False, False) == [0.25, 0.25, 0.25]
    assert waits(Settings(vma_poll_interval=1.0, vma_stall_after=2.0), False) == [pytest.approx(1.0)]


async def test_a_vma_that_stops_answering_stalls_then_fails_and_a_retry_completes(make_settings, tmp_path):
    async with orchestrated(make_settings, tmp_path, vma_stall_after=1.0, vma_fail_after=4.0) as \
            (client, h, cloud, vma, vc):
        vm = await discovered_vm(client, h, vc)
        await vma.set_faults(throttle_bps=DISK // 4)  # several seconds: time to drop the tunnel mid-copy
        job_id = await start(client, h, vm)
        await job_in(client, h, job_id, "replicating")
        await vma.refuse()
        stalled = await job_in(client, h, job_id, "stalled", timeout=20)
        assert "the VMA does not answer" in stalled["current_operation"], stalled

        async def health_says_so():  # a field and a warning, not a degraded /health
            r = await client.get("/health")
            vmas = r.json()["services"]["replication"].get("vmas") or {}
            return r if vmas.get("unreachable") == ["test-vma"] and vmas.get("waiting_jobs") == 1 else None
        r = await wait_for(health_says_so, timeout=10)
        assert r.status_code == 200 and any("VMA unreachable" in w for w in r.json()["warnings"]), r.text
        failed = await job_in(client, h, job_id, "failed", timeout=20)
        assert "did not answer" in failed["error"] and "cannot connect" in failed["error"], failed
        assert all(d["attached"] and d["export_name"] for d in failed["disks"])  # kept for the retry
        await vma.accept()
        await vma.clear_faults()
        r = await client.post("/api/v1/appliances", headers=h, json={"action": "get"})
        assert r.json()["appliances"][0]["reachable"] is False
        retry_id = await start(client, h, vm)
        retry = await job_in(client, h, retry_id, "completed", "failed")
        assert retry["status"] == "completed", retry
        assert [d["volume_id"] for d in retry["disks"]] == [d["volume_id"] for d in failed["disks"]]
        assert_volumes_equal_source(cloud, vma, vc, vm, retry)

        # DELETE of a running sync stops the copy on the VMA (its /cleanup) before the volumes go.
        await vma.set_faults(throttle_bps=DISK // 8)
        running_id = await start(client, h, vm)
        await job_in(client, h, running_id, "replicating")
        r = await client.delete(f"/api/v1/replication/jobs/{running_id}", headers=h)
        assert r.status_code == 200 and r.json()["previous_status"] == "replicating", r.text
        async with HttpVmaClient(vma.url) as direct:
            assert (await direct.progress(running_id)).status == "cancelled"


async def test_replication_killed_mid_copy_follows_the_sync_again_after_a_restart(make_settings, tmp_path,
                                                                                   mariadb_name):
    async with replication_apart(make_settings, tmp_path, mariadb_name) as (client, h, cloud, vma, vc, rep):
        vm = await discovered_vm(client, h, vc)
        await vma.set_faults(throttle_bps=DISK // 4)  # about 8 s for both disks
        job_id = await start(client, h, vm)
        await job_in(client, h, job_id, "replicating", timeout=60)
        await rep.kill()
        await rep.start()
        job = await job_in(client, h, job_id, "completed", "failed", timeout=60)
        assert job["status"] == "completed", job
        assert_volumes_equal_source(cloud, vma, vc, vm, job)


async def test_replication_killed_during_the_replicate_call_follows_that_one_sync(make_settings, tmp_path,
                                                                                    mariadb_name):
    """SIGKILL at the moment replication asked the VMA to start the sync (the VMA's answer held back,
    the copy already running): the job was never recorded `replicating`. The copy ends while nobody
    follows it; after the restart the job completes on that sync: no second sync, nothing left over."""
    async with replication_apart(make_settings, tmp_path, mariadb_name) as (client, h, cloud, vma, vc, rep):
        vm = await discovered_vm(client, h, vc)
        await vma.set_faults(replicate_delay=60)
        job_id = await start(client, h, vm)

        async def asked():
            return vma.jobs.get(job_id)
        sync = await wait_for(asked, timeout=60)
        await rep.kill()

        async def copied():
            return sync.finished
        await wait_for(copied, timeout=30)
        assert sync.status == "completed", sync.errors
        await vma.clear_faults()
        await rep.start()
        job = await job_in(client, h, job_id, "completed", "failed", timeout=60)
        assert job["status"] == "completed", job
        assert vma.jobs[job_id] is sync, "the restart followed the sync the VMA ran; it started none"
        records = [c for c in vma.reporter.calls if c["method"] == "POST"]
        assert sorted(c["body"]["disk_id"] for c in records) == sorted(d["disk_id"] for d in job["disks"])
        assert_volumes_equal_source(cloud, vma, vc, vm, job)
        volumes = {v.id: v for v in cloud.volumes.values() if v.type == "DATADISK"}
        assert set(volumes) == {d["volume_id"] for d in job["disks"]}, "no volume left over"
        assert all(v.vm_id == DEFAULT_VM_ID for v in volumes.values())
        exporter = client.appliance.services["export_manager"].exporter
        assert set(exporter.list_exports()) == {d["export_name"] for d in job["disks"]}, "no export left over"
    assert "sync already started on the VMA before a restart" in rep.log.read_text(errors="replace"), \
        "resumed from ready_for_sync"


def test_oma_admin_registers_a_vma_with_its_api_url(tmp_path, mariadb_name):
    """`oma-admin appliance add NAME --api-url URL`: listed with the URL; a bad URL is refused."""
    import json

    from tests.test_gui_accounts import oma_admin
    db = mariadb_settings(mariadb_name)
    r = oma_admin(db, tmp_path, "appliance", "add", "vma-01", "--api-url", "http://10.0.0.5:9081/")
    assert r.returncode == 0 and "token (shown once): vma_" in r.stdout, r.stderr
    r = oma_admin(db, tmp_path, "appliance", "add", "vma-02")
    assert r.returncode == 0, r.stderr
    listed = {a["appliance_id"]: a for a in map(json.loads, oma_admin(db, tmp_path, "appliance", "list")
                                                  .stdout.splitlines())}
    assert (listed["vma-01"]["api_url"], listed["vma-01"]["reachable"]) == ("http://10.0.0.5:9081", None)
    assert listed["vma-02"]["api_url"] == "http://127.0.0.1:9081"  # the reverse tunnel
    r = oma_admin(db, tmp_path, "appliance", "add", "vma-03", "--api-url", "ftp://x")
    assert r.returncode == 1 and "api_url" in r.stderr
