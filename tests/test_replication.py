"""The replication service through the gateway, against the in-process CloudStack simulator and a
REAL nbdkit exporter: the seed's request and reply, data written over NBD landing in the volume,
incremental reuse, progress from the VMA, events, listing, cancel/delete, validation."""
from __future__ import annotations

import asyncio
import contextlib
import copy
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator

import httpx
import orjson
import pytest
from prometheus_client import REGISTRY

from oma.plugins.ossea.simulator import DEFAULT_VM_ID, CloudStackSimulator
from oma.services.replication.service import REUSED_MESSAGE
from oma.shared.schemas import REPLICATION_EXAMPLE
from tests.conftest import assert_error_shape, login, mariadb_settings, running, wait_for
from tests.nbdutil import digest, free_port, nbdcopy, random_file

API_KEY, SECRET = "sim-key", "sim-secret"
SERVICES = ("auth", "config", "replication", "export_manager")
JOB_ID = re.compile(r"^job-\d{8}-\d{6}$")  # the seed's format
GIB = 1024 ** 3
MiB = 1 << 20
SEED_REPLY_KEYS = {"job_id", "status", "progress_percent", "source_vm", "created_volumes", "nbd_exports",
                   "started_at", "message",
                   "mounted_volumes"}  # the seed is silent; the original GUI reads it (tests/test_original_clients.py)


@dataclass
class Env:
    client: httpx.AsyncClient
    headers: dict[str, str]
    sim: CloudStackSimulator
    config_id: int
    tmp: Path
    events: list[dict[str, Any]]

    @property
    def replication(self):
        return self.client.appliance.services["replication"]

    async def post(self, body: dict[str, Any]) -> httpx.Response:
        return await self.client.post("/api/v1/replications", json=body, headers=self.headers)

    async def job(self, job_id: str) -> dict[str, Any]:
        r = await self.client.get(f"/api/v1/replication/jobs/{job_id}", headers=self.headers)
        assert r.status_code == 200, r.text
        return r.json()

    async def progress(self, job_id: str, body: dict[str, Any]) -> httpx.Response:
        return await self.client.post(f"/api/v1/replication/jobs/{job_id}/progress", json=body,
                                      headers=self.headers)

    async def delete(self, job_id: str) -> httpx.Response:
        return await self.client.delete(f"/api/v1/replication/jobs/{job_id}", headers=self.headers)

    def data_volumes(self) -> dict[str, Any]:
        return {v.id: v for v in self.sim.volumes.values() if v.type == "DATADISK"}

    def commands(self, name: str) -> list[dict[str, Any]]:
        return [c for c in self.sim.calls if c["command"] == name]


def settings_for(make_settings, tmp: Path, **overrides: Any):
    base = dict(export_backend="nbdkit", nbd_port=free_port(), device_by_id_dir=tmp / "dev", cloud_timeout=2.0,
                cloud_job_timeout=5.0, device_wait=5.0, provision_wait=30.0)
    base.update(overrides)
    return make_settings(**base)


@contextlib.asynccontextmanager
async def replication_env(make_settings, tmp_path: Path, sim_kw: dict[str, Any] | None = None,
                          services: tuple[str, ...] = SERVICES, **overrides: Any) -> AsyncIterator[Env]:
    """Simulator + auth/config/replication/export_manager + gateway, an OSSEA config pointing at it."""
    (tmp_path / "dev").mkdir(exist_ok=True)
    sim = CloudStackSimulator(API_KEY, SECRET, device_dir=tmp_path / "dev",
                              **{"job_latency": 0.05, **(sim_kw or {})})
    url = await sim.start()
    try:
        settings = settings_for(make_settings, tmp_path, **overrides)
        async with running(settings, services=services) as client:
            client.settings = settings  # type: ignore[attr-defined]
            headers = await login(client)
            r = await client.post("/api/v1/ossea/config", headers=headers, json={"action": "create", "configuration": {
                "name": "sim", "api_url": url, "api_key": API_KEY, "secret_key": SECRET, "domain": "/",
                "zone": "OSSEA-Zone", "oma_vm_id": DEFAULT_VM_ID}})
            assert r.status_code == 201, r.text
            events: list[dict[str, Any]] = []

            async def on_event(msg) -> None:
                events.append({"subject": msg.subject, **orjson.loads(msg.data)})
            bus = next(iter(client.appliance.services.values())).bus
            sub = await bus.nc.subscribe("oma.evt.replication.job.>", cb=on_event)
            try:
                yield Env(client, headers, sim, r.json()["configuration"]["id"], tmp_path, events)
            finally:
                await sub.unsubscribe()
    finally:
        await sim.stop()


