"""Two `oma-service replication` processes against one MariaDB. Admission is decided in the database:
with 20 jobs posted at once, the disks attached to the appliance VM, sampled in the simulator through
the whole run, never exceed OMA_MAX_ATTACHED_DISKS; both processes admit jobs; every job completes.
Leases: a copy resumes a job only when the copy provisioning it is gone."""
from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

from sqlalchemy import update

from oma.plugins.ossea.simulator import DEFAULT_VM_ID
from oma.services.replication.models import ReplicationJob
from tests.conftest import mariadb_settings, wait_for
from tests.test_replication import Env, replication_env, request
from tests.test_replication_faults import _true, answering, kill, start_service
from tests.test_replication_resume import unreferenced

MAX_DISKS = 5
JOBS = 20


def attached(env: Env) -> int:
    return sum(v.vm_id == DEFAULT_VM_ID for v in env.data_volumes().values())


async def finish_ready_jobs(env: Env, job_ids: list[str], done: set[str]) -> bool:
    """Play the VMA: every ready job completes, then all are deleted at once (their disks released,
    and both processes admit the queued jobs concurrently). True when all jobs are done."""
    ready = []
    for job_id in (j for j in job_ids if j not in done):
        job = await env.job(job_id)
        assert job["status"] not in ("failed", "cancelled"), job
        if job["status"] == "ready_for_sync":
            r = await env.progress(job_id, {"status": "completed", "bytes_transferred": 1 << 30})
            assert r.status_code == 200, r.text
            ready.append(job_id)
    for r in await asyncio.gather(*(env.delete(job_id) for job_id in ready)):
        assert r.status_code == 200 and r.json()["released_volumes"], r.text
    done.update(ready)
    return len(done) == len(job_ids)


async def test_two_replication_processes_never_over_admit(make_settings, tmp_path: Path, mariadb_name):
    logs = [tmp_path / "replication-1.log", tmp_path / "replication-2.log"]
    async with replication_env(make_settings, tmp_path, services=("auth", "config", "export_manager"),
                               sim_kw={"job_latency": 0.1}, max_attached_disks=MAX_DISKS, provision_wait=0.2,
                               volume_sweep_interval=0, **mariadb_settings(mariadb_name)) as env:
        settings = env.client.settings
        procs = []
        try:
            for log in logs:  # one after the other: the first runs the migrations
                procs.append(await start_service("replication", settings, log))
                await wait_for(lambda: answering(env), 60)
            samples: list[int] = []

            async def sample() -> None:
                while True:
                    samples.append(attached(env))
                    await asyncio.sleep(0.005)
            sampler = asyncio.create_task(sample())
            try:
                replies = await asyncio.gather(*(env.post(request(env.config_id, f"adm-{i}", disks=1 + i % 2))
                                                 for i in range(JOBS)))
                assert all(r.status_code in (201, 202) for r in replies), [r.text for r in replies]
                job_ids = [r.json()["job_id"] for r in replies]
                assert len(set(job_ids)) == JOBS
                assert any(r.json()["status"] == "queued" for r in replies), "the run must hit the limit"
                done: set[str] = set()

                async def all_done() -> bool:
                    return await finish_ready_jobs(env, job_ids, done)
                await wait_for(all_done, 180, interval=0.1)
            finally:
                sampler.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await sampler
            assert max(samples) <= MAX_DISKS, f"over-admitted: {max(samples)} disks attached at once"
            assert max(samples) >= MAX_DISKS - 1, "the limit was never approached: the test proves nothing"
            assert env.data_volumes() == {} and await unreferenced(env) == []
            assert env.sim.hazards == []
            assert len(env.commands("createVolume")) == sum(1 + i % 2 for i in range(JOBS)), "nothing made twice"
        finally:
            for proc in procs:
                await kill(proc)
    texts = [log.read_text(errors="replace") for log in logs]
    for text in texts:  # both decided admissions (a queued job is admitted by whichever releases disks)
        assert "queued replication job admitted" in text, "both processes admitted jobs"
        assert "Traceback" not in text, text[-3000:]
        assert "interrupted" not in text, "a live copy's job was resumed by the other"
    assert sum(t.count('"replication job created"') for t in texts) == JOBS


async def test_a_surviving_copy_resumes_the_jobs_of_a_dead_one(make_settings, tmp_path: Path, mariadb_name):
    """The copy provisioning a job is SIGKILLed while the cloud works on its attaches; the other copy,
    still running, claims the job once its lease lapses and finishes it: nothing made twice."""
    logs = [tmp_path / "replication-1.log", tmp_path / "replication-2.log"]
    async with replication_env(make_settings, tmp_path, services=("auth", "config", "export_manager"),
                               provision_wait=0.2, provision_lease=2.0, cloud_inflight_grace=3.0,
                               cloud_timeout=8.0, cloud_job_timeout=10.0, volume_sweep_interval=0,
                               **mariadb_settings(mariadb_name)) as env:
        settings = env.client.settings
        procs = []
        try:
            for log in logs:
                procs.append(await start_service("replication", settings, log))
                await wait_for(lambda: answering(env), 60)
            env.sim.set_latency("attachVolume", 2.0)
            r = await env.post(request(env.config_id, "orphaned-job", disks=2))
            assert r.status_code == 202, r.text
            job_id = r.json()["job_id"]
            owner = next(i for i, log in enumerate(logs) if job_id in log.read_text())
            await wait_for(lambda: _true(len(env.commands("attachVolume")) == 2), 15)
            await kill(procs[owner])
            survivor = logs[1 - owner]

            async def ready() -> bool:  # a request the dead copy was still subscribed for may get 503
                r = await env.client.get(f"/api/v1/replication/jobs/{job_id}", headers=env.headers)
                return r.status_code == 200 and r.json()["status"] == "ready_for_sync"
            await wait_for(ready, 40)
            assert "replication job interrupted by a restart; resuming" in survivor.read_text()
            assert len(env.commands("createVolume")) == 2, "nothing created twice"
            assert len(env.data_volumes()) == 2 and await unreferenced(env) == []
            assert env.sim.hazards == []
        finally:
            env.sim.reset_faults()
            for proc in procs:
                await kill(proc)


async def test_a_job_cancelled_by_another_copy_stops_provisioning_here(make_settings, tmp_path: Path):
    """What a DELETE on another copy leaves in the database (status cancelled) stops this copy's
    provisioning at its next lease round; what it made afterwards is released by the orphan sweep."""
    async with replication_env(make_settings, tmp_path, provision_wait=0.2) as env:
        env.sim.set_latency("attachVolume", 1.5)
        r = await env.post(request(env.config_id, "cancelled-elsewhere", disks=2))
        assert r.status_code == 202, r.text
        job_id = r.json()["job_id"]
        jobs = env.replication.jobs
        assert job_id in jobs._running
        async with jobs.sessions.begin() as db:  # as the other copy's cancel leaves it
            await db.execute(update(ReplicationJob).where(ReplicationJob.job_id == job_id)
                             .values(status="cancelled", cleanup_pending=True))
        await jobs.renew_leases()
        await wait_for(lambda: _true(job_id not in jobs._running), 0.5)  # at once, not when done
        await asyncio.sleep(2.0)  # the attaches the cloud was still running land
        await jobs.retry_cleanups()
        await jobs.sweep_orphans()
        assert env.data_volumes() == {} and env.sim.hazards == []
