"""Replication resumed after faults, against real NATS, MariaDB, nbdkit and the CloudStack simulator:
a replication process SIGKILLed while the cloud is still carrying out its createVolume / attachVolume
resumes without duplicating anything; a restart while export_manager is down waits for it instead of
failing the job; the orphan sweep releases only volumes provably OMA's and unused; a cleanup that
cannot run says why; the systemd units order replication after what it needs."""
from __future__ import annotations

import asyncio
import signal
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import delete

from oma.plugins.ossea.simulator import CUSTOM_OFFERING_ID, DEFAULT_VM_ID, GIB, Volume
from oma.services.replication.service import parse_volume_name, volume_name
from tests.conftest import mariadb_settings, wait_for
from tests.test_replication import Env, metric, replication_env, request, write_and_check
from tests.test_replication_faults import _status_is, _true, answering, kill, start_service

ROOT = Path(__file__).resolve().parents[1]


async def until_answering(env: Env, log: Path) -> None:
    """The (re)started replication process answers; if not, the failure shows its log."""
    try:
        await wait_for(lambda: answering(env), 60)
    except AssertionError:
        raise AssertionError(f"replication does not answer; its log ends:\n{log.read_text()[-3000:]}") from None


async def status_of(env: Env, job_id: str) -> str:
    return (await env.job(job_id))["status"]


async def unreferenced(env: Env) -> list[tuple[str, str]]:
    """The simulator's data volumes that no job row names: (id, name) of each."""
    r = await env.client.get("/api/v1/replication/jobs", params={"limit": 1000}, headers=env.headers)
    named = set()
    for job in r.json()["jobs"]:
        named |= {d["volume_id"] for d in (await env.job(job["job_id"]))["disks"] if d["volume_id"]}
    return sorted((v.id, v.name) for v in env.data_volumes().values() if v.id not in named)


def slow_cloud(**overrides: Any) -> dict[str, Any]:
    """Cloud timeouts long enough for a 4 s call, a short in-flight grace and provisioning lease
    (a restarted process resumes its jobs once the lease of the one it replaces lapses), replication alone."""
    return dict(services=("auth", "config", "export_manager"), provision_wait=0.3, cloud_timeout=8.0,
                cloud_job_timeout=10.0, cloud_inflight_grace=6.0, dependency_wait=30.0, provision_lease=3.0,
                **overrides)


@pytest.mark.parametrize("command", ["createVolume", "attachVolume"])
async def test_sigkill_while_the_cloud_still_works_then_restart_duplicates_nothing(
        make_settings, tmp_path, mariadb_name, command):
    """The cloud takes 4 s to act on each call; replication dies meanwhile and comes straight back.
    The resumed job waits until those calls can no longer land, then adopts what they made."""
    log = tmp_path / "replication.log"
    async with replication_env(make_settings, tmp_path, **slow_cloud(**mariadb_settings(mariadb_name))) as env:
        settings = env.client.settings
        proc = await start_service("replication", settings, log)
        try:
            await until_answering(env, log)
            env.sim.set_latency(command, 4.0)
            started = time.monotonic()
            r = await env.post(request(env.config_id, f"slow-{command}", disks=3))
            assert r.status_code == 202 and r.json()["status"] == "provisioning", r.text
            assert time.monotonic() - started < 4, "POST answers after provision_wait, not when the cloud does"
            job_id = r.json()["job_id"]
            await wait_for(lambda: _true(len(env.commands(command)) == 3), 15)
            await kill(proc)
            landed_before_restart = {v.id for v in env.data_volumes().values() if v.vm_id}
            if command == "createVolume":
                assert not env.data_volumes(), "the kill came before the cloud created anything"
            else:
                assert not landed_before_restart, "the kill came before the cloud attached anything"

            proc = await start_service("replication", settings, log)
            await until_answering(env, log)
            await wait_for(lambda: _status_is(env, job_id, "ready_for_sync"), 40)

            job = await env.job(job_id)
            volumes = [d["volume_id"] for d in job["disks"]]
            assert len(set(volumes)) == 3 and None not in volumes, job["disks"]
            assert sorted(env.data_volumes()) == sorted(volumes), "exactly one volume per disk"
            assert await unreferenced(env) == []
            assert len(env.commands("createVolume")) == 3, "nothing created twice"
            if command == "attachVolume":
                assert len(env.commands("attachVolume")) == 3, "the attachments that landed were adopted"
            assert all(env.sim.volumes[v].vm_id == DEFAULT_VM_ID for v in volumes)
            await write_and_check(env, {**job, "created_volumes": job["disks"]}, 1 << 20)
        finally:
            env.sim.reset_faults()
            await kill(proc, signal.SIGTERM)
    text = log.read_text(errors="replace")
    assert "waits for calls sent before the restart" in text
    assert "Traceback" not in text, text[-3000:]


