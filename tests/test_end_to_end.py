"""The whole appliance in one flow, every service and real peers: a VM created in vcsim is
discovered, posted as it is listed to /api/v1/replications (CloudStack simulator, real nbdkit),
data streamed into its exports lands in the volumes, the VMA's progress and change ids show in the
VM context, and the next incremental sync reuses everything."""
from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from oma.plugins.ossea.simulator import DEFAULT_VM_ID, CloudStackSimulator
from oma.shared.settings import SERVICES
from tests.conftest import login, running, wait_for
from tests.nbdutil import MiB, digest, nbdcopy, random_file
from tests.test_replication import API_KEY, SECRET, settings_for
from tests.vcsim import DiskSpec, create_vm, running_vcsim


@dataclass
class Appliance:
    client: Any
    h: dict[str, str]  # the session's Authorization header
    sim: CloudStackSimulator
    vc: Any
    config_id: int


@contextlib.asynccontextmanager
async def appliance(make_settings, tmp_path: Path, vm_name: str, **vm: Any) -> AsyncIterator[Appliance]:
    """Every service, a CloudStack simulator with an OSSEA configuration on it, and vcsim holding
    VM `vm_name` (tests/vcsim.py create_vm keywords), configured and discovered."""
    (tmp_path / "dev").mkdir()
    sim = CloudStackSimulator(API_KEY, SECRET, device_dir=tmp_path / "dev", job_latency=0.05)
    url = await sim.start()
    with contextlib.ExitStack() as stack:
        vc = stack.enter_context(running_vcsim())
        with vc.service_instance() as si:
            create_vm(si, vm_name, **vm)
        try:
            async with running(settings_for(make_settings, tmp_path), services=SERVICES) as client:
                h = await login(client)
                r = await client.post("/api/v1/ossea/config", headers=h, json={"action": "create", "configuration": {
                    "name": "sim", "api_url": url, "api_key": API_KEY, "secret_key": SECRET,
                    "zone": "OSSEA-Zone", "oma_vm_id": DEFAULT_VM_ID}})
                assert r.status_code == 201, r.text
                config_id = r.json()["configuration"]["id"]
                r = await client.post("/api/v1/vcenter/config", headers=h, json={"action": "create", "configuration": {
                    "host": vc.host, "port": vc.port, "username": vc.username, "password": vc.password,
                    "verify_tls": False}})
                assert r.status_code == 201, r.text
                r = await client.get("/api/v1/vms/discover", params={"vcenter": vc.host}, headers=h)
                assert r.status_code == 200 and r.json()["summary"]["new"] >= 1, r.text
                yield Appliance(client, h, sim, vc, config_id)
        finally:
            await sim.stop()


async def test_discover_replicate_stream_progress_and_reuse(make_settings, tmp_path: Path):
    async with appliance(make_settings, tmp_path, "e2e-vm", disks=(DiskSpec(1, unit=0), DiskSpec(2, unit=1)),
                         cbt=True) as env:
        client, h, sim, config_id = env.client, env.h, env.sim, env.config_id
        listed = (await client.get("/api/v1/vms", params={"name": "e2e-vm"}, headers=h)).json()["vms"]
        assert len(listed) == 1
        vm = listed[0]
        assert [d["unit_number"] for d in vm["disks"]] == [0, 1]

        # The listed VM, posted as it is.
        r = await client.post("/api/v1/replications", headers=h, json={
            "source_vm": vm, "ossea_config_id": config_id, "replication_type": "initial"})
        assert r.status_code == 201, r.text
        job = r.json()
        assert job["status"] == "ready_for_sync" and job["progress_percent"] == 100.0
        exports = sorted(job["nbd_exports"], key=lambda e: e["disk_unit_number"])
        assert [e["export_name"] for e in exports] == [
            f"migration-vm-{vm['uuid']}-disk0", f"migration-vm-{vm['uuid']}-disk1"]
        assert [v["size_gb"] for v in job["created_volumes"]] == [1, 2]

        # The VMA streams disk 0; the bytes land in the volume the job created.
        data = random_file(tmp_path / "disk0.bin", 8 * MiB)
        port = exports[0]["port"]
        await nbdcopy(data, f"nbd://127.0.0.1:{port}/{exports[0]['export_name']}")
        detail = (await client.get(f"/api/v1/replication/jobs/{job['job_id']}", headers=h)).json()
        volume0 = next(d["volume_id"] for d in detail["disks"] if d["unit_number"] == 0)
        assert digest(sim.backing_path(volume0), 8 * MiB) == digest(data)

        # Progress, then completion with change ids.
        total = 3 * 1024 ** 3
        base = f"/api/v1/replication/jobs/{job['job_id']}/progress"
        r = await client.post(base, headers=h, json={"status": "replicating", "current_operation":
                                                     "Transferring Data", "bytes_transferred": total // 2,
                                                     "total_bytes": total})
        assert r.status_code == 200, r.text
        r = await client.post(base, headers=h, json={
            "status": "completed", "bytes_transferred": total, "total_bytes": total,
            "disks": [{"unit_number": 0, "change_id": "52 aa-01/7"}, {"unit_number": 1, "change_id": "52 aa-02/9"}]})
        assert r.status_code == 200, r.text

        async def context_completed():
            r = await client.get("/api/v1/vm-contexts/e2e-vm", headers=h)
            return r.json() if r.status_code == 200 and r.json()["context"]["current_status"] == "completed" else None
        ctx = await wait_for(context_completed, timeout=20)
        assert ctx["context"]["total_jobs_run"] == 1 and ctx["context"]["successful_jobs"] == 1
        assert ctx["current_job"]["id"] == job["job_id"]
        assert {c["change_id"] for c in ctx["cbt_history"]} == {"52 aa-01/7", "52 aa-02/9"}
        assert len(ctx["disks"]) == 2

        # The next sync reuses volumes and exports.
        creates = sum(1 for c in sim.calls if c["command"] == "createVolume")
        r = await client.post("/api/v1/replications", headers=h, json={
            "source_vm": vm, "ossea_config_id": config_id, "replication_type": "incremental"})
        assert r.status_code == 201, r.text
        again = r.json()
        assert all(e["reused"] for e in again["nbd_exports"])
        assert sorted(e["export_name"] for e in again["nbd_exports"]) == [e["export_name"] for e in exports]
        assert sum(1 for c in sim.calls if c["command"] == "createVolume") == creates
        listed = (await client.get("/api/v1/vm-contexts", headers=h)).json()
        assert any(c["vm_name"] == "e2e-vm" for c in listed["vm_contexts"])