def request(config_id: int, name: str = "pgtest1", disks: int = 1, *, uuid: str | None = None,
            size_gb: float = 1, kind: str = "initial", **vm: Any) -> dict[str, Any]:
    body = copy.deepcopy(REPLICATION_EXAMPLE)
    src = body["source_vm"]
    src.update(id=f"vm-{abs(hash(name)) % 10**6}", name=name, **vm)
    if uuid:
        src["uuid"] = uuid
    src["disks"] = [{"id": f"disk-{i:03d}", "path": f"[datastore1] {name}/{name}_{i}.vmdk", "size_gb": size_gb,
                     "datastore": "datastore1", "capacity_bytes": int(size_gb * GIB)} for i in range(disks)]
    body.update(ossea_config_id=config_id, replication_type=kind)
    return body


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def write_and_check(env: Env, reply: dict[str, Any], size: int = 4 * MiB) -> None:
    """nbdcopy a random file into every export; it must land in the backing file of that disk's volume."""
    volumes = {v["volume_id"] for v in reply["created_volumes"]}
    detail = await env.job(reply["job_id"])
    by_unit = {d["unit_number"]: d for d in detail["disks"]}
    for exp in reply["nbd_exports"]:
        src = random_file(env.tmp / f"src-{exp['export_name']}.bin", size)
        await nbdcopy(src, f"nbd://127.0.0.1:{exp['port']}/{exp['export_name']}", "--flush")
        volume_id = by_unit[exp["disk_unit_number"]]["volume_id"]
        assert volume_id in volumes
        assert digest(env.sim.backing_path(volume_id), size) == digest(src)


# -- the seed's request -------------------------------------------------------------------------

async def test_seed_request_gives_seed_reply_and_writes_land_in_the_volume(make_settings, tmp_path):
    async with replication_env(make_settings, tmp_path) as env:
        calls_before = metric("oma_replication_cloud_calls_total", command="createVolume", result="ok")
        body = copy.deepcopy(REPLICATION_EXAMPLE)
        body["ossea_config_id"] = env.config_id
        r = await env.post(body)
        assert r.status_code == 201, r.text
        reply = r.json()
        assert set(reply) == SEED_REPLY_KEYS, reply
        assert JOB_ID.match(reply["job_id"]), reply["job_id"]
        assert reply["status"] == "ready_for_sync" and reply["progress_percent"] == 100.0
        assert reply["source_vm"] == body["source_vm"]
        assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$", reply["started_at"])
        [vol] = reply["created_volumes"]
        assert set(vol) == {"volume_id", "volume_name", "size_gb", "status"}
        assert vol["size_gb"] == 40 and vol["status"] == "created"
        assert vol["volume_id"] in env.data_volumes()
        assert env.sim.volumes[vol["volume_id"]].size == 40 * GIB
        assert env.sim.volumes[vol["volume_id"]].vm_id == DEFAULT_VM_ID
        [exp] = reply["nbd_exports"]
        assert set(exp) == {"export_name", "device_path", "port", "uri", "reused", "vm_id", "disk_unit_number"}
        assert exp["uri"] == f"nbd://127.0.0.1:{exp['port']}/{exp['export_name']}"
        assert exp["vm_id"] == "vm-143233" and exp["disk_unit_number"] == 0 and exp["reused"] is False
        assert exp["export_name"] == "migration-vm-vm-143233-disk0"
        assert exp["device_path"] == str(env.sim.backing_path(vol["volume_id"]).resolve())
        assert exp["port"] == env.client.appliance.services["export_manager"].exporter.port
        # createVolume asked the customized offering for the rounded size
        [create] = env.commands("createVolume")
        assert create["params"]["size"] == "40"
        assert create["params"]["diskofferingid"] == "d0000000-0000-4000-8000-00000000000c"
        await write_and_check(env, reply)
        assert metric("oma_replication_cloud_calls_total", command="createVolume", result="ok") == calls_before + 1
        assert metric("oma_attached_disks") == 1


