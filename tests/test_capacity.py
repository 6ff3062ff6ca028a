"""OMA learns the appliance VM's real capacity from the cloud's refusals (issue 22): the simulator
allows 10 data disks on the VM and 3 are already attached; OMA (configured for 32) admits 12 one-disk
jobs, the cloud refuses the 8th attach, and OMA lowers its capacity to 7, queues the refused jobs
again instead of failing them, says so in /health and a metric, and completes every job as disks are
released: no failed job, no orphaned volume, never a detach racing an attach elsewhere."""
from __future__ import annotations

import asyncio

import pytest

from oma.plugins.ossea.simulator import DEFAULT_VM_ID
from oma.services.replication.models import ApplianceSlots
from oma.shared.subjects import health
from tests.conftest import wait_for
from tests.test_admission import attached, finish_ready_jobs
from tests.test_replication import Env, metric, replication_env, request

JOBS = 12


async def statuses(env: Env, job_ids: list[str]) -> list[str]:
    return [(await env.job(j))["status"] for j in job_ids]


@pytest.mark.parametrize("sim_kw", [
    {"max_data_disks": 10},                    # CloudStack's data-volume limit: "... (10) attached"
    {"max_data_disks": 32, "pci_slots": 10},   # the guest's PCI bus: "No more available PCI slots"
], ids=["data-volume-limit", "pci-slots"])
async def test_capacity_learnt_from_refusals_jobs_queue_and_all_complete(make_settings, tmp_path, sim_kw):
    async with replication_env(make_settings, tmp_path, sim_kw={"job_latency": 0.05, "pre_attached": 3, **sim_kw},
                               max_attached_disks=32) as env:
        replies = await asyncio.gather(*(env.post(request(env.config_id, f"cap-{i}")) for i in range(JOBS)))
        assert all(r.status_code in (201, 202) for r in replies), [r.text for r in replies]
        job_ids = [r.json()["job_id"] for r in replies]

        async def settled() -> bool:  # nothing provisioning any more: 7 ready, the rest queued
            return "provisioning" not in await statuses(env, job_ids)
        await wait_for(settled, 30)
        now = await statuses(env, job_ids)
        assert sorted(now).count("ready_for_sync") == 7 and now.count("queued") == JOBS - 7, now
        assert attached(env) == 10 and len(env.data_volumes()) == 10, "3 pre-attached + 7: no stray volume"
        queued = [await env.job(j) for j, s in zip(job_ids, now) if s == "queued"]
        assert all("at most 7" in j["message"] for j in queued if j["started_at"] is None), queued

        # The learnt capacity: in the replication service's health reply, /health, and a metric.
        service = env.replication
        async with service.sessions() as db:
            slots = await db.get(ApplianceSlots, DEFAULT_VM_ID)
        assert slots.learned_capacity == 7
        reply = await service.bus.call(health("replication"), {})
        [vm] = reply["appliance_vms"]
        assert vm["oma_vm_id"] == DEFAULT_VM_ID and vm["capacity"] == 7 and vm["held"] == 7
        assert vm["configured"] == 32 and vm["learned_capacity"] == 7
        r = await env.client.get("/health")
        assert "holds at most 7 data disks" in " ".join(r.json().get("warnings", [])), r.json()
        assert metric("oma_appliance_disk_capacity", oma_vm_id=DEFAULT_VM_ID) == 7
        assert metric("oma_appliance_capacity_refusals_total", oma_vm_id=DEFAULT_VM_ID) >= 1

        # Now OMA admits no more than 7: the queue drains as disks are released, with no new refusal.
        refusals = metric("oma_appliance_capacity_refusals_total", oma_vm_id=DEFAULT_VM_ID)
        samples: list[int] = []
        done: set[str] = set()

        async def all_done() -> bool:
            samples.append(attached(env))
            return await finish_ready_jobs(env, job_ids, done)
        await wait_for(all_done, 60, interval=0.1)
        assert max(samples) <= 10
        assert metric("oma_appliance_capacity_refusals_total", oma_vm_id=DEFAULT_VM_ID) == refusals
        assert set(await statuses(env, job_ids)) == {"completed"}
        left = env.data_volumes()
        assert len(left) == 3 and all(v.name.startswith("pre-attached") for v in left.values()), "0 orphans"
        assert env.sim.hazards == []


async def test_attaches_queue_back_to_back_on_the_appliance_vm(make_settings, tmp_path):
    """Provisioning overlaps what can overlap: every disk's createVolume at once, and each attach sent
    as soon as its volume exists, so the appliance VM's work queue runs the attaches without a gap."""
    async with replication_env(make_settings, tmp_path, sim_kw={"job_latency": 0.2}) as env:
        r = await env.post(request(env.config_id, "busy-queue", disks=6))
        assert r.status_code == 201, r.text
        log = env.sim.job_log()
        creates = [j for j in log if j["command"] == "createVolume"]
        attaches = sorted((j for j in log if j["command"] == "attachVolume"), key=lambda j: j["started"])
        assert len(creates) == 6 and len(attaches) == 6
        assert max(c["started"] for c in creates) < min(c["finished"] for c in creates), "creates overlap"
        for before, after in zip(attaches, attaches[1:]):
            assert after["submitted"] <= before["finished"], "the queue waited for OMA"
            assert after["started"] - before["finished"] < 0.01
        assert env.sim.hazards == []
