"""Disk slots (shared/disk_slot.py): one number per disk across controllers, the same in the
request, the job, the exports, progress reports, events and the VM context."""
from __future__ import annotations

import copy
import uuid

import pytest
from pydantic import ValidationError

from oma.shared.disk_slot import DISK_SLOT_MAX, DiskSlot, slot_number
from oma.shared.schemas import REPLICATION_EXAMPLE, ReplicationRequest
from tests.conftest import assert_error_shape, wait_for
from tests.test_replication import SERVICES, replication_env, request

VM_UUID = "4205784a-0000-4000-8000-0000000003d5"
# One disk on each kind of controller, all unit 0: three disks, three slots.
CONTROLLERS = [("scsi", 0, 0), ("sata", 0, 0), ("nvme", 0, 0)]


def test_slot_numbers_are_distinct_and_scsi_bus_0_keeps_its_unit():
    numbers = {DiskSlot(kind, bus, unit).number for kind in ("scsi", "sata", "nvme", "ide")
               for bus in range(4) for unit in range(64)}
    assert numbers == set(range(DISK_SLOT_MAX + 1))
    assert [DiskSlot("scsi", 0, u).number for u in (0, 1, 15)] == [0, 1, 15]
    assert DiskSlot.from_number(DiskSlot("nvme", 3, 14).number) == DiskSlot("nvme", 3, 14)
    assert str(DiskSlot.from_number(256)) == "sata0:0"
    assert slot_number(None, None, 7, 3) == 7 and slot_number(None, None, None, 3) == 3
    assert slot_number("VirtualFooController", 0, 2, 5) == 2   # unknown controller: the unit as is


def test_schema_refuses_a_shared_slot_and_an_impossible_unit():
    body = copy.deepcopy(REPLICATION_EXAMPLE)
    disk = body["source_vm"]["disks"][0]
    body["source_vm"]["disks"] = [{**disk, "id": f"d{i}", "controller_type": "sata", "controller_bus_number": 1,
                                   "unit_number": 3} for i in range(2)]
    with pytest.raises(ValidationError, match=r"disks.1.unit_number: slot 323 \(sata1:3\)"):
        ReplicationRequest.model_validate(body)
    body["source_vm"]["disks"] = [{**disk, "unit_number": DISK_SLOT_MAX + 1}]
    with pytest.raises(ValidationError, match="unit_number"):
        ReplicationRequest.model_validate(body)


async def test_scsi_sata_and_nvme_disks_end_to_end_with_context(make_settings, tmp_path):
    async with replication_env(make_settings, tmp_path, services=SERVICES + ("context_aggregator",),
                               contexts_consumer=f"context_aggregator-test-{uuid.uuid4().hex[:8]}") as env:
        body = request(env.config_id, "mixedvm", disks=3, uuid=VM_UUID)
        for disk, (kind, bus, unit) in zip(body["source_vm"]["disks"], CONTROLLERS):
            disk.update(controller_type=kind, controller_bus_number=bus, unit_number=unit,
                        controller_key=1000, controller_class="whatever the inventory lists")
        r = await env.post(body)
        assert r.status_code == 201, r.text
        reply = r.json()
        assert reply["status"] == "ready_for_sync"
        slots = [DiskSlot(*c).number for c in CONTROLLERS]
        assert sorted(e["disk_unit_number"] for e in reply["nbd_exports"]) == slots == [0, 256, 512]
        assert {e["export_name"] for e in reply["nbd_exports"]} == {f"migration-vm-{VM_UUID}-disk{s}" for s in slots}
        assert len(env.data_volumes()) == 3

        # The VMA reports per disk by the export's number.
        r = await env.progress(reply["job_id"], {"status": "replicating", "bytes_transferred": 1,
                                                 "disks": [{"unit_number": s, "bytes_transferred": 1} for s in slots]})
        assert r.status_code == 200, r.text
        unknown = assert_error_shape(await env.progress(reply["job_id"], {
            "status": "replicating", "disks": [{"unit_number": 300}]}), 400)
        assert "disks.0.unit_number" in unknown["details"]
        r = await env.progress(reply["job_id"], {"status": "completed", "disks": [
            {"unit_number": s, "change_id": f"cid-{s}"} for s in slots]})
        assert r.status_code == 200, r.text

        async def context():
            c = await env.client.get("/api/v1/vm-contexts/mixedvm", headers=env.headers)
            return c.json() if c.status_code == 200 and c.json()["context"]["current_status"] == "completed" else None
        ctx = await wait_for(context, 20)
        disks = sorted(ctx["disks"], key=lambda d: d["unit_number"])
        assert [d["unit_number"] for d in disks] == slots
        assert [d["disk_id"] for d in disks] == ["disk-000", "disk-001", "disk-002"]
        assert all(d["export_name"] and d["volume_id"] for d in disks)
        assert sorted(r["unit_number"] for r in ctx["cbt_history"]) == slots


async def test_incremental_takes_over_a_volume_numbered_before_disk_slots(make_settings, tmp_path):
    """Jobs from before shared/disk_slot.py numbered a lone SATA disk 0 (now 256): the next
    incremental still finds the VM's live volume by its vSphere disk id and takes it over,
    instead of creating a second volume and stranding the first on the appliance VM."""
    from sqlalchemy import update

    from oma.services.replication.models import JobVolume
    async with replication_env(make_settings, tmp_path) as env:
        body = request(env.config_id, "satavm", disks=1, uuid=VM_UUID)
        body["source_vm"]["disks"][0].update(controller_type="sata", controller_bus_number=0, unit_number=0)
        first = (await env.post(body)).json()
        assert first["nbd_exports"][0]["disk_unit_number"] == 256, first
        await env.progress(first["job_id"], {"status": "completed", "disks": [
            {"unit_number": 256, "change_id": "cid-old"}]})
        async with env.replication.sessions.begin() as db:  # as an older release stored it
            await db.execute(update(JobVolume).where(JobVolume.job_id == first["job_id"]).values(unit_number=0))
        creates = len(env.commands("createVolume"))

        r = await env.post({**body, "replication_type": "incremental"})
        assert r.status_code == 201, r.text
        second = r.json()
        assert [v["status"] for v in second["created_volumes"]] == ["reused"], second
        assert second["created_volumes"][0]["volume_id"] == first["created_volumes"][0]["volume_id"]
        assert len(env.commands("createVolume")) == creates and len(env.data_volumes()) == 1
        detail = await env.job(second["job_id"])
        assert [(d["unit_number"], d["previous_change_id"]) for d in detail["disks"]] == [(256, "cid-old")]