async def test_multi_disk_vm_with_uuid_and_unit_numbers(make_settings, tmp_path):
    async with replication_env(make_settings, tmp_path) as env:
        uuid = "4205784a-098a-40f1-1f1e-a5cd2597fd59"
        body = request(env.config_id, "pgtest2", disks=3, uuid=uuid, size_gb=1.2)
        body["source_vm"]["disks"][0]["unit_number"] = 2   # explicit; the others take their position (1, 2 -> clash)
        r = await env.post(body)
        assert_error_shape(r, 400)
        assert "source_vm: disks.2.unit_number" in r.json()["details"]

        body["source_vm"]["disks"][0]["unit_number"] = 5
        r = await env.post(body)
        assert r.status_code == 201, r.text
        reply = r.json()
        assert sorted(e["disk_unit_number"] for e in reply["nbd_exports"]) == [1, 2, 5]
        assert {e["vm_id"] for e in reply["nbd_exports"]} == {uuid}
        assert {e["export_name"] for e in reply["nbd_exports"]} == {f"migration-vm-{uuid}-disk{u}" for u in (1, 2, 5)}
        assert [v["size_gb"] for v in reply["created_volumes"]] == [2, 2, 2]  # 1.2 GiB rounded up
        assert len({e["device_path"] for e in reply["nbd_exports"]}) == 3
        await write_and_check(env, reply, 2 * MiB)
        # every disk's createVolume ran concurrently with the others (gather): all sent before any attach
        order = [c["command"] for c in env.sim.calls if c["command"] in ("createVolume", "attachVolume")]
        assert order[:3] == ["createVolume"] * 3


# -- incremental reuse ---------------------------------------------------------------------------

async def test_incremental_job_reuses_volumes_and_exports_and_carries_change_ids(make_settings, tmp_path):
    async with replication_env(make_settings, tmp_path) as env:
        body = request(env.config_id, "pgtest3", disks=2, uuid="4205784a-0000-40f1-1f1e-a5cd2597fd59")
        first = (await env.post(body)).json()
        assert first["status"] == "ready_for_sync"
        ids = {"0": "52 3c ec 1b-1e 7d 0c 5a/42", "1": "52 3c ec 1b-1e 7d 0c 5a/43"}
        r = await env.progress(first["job_id"], {"status": "completed", "bytes_transferred": 2 * GIB,
                                                 "total_bytes": 2 * GIB, "disks": [
            {"unit_number": 0, "change_id": ids["0"]}, {"unit_number": 1, "change_id": ids["1"]}]})
        assert r.status_code == 200 and r.json()["status"] == "completed", r.text
        done = await env.job(first["job_id"])
        assert [d["change_id"] for d in done["disks"]] == [ids["0"], ids["1"]]

        exporter = env.client.appliance.services["export_manager"].exporter
        reloads, served = exporter.reloads, exporter.list_exports()
        creates, calls = len(env.commands("createVolume")), len(env.sim.calls)
        r = await env.post({**body, "replication_type": "incremental"})
        assert r.status_code == 201, r.text
        second = r.json()
        assert second["job_id"] != first["job_id"]
        assert {v["volume_id"] for v in second["created_volumes"]} == {v["volume_id"] for v in first["created_volumes"]}
        assert all(v["status"] == "reused" for v in second["created_volumes"])
        assert [e["reused"] for e in second["nbd_exports"]] == [True, True]
        assert [e["export_name"] for e in second["nbd_exports"]] == [e["export_name"] for e in first["nbd_exports"]]
        assert second["message"] == REUSED_MESSAGE
        assert len(env.commands("createVolume")) == creates, "no new volume for an incremental job"
        assert not [c for c in env.sim.calls[calls:] if c["command"] in ("attachVolume", "detachVolume")]
        assert exporter.reloads == reloads and exporter.list_exports() == served
        detail = await env.job(second["job_id"])
        assert [d["previous_change_id"] for d in detail["disks"]] == [ids["0"], ids["1"]]
        assert [d["change_id"] for d in detail["disks"]] == [None, None]
        assert metric("oma_attached_disks") == 2  # the volumes stayed attached, counted once
        # deleting the first job now releases nothing: the second holds its volumes
        r = await env.delete(first["job_id"])
        assert r.status_code == 200 and r.json()["released_volumes"] == [], r.text
        assert len(env.data_volumes()) == 2 and exporter.list_exports() == served
        await write_and_check(env, second, 1 * MiB)

        # a third, larger VM layout: the new disk is created, the others reused
        await env.progress(second["job_id"], {"status": "completed", "disks": [
            {"unit_number": 0, "change_id": "c0-2"}, {"unit_number": 1, "change_id": "c1-2"}]})
        bigger = request(env.config_id, "pgtest3", disks=3, uuid="4205784a-0000-40f1-1f1e-a5cd2597fd59",
                         kind="incremental")
        third = (await env.post(bigger)).json()
        assert [e["reused"] for e in third["nbd_exports"]] == [True, True, False]
        assert [v["status"] for v in third["created_volumes"]] == ["reused", "reused", "created"]
        detail = await env.job(third["job_id"])
        assert [d["previous_change_id"] for d in detail["disks"]] == ["c0-2", "c1-2", None]
        assert len(env.commands("createVolume")) == creates + 1


