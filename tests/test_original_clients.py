"""The original appliance's GUI and scheduler as clients (issue 21): their exact requests, replayed
authenticated against the whole appliance (vcsim, CloudStack simulator, real nbdkit), and every
field they read is there with a type they can use. Where the seed is silent, this is the contract."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.conftest import assert_error_shape, wait_for
from tests.test_end_to_end import appliance
from tests.vcsim import DiskSpec

OPT_STR = (str, type(None))
NUMBER = (int, float)

# What the original GUI reads, with the types it copes with.
CREATE_READS = {"job_id": str, "status": str, "progress_percent": NUMBER, "created_volumes": list,
                "mounted_volumes": list, "nbd_exports": list}
MOUNTED_READS = {"ossea_volume_id": str, "device_path": OPT_STR, "mount_point": OPT_STR, "status": str,
                 "disk_unit_number": int}
JOB_READS = {"job_id": str, "status": str, "vma_sync_type": str, "progress_percent": NUMBER}
LIST_READS = {"vm_name": str, "current_status": str, "current_job_id": OPT_STR, "total_jobs_run": int,
              "last_job_at": OPT_STR, "updated_at": str}
CONTEXT_READS = {"vmware_vm_id": str, "vcenter_host": str, "last_job_at": str, "cpu_count": int,
                 "memory_mb": int, "os_type": str, "power_state": str}
CURRENT_JOB_READS = {"id": str, "status": str, "vma_sync_type": str, "progress_percent": NUMBER}
SCHEDULER = {"schedule_execution_id": "sched-exec-0042", "vm_group_id": "group-db", "scheduled_by": "scheduler"}


def reads(body: dict[str, Any], fields: dict[str, Any], where: str) -> None:
    for name, types in fields.items():
        assert name in body, f"{where}: {name} missing from {sorted(body)}"
        assert isinstance(body[name], types), f"{where}.{name}: {body[name]!r} is not {types}"


async def test_original_gui_and_scheduler_requests(make_settings, tmp_path: Path):
    async with appliance(make_settings, tmp_path, "orig-vm", disks=(DiskSpec(1, unit=0), DiskSpec(1, unit=1)),
                         cbt=True, cpus=4, memory_mb=4096, guest_id="rhel8_64Guest", power_on=True) as env:
        client, h, sim, vc, config_id = env.client, env.h, env.sim, env.vc, env.config_id
        [vm] = (await client.get("/api/v1/vms", params={"name": "orig-vm"}, headers=h)).json()["vms"]
        source_vm = {k: vm[k] for k in ("id", "name", "path", "datacenter", "cpus", "memory_mb", "disks")}

        def request(**fields: Any) -> dict[str, Any]:
            return {"source_vm": source_vm, "ossea_config_id": config_id, "replication_type": "initial",
                    "vcenter_host": vc.host, "datacenter": vm["datacenter"], "target_network": "OSSEA-L2",
                    "snapshot_id": "snapshot-7", **fields}

        async def post(body: dict[str, Any]):
            return await client.post("/api/v1/replications", headers=h, json=body)

        # Refused before anything is created: an unlisted key, and fields that contradict the VM.
        r = await post(request(priority="high"))
        assert_error_shape(r, 400)
        assert "Extra inputs are not permitted" in str(r.json()["details"]) and "priority" in str(r.json())
        r = await post(request(vcenter_host="other-vcenter.example.com"))
        assert_error_shape(r, 400)
        assert "vcenter_host" in r.json()["details"] and "not in the inventory" in r.json()["details"]
        r = await post(request(datacenter="OtherDC"))
        assert_error_shape(r, 400)
        assert "datacenter" in r.json()["details"]
        for bad in ({"target_network": "x" * 256}, {"snapshot_id": "a\nb"}, {"vm_group_id": ["g"]},
                    {"change_id": 42}, {"scheduled_by": None, "existing_context_id": "c" * 300}):
            assert_error_shape(await post(request(**bad)), 400)
        assert not [c for c in sim.calls if c["command"] == "createVolume"]

        # The GUI's initial replication: everything it sends, and what it reads back.
        r = await post(request(change_id="", previous_change_id=None, **SCHEDULER,
                               existing_context_id="ctx-orig-vm-20250909-113839"))
        assert r.status_code == 201, r.text
        job = r.json()
        reads(job, CREATE_READS, "create")
        assert len(job["mounted_volumes"]) == 2
        for m in job["mounted_volumes"]:
            reads(m, MOUNTED_READS, "mounted_volumes[]")
            assert m["mount_point"] is None and m["status"] == "ready"
        assert {m["ossea_volume_id"] for m in job["mounted_volumes"]} == \
            {v["volume_id"] for v in job["created_volumes"]}
        assert sorted(m["disk_unit_number"] for m in job["mounted_volumes"]) == [0, 1]

        detail = (await client.get(f"/api/v1/replication/jobs/{job['job_id']}", headers=h)).json()
        reads(detail, JOB_READS, "job")
        assert detail["vma_sync_type"] == "full"
        assert (detail["vcenter_host"], detail["target_network"], detail["snapshot_id"]) == \
            (vc.host, "OSSEA-L2", "snapshot-7")
        assert {k: detail[k] for k in SCHEDULER} == SCHEDULER
        assert detail["existing_context_id"] == "ctx-orig-vm-20250909-113839"
        assert (detail["change_id"], detail["previous_change_id"]) == (None, None)  # "" is no value

        # Completed without change ids (the VMA had none): the next incremental is seeded by the GUI.
        base = f"/api/v1/replication/jobs/{job['job_id']}/progress"
        r = await client.post(base, headers=h, json={"status": "completed"})
        assert r.status_code == 200, r.text
        r = await post(request(replication_type="incremental", change_id="52 cc-00/3",
                               previous_change_id="52 bb-00/1", **SCHEDULER))
        assert r.status_code == 201, r.text
        job2 = r.json()
        detail = (await client.get(f"/api/v1/replication/jobs/{job2['job_id']}", headers=h)).json()
        assert detail["vma_sync_type"] == "incremental"
        assert [d["previous_change_id"] for d in detail["disks"]] == ["52 bb-00/1"] * 2
        assert (detail["change_id"], detail["previous_change_id"]) == ("52 cc-00/3", "52 bb-00/1")
        r = await client.post(f"/api/v1/replication/jobs/{job2['job_id']}/progress", headers=h, json={
            "status": "replicating", "bytes_transferred": 1024 ** 3, "total_bytes": 2 * 1024 ** 3})
        assert r.status_code == 200, r.text

        # The dashboard: the list under vm_contexts, inside the seed's envelope.
        async def listed():
            r = await client.get("/api/v1/vm-contexts", headers=h)
            row = next((c for c in r.json().get("vm_contexts", []) if c["vm_name"] == "orig-vm"), None)
            now = row and (row["current_job_id"], row["current_status"])
            return (r.json(), row) if now == (job2["job_id"], "replicating") else None  # the read model follows
        page, row = await wait_for(listed, timeout=20)
        assert page["success"] is True and {"total", "limit", "offset"} <= set(page)
        assert "contexts" not in page  # one name for the list
        reads(row, LIST_READS, "vm_contexts[]")
        assert (row["current_status"], row["total_jobs_run"]) == ("replicating", 2)

        # The detail view.
        r = await client.get("/api/v1/vm-contexts/orig-vm", headers=h)
        assert r.status_code == 200, r.text
        body = r.json()
        ctx = body["context"]
        reads(ctx, CONTEXT_READS, "context")
        assert (ctx["vmware_vm_id"], ctx["vcenter_host"], ctx["cpu_count"], ctx["memory_mb"]) == \
            (vm["id"], vc.host, 4, 4096)
        assert (ctx["os_type"], ctx["power_state"]) == ("rhel8_64Guest", "poweredOn")
        assert not {"vm_id", "cpus", "last_event_at"} & set(ctx)  # the original's names only
        reads(body["current_job"], CURRENT_JOB_READS, "current_job")
        assert (body["current_job"]["vma_sync_type"], body["current_job"]["progress_percent"]) == \
            ("incremental", 50.0)
        assert [j["vma_sync_type"] for j in body["job_history"]] == ["incremental", "full"]
        assert all({k: j[k] for k in SCHEDULER} == SCHEDULER for j in body["job_history"])

        # The CBT history records the base the GUI seeded.
        r = await client.post(f"/api/v1/replication/jobs/{job2['job_id']}/progress", headers=h, json={
            "status": "completed", "disks": [{"unit_number": 0, "change_id": "52 dd-00/4"},
                                             {"unit_number": 1, "change_id": "52 dd-01/4"}]})
        assert r.status_code == 200, r.text

        async def recorded():
            b = (await client.get("/api/v1/vm-contexts/orig-vm", headers=h)).json()
            return b if len(b["cbt_history"]) == 2 else None
        body = await wait_for(recorded, timeout=20)
        assert {(c["change_id"], c["previous_change_id"]) for c in body["cbt_history"]} == \
            {("52 dd-00/4", "52 bb-00/1"), ("52 dd-01/4", "52 bb-00/1")}

        # Never without a session.
        assert_error_shape(await client.get("/api/v1/vm-contexts"), 401)
        assert_error_shape(await client.post("/api/v1/replications", json=request()), 401)