async def test_restart_while_export_manager_is_down_resumes_when_it_returns(make_settings, tmp_path, mariadb_name):
    """replication is restarted while export_manager is stopped, which comes back 10 s later: the job
    it resumes waits for it (start-up $SRV.PING wait, then retried bus calls) and becomes ready."""
    rlog, elog = tmp_path / "replication.log", tmp_path / "export_manager.log"
    overrides = slow_cloud(**mariadb_settings(mariadb_name))
    overrides["services"] = ("auth", "config")
    async with replication_env(make_settings, tmp_path, **overrides) as env:
        settings = env.client.settings
        exporter = await start_service("export_manager", settings, elog)
        proc = await start_service("replication", settings, rlog)
        try:
            await until_answering(env, rlog)
            # export_manager answers once its NBD server runs (before, a create is refused 503)
            await wait_for(lambda: _true("service started" in elog.read_text(errors="replace")), 60)
            env.sim.set_latency("attachVolume", 2.0)
            r = await env.post(request(env.config_id, "late-exporter", disks=2))
            assert r.status_code == 202, r.text
            job_id = r.json()["job_id"]
            await wait_for(lambda: _true(len(env.commands("attachVolume")) == 2), 15)
            await kill(proc)
            await kill(exporter)
            proc = await start_service("replication", settings, rlog)
            await until_answering(env, rlog)
            for _ in range(10):  # export_manager stays away 10 s: the job waits, it does not fail
                await asyncio.sleep(1.0)
                assert await status_of(env, job_id) == "provisioning"
            exporter = await start_service("export_manager", settings, elog)
            await wait_for(lambda: _status_is(env, job_id, "ready_for_sync"), 40)
            job = await env.job(job_id)
            assert all(d["export_name"] and d["status"] == "ready" for d in job["disks"]), job["disks"]
            assert await unreferenced(env) == [] and len(env.data_volumes()) == 2
        finally:
            env.sim.reset_faults()
            await kill(proc, signal.SIGTERM)
            await kill(exporter, signal.SIGTERM)
    text = rlog.read_text(errors="replace")
    assert "start-up waits for services" in text and "export_manager" in text
    assert "Traceback" not in text, text[-3000:]


def _orphan(env: Env, name: str, vm_id: str | None = None) -> str:
    """A volume as a createVolume that landed late leaves it (straight into the simulator's state)."""
    vol = Volume(str(uuid.uuid4()), name, GIB, env.sim.offerings[CUSTOM_OFFERING_ID], vm_id=vm_id,
                 device_id=20 if vm_id else None)
    env.sim.volumes[vol.id] = vol
    return vol.id