# -- progress -----------------------------------------------------------------------------------

async def test_progress_percent_throughput_eta_order_and_errors(make_settings, tmp_path):
    async with replication_env(make_settings, tmp_path) as env:
        job = (await env.post(request(env.config_id, "pgtest4", disks=2))).json()
        job_id = job["job_id"]
        total = 10_000_000_000
        r = await env.progress(job_id, {"status": "replicating", "current_operation": "Transferring Data",
                                        "bytes_transferred": 1_000_000_000, "total_bytes": total})
        assert r.status_code == 200, r.text
        assert r.json()["progress_percent"] == 10.0 and r.json()["vma_throughput_mbps"] is None
        await asyncio.sleep(0.5)
        r = await env.progress(job_id, {"status": "replicating", "bytes_transferred": 1_050_000_000,
                                        "disks": [{"unit_number": 0, "bytes_transferred": 1_050_000_000}]})
        body = r.json()
        assert body["progress_percent"] == 10.5
        assert 60 <= body["vma_throughput_mbps"] <= 101, body   # 50 MB in ~0.5 s
        first_rate = body["vma_throughput_mbps"]
        assert body["vma_eta_seconds"] == pytest.approx((total - 1_050_000_000) / (first_rate * 1e6), rel=0.02)
        await asyncio.sleep(0.5)
        r = await env.progress(job_id, {"status": "replicating", "bytes_transferred": 1_060_000_000})
        smoothed = r.json()["vma_throughput_mbps"]
        assert smoothed < first_rate * 0.85, "a slower sample pulls the EWMA down, smoothly"
        assert smoothed > 20 / 0.5 * 0.3 * 0.5
        # an older report arriving late changes nothing
        r = await env.progress(job_id, {"status": "replicating", "current_operation": "old",
                                        "bytes_transferred": 1_020_000_000})
        assert r.status_code == 200 and r.json()["applied"] is False
        detail = await env.job(job_id)
        assert detail["bytes_transferred"] == 1_060_000_000 and detail["progress_percent"] == 10.6
        assert detail["status"] == "replicating" and detail["current_operation"] == "Transferring Data"
        assert detail["vma_throughput_mbps"] == smoothed
        assert metric("oma_vma_throughput_mbps") >= smoothed

        assert_error_shape(await env.progress("job-20250101-000000-abcdef", {"status": "replicating"}), 404)
        assert_error_shape(await env.progress(job_id, {"status": "bogus"}), 400)
        r = await env.progress(job_id, {"status": "completed", "bytes_transferred": total, "disks": [
            {"unit_number": 0, "change_id": "cid-0"}, {"unit_number": 1, "change_id": "cid-1"}]})
        assert r.json()["status"] == "completed" and r.json()["progress_percent"] == 100.0
        assert_error_shape(await env.progress(job_id, {"status": "replicating", "bytes_transferred": 1}), 409)

        # events: per-job seq from 1 without gaps, event_id = job-seq-random, the completed one with change ids
        await wait_for(lambda: _has(env.events, "oma.evt.replication.job.completed"), 5)
        mine = sorted((e for e in env.events if e["job_id"] == job_id), key=lambda e: e["seq"])
        assert [e["seq"] for e in mine] == list(range(1, len(mine) + 1))
        assert all(re.fullmatch(rf"{job_id}-{e['seq']}-[0-9a-f]{{12}}", e["event_id"]) for e in mine)
        assert len({e["event_id"] for e in mine}) == len(mine)
        subjects = [e["subject"].rsplit(".", 1)[1] for e in mine]
        assert subjects[0] == "created" and subjects[-1] == "completed"
        assert "status_changed" in subjects and subjects.count("progressed") == 3
        last = mine[-1]
        assert [d["change_id"] for d in last["disks"]] == ["cid-0", "cid-1"]
        assert last["status"] == "completed" and last["vm"]["name"] == "pgtest4"
        assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$", last["occurred_at"])
        assert {"disk_id", "volume_id", "export_name", "device_path", "unit_number"} <= set(last["disks"][0])


async def _has(events, subject):
    return any(e["subject"] == subject for e in events)


# -- validation, list, delete -------------------------------------------------------------------

async def test_validation_and_conflicts(make_settings, tmp_path):
    async with replication_env(make_settings, tmp_path) as env:
        body = request(env.config_id, "pgtest5")
        empty = copy.deepcopy(body)
        empty["source_vm"]["disks"] = []
        assert "disks" in str(assert_error_shape(await env.post(empty), 400)["details"])
        zero = copy.deepcopy(body)
        zero["source_vm"]["disks"][0]["size_gb"] = 0
        assert "size_gb" in str(assert_error_shape(await env.post(zero), 400)["details"])
        dup = request(env.config_id, "pgtest5", disks=2)
        dup["source_vm"]["disks"][1]["unit_number"] = 0
        assert "source_vm: disks.1.unit_number" in assert_error_shape(await env.post(dup), 400)["details"]
        assert_error_shape(await env.post({**body, "ossea_config_id": 999}), 404)
        assert not env.commands("createVolume")

        first = await env.post(body)
        assert first.status_code == 201
        job_id = first.json()["job_id"]
        again = assert_error_shape(await env.post(body), 409)
        assert job_id in again["details"]

        r = await env.client.post("/api/v1/ossea/config", headers=env.headers, json={
            "action": "update", "id": env.config_id, "configuration": {"is_active": False}})
        assert r.status_code == 200, r.text
        other = request(env.config_id, "pgtest6")
        assert "not active" in assert_error_shape(await env.post(other), 409)["details"]