async def test_orphan_sweep_releases_only_volumes_provably_oma_and_unused(make_settings, tmp_path):
    async with replication_env(make_settings, tmp_path, volume_sweep_interval=0.5, provision_wait=0.3,
                               cloud_job_timeout=20.0, cloud_timeout=10.0) as env:
        swept_before = metric("oma_replication_orphans_swept_total")
        cancelled = (await env.post(request(env.config_id, "gone", disks=1))).json()["job_id"]
        await wait_for(lambda: _status_is(env, cancelled, "ready_for_sync"), 10)
        assert (await env.delete(cancelled)).status_code == 200
        ready = (await env.post(request(env.config_id, "kept", disks=1))).json()["job_id"]
        await wait_for(lambda: _status_is(env, ready, "ready_for_sync"), 10)
        [held] = [d["volume_id"] for d in (await env.job(ready))["disks"]]
        env.sim.hang("attachVolume")
        busy = (await env.post(request(env.config_id, "busy", disks=1))).json()["job_id"]
        await wait_for(lambda: _true(len(env.commands("attachVolume")) == 3), 10)

        late = _orphan(env, volume_name("gone", 0, cancelled))          # landed after the cancel
        duplicate = _orphan(env, volume_name("kept", 0, ready))         # a second copy of a ready disk
        adoptable = _orphan(env, volume_name("busy", 0, busy))          # its job may still adopt it
        foreign = _orphan(env, volume_name("x", 0, "job-20200101-000000"))  # not our database's job
        unrelated = _orphan(env, "data-disk-of-someone")
        renamed = _orphan(env, volume_name("not-gone", 0, cancelled))     # our job id, another VM's name
        env.sim.vms["another-vm"] = {**env.sim.vms[DEFAULT_VM_ID], "id": "another-vm"}
        elsewhere = _orphan(env, volume_name("gone", 1, cancelled), vm_id="another-vm")  # someone uses it
        assert parse_volume_name(env.sim.volumes[late].name) == (cancelled, 0)
        assert parse_volume_name("data-disk-of-someone") is None

        await wait_for(lambda: _true(late not in env.sim.volumes and duplicate not in env.sim.volumes), 10)
        await asyncio.sleep(1.5)  # three more sweeps
        for keep in (held, adoptable, foreign, unrelated, renamed, elsewhere):
            assert keep in env.sim.volumes, env.sim.volumes[keep].name
        assert metric("oma_replication_orphans_swept_total") == swept_before + 2
        assert (await env.job(ready))["disks"][0]["volume_id"] == held
        env.sim.release()
        await wait_for(lambda: _status_is(env, busy, "ready_for_sync"), 10)
        [adopted] = [d["volume_id"] for d in (await env.job(busy))["disks"]]
        assert adopted != adoptable, "a fresh disk creates its own volume"
        await wait_for(lambda: _true(adoptable not in env.sim.volumes), 10)  # once its job is ready: swept
        assert adopted in env.sim.volumes and held in env.sim.volumes
        assert metric("oma_replication_orphans_swept_total") == swept_before + 3


async def test_cleanup_without_its_configuration_is_pending_and_says_why(make_settings, tmp_path):
    async with replication_env(make_settings, tmp_path) as env:
        r = await env.post(request(env.config_id, "orphaned-config", disks=1))
        assert r.status_code == 201, r.text
        job_id = r.json()["job_id"]
        [volume] = [v["volume_id"] for v in r.json()["created_volumes"]]
        from oma.services.config.models import OsseaConfig
        config = env.client.appliance.services["config"]
        async with config.sessions.begin() as db:  # gone behind the API's back (its guard is not ours)
            await db.execute(delete(OsseaConfig).where(OsseaConfig.id == env.config_id))
        r = await env.delete(job_id)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["released_volumes"] == [] and body["cleanup_pending"] is True, body
        assert f"OSSEA configuration {env.config_id}" in body["message"] and "no longer exists" in body["message"]
        assert volume in env.sim.volumes, "nothing was released with other credentials"
        job = await env.job(job_id)
        assert job["status"] == "cancelled" and job["cleanup_pending"] is True
        assert job["message"].startswith("Cleanup pending")
        assert await env.replication.jobs.retry_cleanups() == 1, "still pending, still retried"


def test_systemd_orders_replication_after_the_services_it_needs():
    dropin = ROOT / "ops/systemd/oma-service@replication.service.d/order.conf"
    unit: dict[str, list[str]] = {}
    for line in dropin.read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep and not line.startswith("#"):
            unit.setdefault(key.strip(), []).extend(value.split())
    for key in ("After", "Wants"):
        assert {"oma-service@config.service", "oma-service@export_manager.service"} <= set(unit[key]), unit


def test_gateway_timeouts_derive_from_settings(make_settings):
    from oma.services.gateway.routers import replications
    s = make_settings(provision_wait=7.0, request_timeout=3.0, cloud_job_timeout=11.0, cloud_timeout=2.0)
    assert replications.create_timeout(s) == 10.0
    assert replications.cancel_timeout(s) == 2 * 13.0 + 3.0
    for path in (ROOT / "services/gateway").rglob("*.py"):
        text = path.read_text()
        assert "timeout=900" not in text and "timeout=600" not in text, path