async def test_list_filters_pagination_and_delete(make_settings, tmp_path):
    async with replication_env(make_settings, tmp_path) as env:
        ids = []
        for name in ("alpha", "beta", "gamma"):
            r = await env.post(request(env.config_id, name))
            assert r.status_code == 201, r.text
            ids.append(r.json()["job_id"])
        r = await env.client.get("/api/v1/replication/jobs", headers=env.headers, params={"limit": 2})
        page = r.json()
        assert page["success"] is True and page["total"] == 3 and page["limit"] == 2 and page["offset"] == 0
        assert [j["job_id"] for j in page["jobs"]] == [ids[2], ids[1]]
        r = await env.client.get("/api/v1/replication/jobs", headers=env.headers, params={"limit": 2, "offset": 2})
        assert [j["job_id"] for j in r.json()["jobs"]] == [ids[0]]
        r = await env.client.get("/api/v1/replication/jobs", headers=env.headers, params={"vm_name": "beta"})
        assert [j["job_id"] for j in r.json()["jobs"]] == [ids[1]]
        r = await env.client.get("/api/v1/replication/jobs", headers=env.headers,
                                 params={"status": "ready_for_sync", "since": "2000-01-01T00:00:00Z"})
        assert r.json()["total"] == 3
        r = await env.client.get("/api/v1/replication/jobs", headers=env.headers,
                                 params={"since": "2999-01-01T00:00:00Z"})
        assert r.json()["total"] == 0
        assert_error_shape(await env.client.get("/api/v1/replication/jobs", headers=env.headers,
                                                params={"status": "sleeping"}), 400)
        assert_error_shape(await env.client.get("/api/v1/replication/jobs", headers=env.headers,
                                                params={"since": "yesterday"}), 400)
        assert_error_shape(await env.client.get("/api/v1/replication/jobs/job-20250101-000000-abcd",
                                                headers=env.headers), 404)

        detail = await env.job(ids[1])
        volume_id, export = detail["disks"][0]["volume_id"], detail["disks"][0]["export_name"]
        exporter = env.client.appliance.services["export_manager"].exporter
        assert export in exporter.list_exports()
        r = await env.delete(ids[1])
        assert r.status_code == 200, r.text
        assert r.json()["status"] == "cancelled" and r.json()["released_volumes"] == [volume_id]
        assert volume_id not in env.sim.volumes
        assert export not in exporter.list_exports()
        assert (await env.job(ids[1]))["disks"][0]["status"] == "released"
        assert len(env.data_volumes()) == 2 and metric("oma_attached_disks") == 2
        assert_error_shape(await env.delete("job-20250101-000000-abcd"), 404)
        # deleting a finished job releases what it still holds
        await env.progress(ids[0], {"status": "completed"})
        r = await env.delete(ids[0])
        assert r.json()["previous_status"] == "completed" and len(r.json()["released_volumes"]) == 1
        assert len(env.data_volumes()) == 1


async def test_on_mariadb(make_settings, tmp_path, mariadb_name):
    async with replication_env(make_settings, tmp_path, **mariadb_settings(mariadb_name)) as env:
        r = await env.post(request(env.config_id, "mariavm", disks=2))
        assert r.status_code == 201, r.text
        await write_and_check(env, r.json(), 1 * MiB)
        job_id = r.json()["job_id"]
        await env.progress(job_id, {"status": "replicating", "bytes_transferred": 10_000_000,
                                    "total_bytes": 100_000_000})
        await asyncio.sleep(0.2)
        r = await env.progress(job_id, {"status": "replicating", "bytes_transferred": 50_000_000})
        assert r.json()["progress_percent"] == 50.0 and r.json()["vma_throughput_mbps"] > 0
        assert (await env.delete(job_id)).status_code == 200
        assert not env.data_volumes()


async def test_disks_on_two_controllers_with_the_same_unit_get_distinct_slots(make_settings, tmp_path):
    """scsi0:0 and scsi1:0 (as the inventory lists them) are two disks, not a duplicate."""
    async with replication_env(make_settings, tmp_path) as env:
        body = request(env.config_id, "twobus", disks=2, uuid="4205784a-0000-4000-8000-0000000000b2")
        for bus, disk in enumerate(body["source_vm"]["disks"]):
            disk.update(unit_number=0, controller_type="scsi", controller_bus_number=bus)
        r = await env.post(body)
        assert r.status_code == 201, r.text
        assert sorted(e["disk_unit_number"] for e in r.json()["nbd_exports"]) == [0, 64]  # scsi0:0, scsi1:0
        # The same controller twice is still a duplicate.
        body = request(env.config_id, "dup", disks=2)
        for disk in body["source_vm"]["disks"]:
            disk.update(unit_number=0, controller_type="scsi", controller_bus_number=0)
        detail = assert_error_shape(await env.post(body), 400)["details"]
        assert "unit_number" in detail
