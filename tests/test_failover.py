"""Failover: the simulator's VM rules, then test failover and cleanup end to end through the gateway
(real NATS, MariaDB, nbdkit; the CloudStack simulator), then kill -9 of the failover service (its own
`oma-service failover` process) at every step: after the restart the job completes and the cleanup
leaves nothing behind."""
from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
from datetime import datetime
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable

import pytest
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

from oma.plugins.convert import group_alive
from oma.plugins.ossea.client import CloudParamError, CloudStackClient
from oma.plugins.ossea.sim_vms import (
    MEDIUM_OFFERING_ID,
    PROD_NETWORK_IDS,
    SMALL_OFFERING_ID,
    STUB_TEMPLATE_ID,
    TEST_NETWORK_IDS,
)
from oma.plugins.ossea.simulator import DEFAULT_VM_ID, DEFAULT_ZONE_ID, CloudStackSimulator, _vm_row
from oma.services.failover.models import FailoverJob
from oma.services.failover.service import failover_id_base
from oma.shared.db import free_id
from oma.shared.settings import SERVICES as SETTINGS_SERVICES
from tests.conftest import assert_error_shape, mariadb_settings, wait_for
from tests.nbdutil import nbdcopy, random_file
from tests.procutil import descendants
from tests.test_orchestration import VM, assert_volumes_equal_source, discovered_vm, job_in, orchestrated
from tests.test_orchestration import start as start_sync
from tests.test_replication import Env, replication_env, request
from tests.vcsim import DiskSpec, NicSpec, create_vm, find_by_name, running_vcsim

KEY, SECRET = "sim-key", "sim-secret"
MiB = 1 << 20
SERVICES = ("auth", "config", "replication", "export_manager", "context_aggregator", "failover")
NICS = [{"network": "VM Network", "mac_address": "00:50:56:aa:bb:01"},
        {"network": "Backup Net", "mac_address": "00:50:56:aa:bb:02"}]


# -- the simulator's rules ------------------------------------------------------------------------

@contextlib.asynccontextmanager
async def cloud(**kw: Any) -> AsyncIterator[tuple[CloudStackSimulator, CloudStackClient]]:
    async with CloudStackSimulator(KEY, SECRET, job_latency=0.02, **kw) as sim:
        async with CloudStackClient(sim.url, KEY, SECRET, poll_interval=0.02) as cs:
            yield sim, cs


async def stub(cs: CloudStackClient, name: str = "vm1", **kw: Any) -> dict[str, Any]:
    kw.setdefault("network_ids", [TEST_NETWORK_IDS[0]])
    return await cs.deploy_virtual_machine(name=name, zone_id=DEFAULT_ZONE_ID, service_offering_id=SMALL_OFFERING_ID,
                                           template_id=STUB_TEMPLATE_ID, **kw)


async def data_volume(cs: CloudStackClient, name: str = "d") -> dict[str, Any]:
    offering = next(o for o in await cs.list_disk_offerings() if o["iscustomized"])
    return await cs.create_volume(name, DEFAULT_ZONE_ID, offering["id"], 1)


async def test_deploy_stopped_gives_an_allocated_stub_root_and_start_needs_a_root():
    async with cloud() as (sim, cs):
        vm = await stub(cs)
        assert vm["state"] == "Stopped"
        [root] = await cs.list_volumes(virtualmachineid=vm["id"])
        assert (root["type"], root["deviceid"], root["state"]) == ("ROOT", 0, "Allocated")
        await cs.detach_volume(root["id"])            # a ROOT detaches from a Stopped VM ...
        [flipped] = await cs.list_volumes(id=root["id"])
        assert flipped["type"] == "DATADISK" and "virtualmachineid" not in flipped  # ... and becomes a data disk
        with pytest.raises(CloudParamError, match="no ROOT volume"):
            await cs.start_virtual_machine(vm["id"])
        await cs.attach_volume(root["id"], vm["id"], device_id=0)
        assert (await cs.start_virtual_machine(vm["id"]))["state"] == "Running"


async def test_device_0_rules_and_hot_plug_of_data_disks_only():
    async with cloud() as (sim, cs):
        vm = await stub(cs)
        [root] = await cs.list_volumes(virtualmachineid=vm["id"], type="ROOT")
        other = await data_volume(cs)
        with pytest.raises(CloudParamError, match="already has root volume"):
            await cs.attach_volume(other["id"], vm["id"], device_id=0)
        await cs.start_virtual_machine(vm["id"])
        with pytest.raises(CloudParamError, match="Root volume detach is only allowed when the VM is Stopped"):
            await cs.detach_volume(root["id"])
        attached = await cs.attach_volume(other["id"], vm["id"])   # hot attach of a data disk
        assert attached["deviceid"] == 1 and attached["type"] == "DATADISK"
        await cs.detach_volume(other["id"])                       # hot detach
        await cs.stop_virtual_machine(vm["id"])
        await cs.detach_volume(root["id"])
        with pytest.raises(CloudParamError, match="no ROOT volume"):
            await cs.call("startVirtualMachine", id=vm["id"])  # no ROOT: refused at once
        await cs.attach_volume(other["id"], vm["id"], device_id=0)
        [now] = await cs.list_volumes(id=other["id"])
        assert (now["type"], now["deviceid"]) == ("ROOT", 0)


async def test_delete_only_when_detached_and_destroy_with_volumeids_and_expunge():
    async with cloud() as (sim, cs):
        vm = await stub(cs)
        kept, deleted = await data_volume(cs, "kept"), await data_volume(cs, "deleted")
        for v in (kept, deleted):
            await cs.attach_volume(v["id"], vm["id"])
        with pytest.raises(CloudParamError, match="not attached to any VM"):
            await cs.delete_volume(kept["id"])
        await cs.destroy_virtual_machine(vm["id"], volume_ids=[deleted["id"]])
        [gone] = await cs.list_virtual_machines(id=vm["id"])
        assert gone["state"] == "Destroyed"                       # without expunge: still listed
        ids = {v["id"] for v in await cs.list_volumes()}
        assert kept["id"] in ids and deleted["id"] not in ids     # listed data disk deleted, the other detached
        assert not any(v.get("virtualmachineid") == vm["id"] for v in await cs.list_volumes())
        await cs.call_async("expungeVirtualMachine", id=vm["id"])
        assert not [v for v in await cs.list_virtual_machines() if v["id"] == vm["id"]]
        await cs.delete_volume(kept["id"])


async def test_networkids_and_iptonetworklist_exclusive_mac_rules_and_nic_order():
    async with cloud() as (sim, cs):
        with pytest.raises(CloudParamError, match="can't be specified along with"):
            await cs.call("deployVirtualMachine", zoneid=DEFAULT_ZONE_ID, serviceofferingid=SMALL_OFFERING_ID,
                          templateid=STUB_TEMPLATE_ID, networkids=PROD_NETWORK_IDS[0],
                          **{"iptonetworklist[0].networkid": PROD_NETWORK_IDS[1]})
        with pytest.raises(CloudParamError, match="Mac address is not valid"):
            await stub(cs, network_ids=None, nics=[{"networkid": PROD_NETWORK_IDS[0], "mac": "00:50:56:zz:00:01"}])
        nics = [{"networkid": PROD_NETWORK_IDS[1], "mac": "00:50:56:AA:BB:01"},
                {"networkid": PROD_NETWORK_IDS[0], "mac": "00:50:56:aa:bb:02", "ip": "10.1.0.77"}]
        vm = await stub(cs, "live1", network_ids=None, nics=nics)
        listed = await cs.list_nics(vm["id"])
        assert [n["networkid"] for n in listed] == [PROD_NETWORK_IDS[1], PROD_NETWORK_IDS[0]]   # NIC order
        assert [n["macaddress"] for n in listed] == ["00:50:56:aa:bb:01", "00:50:56:aa:bb:02"]
        assert [n["isdefault"] for n in listed] == [True, False] and listed[1]["ipaddress"] == "10.1.0.77"
        with pytest.raises(CloudParamError, match="already in use"):
            await stub(cs, "live2", network_ids=None, nics=[{"networkid": PROD_NETWORK_IDS[1],
                                                             "mac": "00:50:56:aa:bb:01"}])
        with pytest.raises(CloudParamError, match="already exists"):
            await stub(cs, "LIVE1")


async def test_snapshots_clone_content_revert_flag_and_kvm_setting(tmp_path):
    async with cloud(device_dir=tmp_path) as (sim, cs):
        vol = await data_volume(cs)
        await cs.attach_volume(vol["id"], DEFAULT_VM_ID)          # on the running appliance
        with open(sim.backing_path(vol["id"]), "r+b") as f:
            f.seek(5 * MiB)
            f.write(b"replica-bytes")
        sim.lab.kvm_snapshot_enabled = False
        with pytest.raises(CloudParamError, match="kvm.snapshot.enabled"):
            await cs.create_snapshot(vol["id"], "s1")
        sim.lab.kvm_snapshot_enabled = True
        snap = await cs.create_snapshot(vol["id"], "s1")
        assert snap["state"] == "BackedUp" and snap["volumeid"] == vol["id"]
        clone = await cs.create_volume_from_snapshot(snap["id"], "clone1")
        with open(sim.backing_path(clone["id"]), "rb") as f:
            f.seek(5 * MiB)
            assert f.read(13) == b"replica-bytes"
        assert os.stat(sim.backing_path(clone["id"])).st_blocks * 512 < MiB   # sparse copy
        with pytest.raises(CloudParamError, match="not in the right state"):
            await cs.revert_snapshot(snap["id"])                  # the appliance VM is Running
        sim.lab.snapshot_revert_supported = False
        with pytest.raises(CloudParamError, match="not supported"):
            await cs.revert_snapshot(snap["id"])
        assert [s["id"] for s in await cs.list_snapshots(volumeid=vol["id"])] == [snap["id"]]
        await cs.delete_snapshot(snap["id"])
        assert await cs.list_snapshots() == []
        assert (await cs.list_capabilities())["cloudstackversion"].startswith("4.")


async def test_fault_injection_reaches_the_new_commands():
    async with cloud() as (sim, cs):
        sim.fail("deployVirtualMachine", errorcode=533, errortext="Insufficient capacity")
        with pytest.raises(Exception, match="Insufficient capacity"):
            await stub(cs)
        sim.fail("createSnapshot", sync=True, errorcode=530)
        vol = await data_volume(cs)
        await cs.attach_volume(vol["id"], DEFAULT_VM_ID)
        with pytest.raises(Exception, match="errorcode 530"):
            await cs.create_snapshot(vol["id"], "s")


# -- test failover and cleanup end to end ---------------------------------------------------------

async def prepare(env: Env, name: str = "app01", disks: int = 3, complete: bool = True) -> dict[str, Any]:
    """Network mappings, a 3-disk 2-NIC VM replicated, distinct bytes on each replica; its sync reported
    completed (else still in flight: ready_for_sync)."""
    for nic, test_net, prod_net in zip(NICS, TEST_NETWORK_IDS, PROD_NETWORK_IDS):
        r = await env.client.post("/api/v1/network/mappings", headers=env.headers, json={
            "action": "create", "mapping": {"source_network": nic["network"], "test_network_id": test_net,
                                            "production_network_id": prod_net}})
        assert r.status_code in (201, 409), r.text
    body = request(env.config_id, name, disks=disks, cpus=1, memory_mb=1024, nics=NICS)
    r = await env.post(body)
    assert r.status_code == 201, r.text
    reply = r.json()
    for i, disk in enumerate(sorted(reply["nbd_exports"], key=lambda e: e["disk_unit_number"])):
        with open(disk["device_path"], "r+b") as f:
            f.seek(MiB)
            f.write(f"disk-{i}".encode())
    if complete:
        assert (await env.progress(reply["job_id"], {"status": "completed"})).status_code == 200
    return reply


def content(sim: CloudStackSimulator, volume_id: str) -> bytes:
    with open(sim.backing_path(volume_id), "rb") as f:
        f.seek(MiB)
        return f.read(6)


async def failover(env: Env, action: str, vm_name: str = "app01", **options: Any) -> dict[str, Any]:
    r = await env.client.post("/api/v1/failover", headers=env.headers,
                              json={"action": action, "vm_name": vm_name, "options": options})
    assert r.status_code == 202, r.text
    return r.json()


async def finished(env: Env, failover_id: str, timeout: float = 60) -> dict[str, Any]:
    async def done():
        r = await env.client.get(f"/api/v1/failover/jobs/{failover_id}", headers=env.headers)
        if r.status_code in (503, 504):  # restarting; or the request reached the killed process just before
            return None               # NATS dropped its subscription, and was never answered
        assert r.status_code == 200, r.text
        body = r.json()
        return body if body["status"] not in ("running", "compensating") else None
    return await wait_for(done, timeout=timeout, interval=0.1)


async def leftovers(sim: CloudStackSimulator, replicas: set[str]) -> dict[str, list[str]]:
    """What the CloudStack API lists beyond the appliance VM, its ROOT and the replica volumes."""
    async with CloudStackClient(sim.url, KEY, SECRET) as cs:
        vms = [v["name"] for v in await cs.list_virtual_machines() if v["id"] != DEFAULT_VM_ID]
        vols = [v["name"] for v in await cs.list_volumes()
                if v["id"] not in replicas and v.get("virtualmachineid") != DEFAULT_VM_ID]
        snaps = [s["name"] for s in await cs.list_snapshots()]
    return {"vms": vms, "volumes": vols, "snapshots": snaps}


async def check_test_vm(env: Env, job: dict[str, Any], reply: dict[str, Any]) -> None:
    sim = env.sim
    [target] = [v for v in sim.vms.values() if v["id"] != DEFAULT_VM_ID]
    assert target["state"] == "Running" and target["name"].startswith("app01-test-")
    assert job["target_vm_id"] == target["id"] and job["target_vm_name"] == target["name"]
    disks = sorted((v for v in sim.volumes.values() if v.vm_id == target["id"]), key=lambda v: v.device_id)
    replicas = [e["volume_id"] for e in sorted(reply["created_volumes"], key=lambda v: v["volume_name"])]
    assert [d.type for d in disks] == ["ROOT", "DATADISK", "DATADISK"]
    assert not set(d.id for d in disks) & set(replicas)                    # clones, not the replicas
    assert [content(sim, d.id) for d in disks] == [b"disk-0", b"disk-1", b"disk-2"]  # in source order
    assert [n["networkid"] for n in sim.lab.nics[target["id"]]] == list(TEST_NETWORK_IDS)
    assert all(sim.volumes[v].vm_id == DEFAULT_VM_ID for v in replicas)    # replication keeps its volumes


async def context_status(env: Env, status: str, vm_name: str = "app01") -> None:
    """The VM context (the read model, fed by the failover events) shows the failover's status."""
    async def shown():
        r = await env.client.get(f"/api/v1/vm-contexts/{vm_name}", headers=env.headers)
        return r.status_code == 200 and r.json()["context"]["current_status"] == status
    await wait_for(shown, timeout=15, interval=0.1)


async def test_test_failover_and_cleanup_end_to_end(make_settings, tmp_path):
    async with replication_env(make_settings, tmp_path, services=SERVICES, cloud_poll_interval=0.05) as env:
        reply = await prepare(env)
        replicas = {v["volume_id"] for v in reply["created_volumes"]}
        started = await failover(env, "test")
        assert started["status"] == "running" and re.fullmatch(r"fo-\d{8}-\d{6}(-\d+)?", started["failover_id"])
        job = await finished(env, started["failover_id"])
        assert job["status"] == "completed", (job["error"], job["steps"])
        assert [s["status"] for s in job["steps"]] == ["done"] * 10   # no `convert` step without a converter
        assert {r["kind"] for r in job["resources"]} == {"snapshot", "volume", "vm", "stub_root"}
        assert all(r["cloud_id"] for r in job["resources"])
        await check_test_vm(env, job, reply)
        await context_status(env, "failed_over_test")

        # replication goes on while the test VM runs: an incremental sync writes the replica over NBD
        r = await env.post({**request(env.config_id, "app01", disks=3, cpus=1, memory_mb=1024, nics=NICS),
                            "replication_type": "incremental"})
        assert r.status_code == 201, r.text
        incremental = r.json()
        assert {v["volume_id"] for v in incremental["created_volumes"]} == replicas
        boot = min(incremental["nbd_exports"], key=lambda e: e["disk_unit_number"])
        await nbdcopy(random_file(tmp_path / "delta.bin", 2 * MiB),
                      f"nbd://127.0.0.1:{boot['port']}/{boot['export_name']}", "--flush")
        r = await env.progress(incremental["job_id"], {"status": "completed"})
        assert r.status_code == 200 and r.json()["status"] == "completed", r.text
        boot_replica = next(d["volume_id"] for d in (await env.job(incremental["job_id"]))["disks"]
                            if d["unit_number"] == boot["disk_unit_number"])
        assert content(env.sim, boot_replica) != b"disk-0"             # the replica moved on ...
        root = next(v for v in env.sim.volumes.values() if v.vm_id == job["target_vm_id"] and v.type == "ROOT")
        assert content(env.sim, root.id) == b"disk-0"                   # ... the test VM's clone did not
        assert env.sim.vms[job["target_vm_id"]]["state"] == "Running"

        # one active failover per VM; a cleanup is the way out
        r = await env.client.post("/api/v1/failover", headers=env.headers, json={"action": "test", "vm_name": "app01"})
        assert_error_shape(r, 409)
        listed = (await env.client.get("/api/v1/failover/jobs", headers=env.headers,
                                       params={"vm_name": "app01", "status": "completed"})).json()
        assert [j["failover_id"] for j in listed["jobs"]] == [started["failover_id"]]

        cleanup = await finished(env, (await failover(env, "cleanup"))["failover_id"])
        assert cleanup["status"] == "completed", cleanup
        assert await leftovers(env.sim, replicas) == {"vms": [], "volumes": [], "snapshots": []}
        assert (await finished(env, started["failover_id"]))["status"] == "cleaned_up"
        await context_status(env, "ready_for_failover")
        # the VM is free again
        again = await finished(env, (await failover(env, "test"))["failover_id"])
        assert again["status"] == "completed", again

        # The test VM needs the OSSEA configuration too (its cleanup does): with replication's jobs gone
        # (the test VM runs on clones), failover still refuses its deletion; after the cleanup it goes.
        async def delete_config():
            return await env.client.post("/api/v1/ossea/config", headers=env.headers,
                                         json={"action": "delete", "id": env.config_id})
        for job_id in (reply["job_id"], incremental["job_id"]):
            assert (await env.delete(job_id)).status_code == 200
        body = assert_error_shape(await delete_config(), 409)
        assert f"used by failover jobs: {again['failover_id']}" in body["details"], body
        assert (await finished(env, (await failover(env, "cleanup"))["failover_id"]))["status"] == "completed"
        assert (await delete_config()).status_code == 200


async def test_group_defaults_fill_the_options_and_preflight_refuses_before_a_job(make_settings, tmp_path):
    """A protection group's defaults (offering, network profile) apply when the request names none, the
    request's own options win; an offering that does not exist and, for a cutover, a taken target name
    are refused with every failed check (400) before a failover job exists."""
    async with replication_env(make_settings, tmp_path, services=(*SERVICES, "scheduler"),
                               cloud_poll_interval=0.05) as env:
        await prepare(env)
        c, h = env.client, env.headers

        async def jobs() -> int:
            r = await c.get("/api/v1/failover/jobs", headers=h, params={"vm_name": "app01"})
            return r.json()["total"]

        async def test_vm(**options: Any) -> dict[str, Any]:
            job = await finished(env, (await failover(env, "test", **options))["failover_id"])
            assert job["status"] == "completed", job
            vm = env.sim.vms[job["target_vm_id"]]
            found = (vm["serviceofferingid"], [n["networkid"] for n in env.sim.lab.nics[vm["id"]]])
            assert (await finished(env, (await failover(env, "cleanup"))["failover_id"]))["status"] == "completed"
            return found

        r = await c.post("/api/v1/failover", headers=h, json={"action": "test", "vm_name": "app01",
                                                               "options": {"service_offering": "Huge"}})
        body = assert_error_shape(r, 400)
        assert body["error"] == "Preflight failed" and "service_offering: service offering 'Huge' does not exist" \
            in body["details"], body
        assert await jobs() == 0

        assert await test_vm() == (SMALL_OFFERING_ID, list(TEST_NETWORK_IDS))  # no group: the fitting one, test
        r = await c.post("/api/v1/groups", headers=h, json={"action": "create", "group": {
            "name": "wave", "ossea_config_id": env.config_id, "vm_names": ["APP01"],
            "defaults": {"service_offering": "Medium Instance", "network_profile": "production"}}})
        assert r.status_code == 201, r.text
        group = r.json()["group"]
        assert await test_vm() == (MEDIUM_OFFERING_ID, list(PROD_NETWORK_IDS))
        assert await test_vm(network_profile="test") == (MEDIUM_OFFERING_ID, list(TEST_NETWORK_IDS))

        # A default offering gone, and the cutover's name taken in the cloud: both reasons, no job.
        r = await c.post("/api/v1/groups", headers=h, json={"action": "update", "id": group["id"], "group": {
            "defaults": {"service_offering": "Retired Instance"}}})
        assert r.json()["group"]["defaults"] == {"service_offering": "Retired Instance"}, r.text
        env.sim.vms["c0ffee00-0000-4000-8000-0000000000a1"] = _vm_row(
            "c0ffee00-0000-4000-8000-0000000000a1", "app01", "OSSEA-Zone")
        before = await jobs()
        r = await c.post("/api/v1/failover", headers=h, json={"action": "live", "vm_name": "app01", "options": {
            "final_sync": False, "power_off_source": False}})
        details = assert_error_shape(r, 400)["details"]
        assert "'Retired Instance' does not exist" in details and "a VM named 'app01' already exists" in details, \
            details
        assert await jobs() == before


async def test_test_failover_snapshots_a_finished_sync_and_pauses_replication_meanwhile(make_settings, tmp_path):
    """`quiesce`: the VM's sync in flight is waited for (no snapshot before it completes, so the clones
    hold its last bytes), no new sync of the VM is admitted while the replica is snapshotted (409), and
    `resume_replication` admits them again before the test VM is even built."""
    async with replication_env(make_settings, tmp_path, services=SERVICES, cloud_poll_interval=0.05) as env:
        reply = await prepare(env, complete=False)
        incremental = {**request(env.config_id, "app01", disks=3, cpus=1, memory_mb=1024, nics=NICS),
                       "replication_type": "incremental"}
        failover_id = (await failover(env, "test"))["failover_id"]

        def step(name: str) -> Callable[[], Awaitable[bool]]:
            async def at() -> bool:
                r = await env.client.get(f"/api/v1/failover/jobs/{failover_id}", headers=env.headers)
                return r.json()["current_step"] == name
            return at
        await wait_for(step("quiesce"), timeout=15)
        await asyncio.sleep(1.0)  # many polls of the sync
        assert not [c for c in env.sim.calls if c["command"] == "createSnapshot"]
        boot = min(reply["nbd_exports"], key=lambda e: e["disk_unit_number"])
        with open(boot["device_path"], "r+b") as f:  # the sync's last bytes, then its completion
            f.seek(MiB)
            f.write(b"synced")
        env.sim.hang("createSnapshot")
        assert (await env.progress(reply["job_id"], {"status": "completed"})).status_code == 200
        await wait_for(step("snapshot"), timeout=15)
        body = assert_error_shape(await env.post(incremental), 409)
        assert f"test failover {failover_id} is snapshotting" in body["details"], body
        env.sim.release("createSnapshot")
        await wait_for(step("clone"), timeout=15)
        env.sim.hang("startVirtualMachine")
        await wait_for(step("start"), timeout=15)
        r = await env.post(incremental)   # resumed: replication goes on while the test VM is built
        assert r.status_code == 201, r.text
        env.sim.release("startVirtualMachine")
        job = await finished(env, failover_id)
        assert job["status"] == "completed", job
        root = next(v for v in env.sim.volumes.values() if v.vm_id == job["target_vm_id"] and v.type == "ROOT")
        assert content(env.sim, root.id) == b"synced"



async def test_a_stop_does_not_wait_out_a_step_and_the_next_start_resumes_it(make_settings, tmp_path, mariadb_name):
    """The failover service stopped while a test failover waits for the VM's sync in flight (its
    quiesce step may wait an hour): the stop returns at once, and the next start resumes the job,
    which completes once the sync does."""
    async with replication_env(make_settings, tmp_path, services=SERVICES, cloud_poll_interval=0.05,
                               **mariadb_settings(mariadb_name)) as env:
        reply = await prepare(env, complete=False)
        failover_id = (await failover(env, "test"))["failover_id"]

        async def quiescing() -> bool:
            r = await env.client.get(f"/api/v1/failover/jobs/{failover_id}", headers=env.headers)
            return r.json()["current_step"] == "quiesce"
        await wait_for(quiescing, timeout=15)
        service = env.client.appliance.services["failover"]
        await asyncio.wait_for(service.stop(), timeout=10)
        await service.start()
        assert (await env.progress(reply["job_id"], {"status": "completed"})).status_code == 200
        job = await finished(env, failover_id)
        assert job["status"] == "completed", job
        assert (await finished(env, (await failover(env, "cleanup"))["failover_id"]))["status"] == "completed"

async def test_failures_compensate_or_stay_retryable_and_the_lock_follows(make_settings, tmp_path):
    async with replication_env(make_settings, tmp_path, services=SERVICES, cloud_poll_interval=0.05,
                               cloud_job_timeout=5.0) as env:
        reply = await prepare(env)
        env.sim.fail("startVirtualMachine", errorcode=533, errortext="Insufficient capacity to start")
        # two at once: the VM's lock (a primary key) admits one, the other is a 409
        posts = await asyncio.gather(*(env.client.post("/api/v1/failover", headers=env.headers, json={
            "action": "test", "vm_name": "app01"}) for _ in range(2)))
        assert sorted(r.status_code for r in posts) == [202, 409], [r.text for r in posts]
        started = next(r.json() for r in posts if r.status_code == 202)
        job = await finished(env, started["failover_id"])
        assert job["status"] == "compensated", job
        assert "Insufficient capacity" in job["error"]
        by_name = {s["name"]: s for s in job["steps"]}
        assert "Insufficient capacity" in by_name["start"]["error"]
        assert by_name["snapshot"]["status"] == "compensated"
        assert await leftovers(env.sim, {v["volume_id"] for v in reply["created_volumes"]}) == \
            {"vms": [], "volumes": [], "snapshots": []}
        # compensated: the lock is released, and the next try (the fault is spent) completes
        assert (await finished(env, (await failover(env, "test"))["failover_id"]))["status"] == "completed"
        # a cleanup that fails stays failed, keeps the VM locked, and is run again
        env.sim.fail("deleteSnapshot", errorcode=431, errortext="Snapshot is busy")
        failed = await finished(env, (await failover(env, "cleanup"))["failover_id"])
        assert failed["status"] == "failed" and "Snapshot is busy" in failed["error"], failed
        assert_error_shape(await env.client.post("/api/v1/failover", headers=env.headers,
                                                 json={"action": "test", "vm_name": "app01"}), 409)
        again = await finished(env, (await failover(env, "cleanup"))["failover_id"])
        assert again["status"] == "completed" and again["target_id"] == failed["target_id"], again
        assert await leftovers(env.sim, {v["volume_id"] for v in reply["created_volumes"]}) == \
            {"vms": [], "volumes": [], "snapshots": []}


async def test_failover_ids_share_a_second_by_a_suffix():
    """`fo-YYYYMMDD-HHMMSS` as replication's job ids: `-2`, `-3`... only when that second is taken."""
    engine = create_async_engine("sqlite+aiosqlite://")
    try:
        async with engine.begin() as conn:
            await conn.run_sync(FailoverJob.__table__.create)
        sessions = async_sessionmaker(engine)
        base = failover_id_base(datetime(2026, 11, 30, 12, 0, 0))
        async with sessions.begin() as db:
            assert await free_id(db, FailoverJob.failover_id, base) == base == "fo-20261130-120000"
            for taken in (base, f"{base}-2", "fo-20261130-1200001"):
                db.add(FailoverJob(failover_id=taken, action="test", vm_name="v", status="completed",
                                   options="{}", plan="{}"))
            await db.flush()
            assert await free_id(db, FailoverJob.failover_id, base) == f"{base}-3"
    finally:
        await engine.dispose()


async def test_bad_requests_have_the_seed_error_shape(make_settings, tmp_path):
    async with replication_env(make_settings, tmp_path, services=SERVICES) as env:
        for body, status in (({"action": "explode", "vm_name": "x"}, 400), ({"action": "test"}, 400),
                             ({"action": "test", "vm_name": "nobody"}, 409),
                             ({"action": "cleanup", "vm_name": "nobody"}, 409),
                             ({"action": "live", "vm_name": "x"}, 409),
                             ({"action": "rollback", "vm_name": "x"}, 409),
                             ({"action": "test", "vm_name": "x", "options": {"final_sync": True}}, 400),
                             ({"action": "test", "vm_name": "x", "options": {"convert": "nope"}}, 400)):
            r = await env.client.post("/api/v1/failover", headers=env.headers, json=body)
            assert_error_shape(r, status)
        assert_error_shape(await env.client.get("/api/v1/failover/jobs/fo-nope", headers=env.headers), 404)
        assert (await env.client.post("/api/v1/failover", json={"action": "test", "vm_name": "x"})).status_code == 401
        await prepare(env, "nomap")
        await env.client.post("/api/v1/network/mappings", headers=env.headers, json={"action": "delete", "id": 1})
        r = await env.client.post("/api/v1/failover", headers=env.headers, json={"action": "test", "vm_name": "nomap"})
        assert "VM Network" in assert_error_shape(r, 400)["details"]
        r = await env.client.post("/api/v1/network/mappings", headers=env.headers, json={"action": "get"})
        assert [m["source_network"] for m in r.json()["mappings"]] == ["Backup Net"]


# -- the virt-v2v converter, for real ----------------------------------------------------------------

async def test_virt_v2v_runs_for_real_and_its_failure_compensates(make_settings, tmp_path):
    """`virt-v2v-in-place -i disk` on the boot clone of a replica that holds a filesystem and no
    operating system: virt-v2v's inspection finds no guest, the `convert` step fails with virt-v2v's own
    message, and the compensation leaves nothing behind. libguestfs runs its appliance under TCG
    (force_tcg): /dev/kvm is unusable on these machines (shared/reference/failover.md §2)."""
    async with replication_env(make_settings, tmp_path, services=SERVICES, cloud_poll_interval=0.05,
                               convert_libguestfs_backend_settings="force_tcg", convert_timeout=900) as env:
        reply = await prepare(env, "conv01", disks=2)
        boot = min(reply["nbd_exports"], key=lambda e: e["disk_unit_number"])["device_path"]
        subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "no-os", boot], check=True)  # a filesystem, no OS
        job = await finished(env, (await failover(env, "test", "conv01", convert="virt-v2v"))["failover_id"],
                             timeout=900)
        assert job["status"] == "compensated", job
        steps = {s["name"]: s for s in job["steps"]}
        assert steps["convert"]["status"] == "compensated" and steps["create_vm"]["status"] == "pending"
        assert "virt-v2v-in-place exited with 1" in steps["convert"]["error"], steps["convert"]
        # virt-v2v's own words, not ours
        assert "virt-v2v-in-place: error: inspection could not detect the source guest" in job["error"], job["error"]
        assert [steps[n]["status"] for n in ("snapshot", "clone")] == ["compensated"] * 2
        replicas = {v["volume_id"] for v in reply["created_volumes"]}
        assert await leftovers(env.sim, replicas) == {"vms": [], "volumes": [], "snapshots": []}
        on_appliance = {v.id for v in env.sim.volumes.values() if v.vm_id == DEFAULT_VM_ID and v.type == "DATADISK"}
        assert on_appliance == replicas   # the clone was attached for the conversion, then detached and deleted
        await context_status(env, "ready_for_failover", "conv01")


# -- live cutover and rollback, with the source in vcsim ----------------------------------------------

LIVE_NICS = [NicSpec("VM Network", mac_address="00:50:56:aa:00:01"), NicSpec("DC0_DVPG0", mac_address="00:50:56:aa:00:02")]
LIVE_SERVICES = ("auth", "config", "inventory", "replication", "export_manager", "context_aggregator", "failover")


def power_state(vc: Any, name: str) -> str:
    from pyVmomi import vim
    with vc.service_instance() as si:
        return find_by_name(si, vim.VirtualMachine, name).runtime.powerState


async def prepare_live(env: Env, vc: Any) -> list[str]:
    """vCenter connection, discovery, production mappings, the vcsim VM `live01` replicated as the
    inventory reports it; returns its replica volume ids in unit order."""
    c, h = env.client, env.headers
    r = await c.post("/api/v1/vcenter/config", headers=h, json={"action": "create", "configuration": {
        "name": "lab", "host": vc.host, "port": vc.port, "username": vc.username,
        "password": vc.password, "verify_tls": False}})
    assert r.status_code == 201, r.text
    found = (await c.get("/api/v1/vms/discover", params={"vcenter": "lab"}, headers=h)).json()
    source = next(v for v in found["vms"] if v["name"] == "live01")
    for nic, net in zip(LIVE_NICS, PROD_NETWORK_IDS):
        r = await c.post("/api/v1/network/mappings", headers=h, json={"action": "create", "mapping": {
            "source_network": nic.network, "production_network_id": net}})
        assert r.status_code == 201, r.text
    r = await env.post({"source_vm": source, "ossea_config_id": env.config_id})
    assert r.status_code == 201, r.text
    # No VMA here: the sync is reported done on the copier's push route (a ready job is still in flight,
    # and replication hands no volumes over while a sync may start).
    assert (await env.progress(r.json()["job_id"], {"status": "completed"})).status_code == 200
    by_unit = {d["unit_number"]: d["volume_id"] for d in (await env.job(r.json()["job_id"]))["disks"]}
    return [by_unit[u] for u in sorted(by_unit)]


@contextlib.contextmanager
def live_source() -> Any:
    """vcsim with `live01` (2 disks, 2 NICs with set MACs) powered on."""
    with running_vcsim() as vc:
        with vc.service_instance() as si:
            create_vm(si, "live01", disks=[DiskSpec(1), DiskSpec(1)], nics=LIVE_NICS, power_on=True)
        yield vc


async def check_rolled_back(env: Env, vc: Any, replicas: list[str], served: dict[str, str],
                            name: str = "live01") -> None:
    assert not [v for v in env.sim.vms.values() if v["name"] == name]           # that VM is gone
    assert [env.sim.volumes[v].vm_id for v in replicas] == [DEFAULT_VM_ID] * 2  # back on the appliance
    assert env.client.appliance.services["export_manager"].exporter.list_exports() == served  # served again
    assert power_state(vc, name) == "poweredOn"
    assert await leftovers(env.sim, set(replicas)) == {"vms": [], "volumes": [], "snapshots": []}
    assert env.sim.lab.snapshots == {}


async def shown_power(c, h, vm: dict, state: str) -> None:
    """The source's power state as the GUI reads it: the inventory's VM and the VM's context (the
    latter from the inventory's event, a moment later)."""
    r = await c.get(f"/api/v1/vms/{vm['id']}", headers=h)
    assert r.status_code == 200 and r.json()["vm"]["power_state"] == state, r.text

    async def context() -> bool:
        r = await c.get(f"/api/v1/vm-contexts/{vm['name']}", headers=h)
        return r.status_code == 200 and r.json()["context"]["power_state"] == state
    await wait_for(context, timeout=10)


async def mapped_and_synced(c, h, vm) -> tuple[dict, list[str], list]:
    """Map the live NICs to production networks and run the first sync: (its job, the replica volume ids
    in unit order, the exports served then)."""
    for nic, net in zip(LIVE_NICS, PROD_NETWORK_IDS):
        r = await c.post("/api/v1/network/mappings", headers=h, json={"action": "create", "mapping": {
            "source_network": nic.network, "production_network_id": net}})
        assert r.status_code == 201, r.text
    first = await job_in(c, h, await start_sync(c, h, vm), "completed", "failed")
    assert first["status"] == "completed", first
    replicas = [d["volume_id"] for d in sorted(first["disks"], key=lambda d: d["unit_number"])]
    return first, replicas, c.appliance.services["export_manager"].exporter.list_exports()


def when(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).replace(tzinfo=None)


async def test_live_cutover_with_the_final_sync_through_the_vma_then_rollback(make_settings, tmp_path):
    """The source in vcsim, reached through the VMA simulator: the final sync is a replication job the
    VMA runs after the power-off, and it carries what the guest wrote after the last sync."""
    async with orchestrated(make_settings, tmp_path, vm_spec={"nics": LIVE_NICS, "power_on": True},
                            cloud_poll_interval=0.05, failover_shutdown_timeout=2) as (c, h, cloud, vma, vc):
        env = Env(c, h, cloud, c.config_id, tmp_path, [])
        vm = await discovered_vm(c, h, vc)
        first, replicas, served = await mapped_and_synced(c, h, vm)
        # The guest writes after the last sync: only a sync after the power-off carries it over.
        written = (await vma.mutate(vm["path"], vm["disks"][0]["id"], 1))["bytes_written"]

        live = await finished(env, (await failover(env, "live", VM))["failover_id"], timeout=120)
        assert live["status"] == "completed", live
        assert [s["name"] for s in live["steps"]][:4] == ["validate", "power_off_source", "final_sync", "snapshot"]
        steps = {s["name"]: s for s in live["steps"]}
        final = await env.job(live["final_sync_job_id"])
        assert final["replication_type"] == "incremental" and final["status"] == "completed", final
        assert when(steps["power_off_source"]["completed_at"]) <= when(final["created_at"])   # after the power-off
        assert when(final["completed_at"]) <= when(steps["snapshot"]["started_at"])           # before the snapshots
        assert final["bytes_transferred"] == written                                          # the delta, by the VMA
        assert [d["volume_id"] for d in sorted(final["disks"], key=lambda d: d["unit_number"])] == replicas
        assert_volumes_equal_source(cloud, vma, vc, vm, final)  # the replicas hold the source's last bytes
        assert power_state(vc, VM) == "poweredOff"
        await shown_power(c, h, vm, "poweredOff")  # in the inventory and the VM's context at once
        [target] = [v for v in cloud.vms.values() if v["name"] == VM]
        assert target["state"] == "Running"
        disks = sorted((v for v in cloud.volumes.values() if v.vm_id == target["id"]), key=lambda v: v.device_id)
        assert [(d.id, d.type) for d in disks] == [(replicas[0], "ROOT"), (replicas[1], "DATADISK")]
        assert [n["macaddress"] for n in cloud.lab.nics[target["id"]]] == [n.mac_address for n in LIVE_NICS]

        # Replication was told: the volumes are the new VM's, no sync of the VM and no release of them.
        r = await c.post("/api/v1/replications", headers=h, json={
            "source_vm": vm, "ossea_config_id": c.config_id, "replication_type": "incremental"})
        assert live["failover_id"] in assert_error_shape(r, 409)["details"]
        assert "rollback" in r.json()["details"]
        assert_error_shape(await env.delete(final["job_id"]), 409)
        assert [cloud.volumes[v].vm_id for v in replicas] == [target["id"]] * 2

        back = await finished(env, (await failover(env, "rollback", VM))["failover_id"], timeout=120)
        assert back["status"] == "completed", back
        await check_rolled_back(env, vc, replicas, served, VM)
        await shown_power(c, h, vm, "poweredOn")  # not the power-off's state until the next discovery
        # Given back, reverted to the snapshots taken after the final sync: syncs resume incrementally.
        written = (await vma.mutate(vm["path"], vm["disks"][1]["id"], 1))["bytes_written"]
        again = await job_in(c, h, await start_sync(c, h, vm, "incremental"), "completed", "failed")
        assert again["status"] == "completed" and again["bytes_transferred"] == written, again
        assert_volumes_equal_source(cloud, vma, vc, vm, again)


async def test_a_failed_live_cutover_puts_everything_back(make_settings, tmp_path):
    with live_source() as vc:
        async with replication_env(make_settings, tmp_path, services=LIVE_SERVICES, cloud_poll_interval=0.05,
                                   failover_shutdown_timeout=2) as env:
            replicas = await prepare_live(env, vc)
            served = env.client.appliance.services["export_manager"].exporter.list_exports()
            env.sim.fail("startVirtualMachine", errorcode=533, errortext="Insufficient capacity to start")
            job = await finished(env, (await failover(env, "live", "live01", final_sync=False))["failover_id"])
            assert job["status"] == "compensated" and "Insufficient capacity" in job["error"], (job["error"], job["steps"])
            assert [s["status"] for s in job["steps"]][:-1] == ["compensated"] * 9   # verify never ran
            await check_rolled_back(env, vc, replicas, served)
            await context_status(env, "ready_for_failover", "live01")


# -- kill -9 of the failover service at every step ---------------------------------------------------

class FailoverProcess:
    """`oma-service failover` alone, on MariaDB and the test's NATS, killed with SIGKILL on demand."""

    def __init__(self, settings: Any, log: Path, **env: str):
        self.settings, self.log, self.proc, self.env = settings, log, None, env

    def start(self) -> None:
        s = self.settings
        argv = [sys.executable, "-c", "from oma.cli import oma_service; oma_service()", "failover",
                "-nats-url", s.nats_url, "-db-type", "mariadb", "-db-host", s.db_host, "-db-port", str(s.db_port),
                "-db-name", s.db_name, "-db-user", s.db_user, "-db-pass", s.db_pass, "-metrics-port", "0",
                "-data-dir", str(s.data_dir)]
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent),
               "OMA_CLOUD_POLL_INTERVAL": "0.05", "OMA_CLOUD_JOB_TIMEOUT": "20", "OMA_FAILOVER_SHUTDOWN_TIMEOUT": "2",
               **self.env}
        self.proc = subprocess.Popen(argv, env=env, stdout=self.log.open("ab"), stderr=subprocess.STDOUT)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


def no_device_0(params: dict[str, str]) -> bool:
    return params.get("deviceid") is None


# (phase, step, the command whose call triggers the kill, an optional filter on its parameters)
KILL_POINTS = [
    ("test", "validate", "listZones", None), ("test", "quiesce", "replication:quiesce", None),
    ("test", "snapshot", "createSnapshot", None), ("test", "resume_replication", "replication:resume", None),
    ("test", "clone", "createVolume", None), ("test", "create_vm", "deployVirtualMachine", None),
    ("test", "swap_root", "detachVolume", None), ("test", "attach_data", "attachVolume", no_device_0),
    ("test", "start", "startVirtualMachine", None), ("test", "verify", "listNics", None),
    ("cleanup", "stop_vm", "stopVirtualMachine", None), ("cleanup", "detach_volumes", "detachVolume", None),
    ("cleanup", "destroy_vm", "destroyVirtualMachine", None), ("cleanup", "delete_clones", "deleteVolume", None),
    ("cleanup", "delete_snapshots", "deleteSnapshot", None)]


def hold_method(obj: Any, name: str) -> Callable[[FailoverProcess], Awaitable[None]]:
    """Like `kill_on_call` for an in-process service's handler the failover service calls over the bus
    (`obj.name`): its first call is held until the failover service is SIGKILLed, then carried out."""
    real = getattr(obj, name)
    asked, go = asyncio.Event(), asyncio.Event()

    async def held(*args: Any, **kw: Any) -> Any:
        if not asked.is_set():
            asked.set()
            await go.wait()
        return await real(*args, **kw)
    setattr(obj, name, held)

    async def kill(proc: FailoverProcess) -> None:
        await asyncio.wait_for(asked.wait(), 60)
        proc.kill()
        go.set()
        delattr(obj, name)  # the class's method again
    return kill


async def kill_on_call(sim: CloudStackSimulator, proc: FailoverProcess, mark: int, command: str, match) -> None:
    """`command` is held unanswered (sim.hang, armed before the action): SIGKILL the service once it has
    sent the call, then let the cloud carry the call out while the service is dead, so the resume must
    adopt what the call made (by the name recorded before it). A call the point does not want (swap_root's
    deviceid=0 attach before attach_data's) is let through and the next one held."""
    while True:
        async def called() -> int | None:
            return next((i + 1 for i in range(mark, len(sim.calls)) if sim.calls[i]["command"] == command), None)
        mark = await wait_for(called, timeout=60, interval=0.002)
        if match is None or match(sim.calls[mark - 1]["params"]):
            break
        sim.release(command)  # the service waits for this call's job before it sends the next one
        sim.hang(command)
    proc.kill()
    sim.release(command)


def failover_up(env: Env) -> Callable[[], Awaitable[bool]]:
    async def up() -> bool:
        return (await env.client.get("/api/v1/failover/jobs", headers=env.headers)).status_code == 200
    return up


def hold_power(env: Env, action: str) -> Callable[[FailoverProcess], Awaitable[None]]:
    """Like `kill_on_call` for the source's power (vCenter, through the inventory service): the power
    `action` is held until the failover service that asked for it is SIGKILLed, then carried out."""
    inventory = env.client.appliance.services["inventory"]
    real = inventory._source
    asked, go = asyncio.Event(), asyncio.Event()

    class Held:
        def __init__(self, source: Any):
            self.source = source

        async def power(self, vm_id: str, on: bool | None, timeout: float) -> dict[str, Any]:
            if on is (action == "on") and not asked.is_set():
                asked.set()
                await go.wait()
            return await self.source.power(vm_id, on, timeout)

    async def source(conn: dict[str, Any]) -> Any:
        return Held(await real(conn))
    inventory._source = source

    async def kill(proc: FailoverProcess) -> None:
        await asyncio.wait_for(asked.wait(), 60)
        proc.kill()
        go.set()
        inventory._source = real
    return kill


@contextlib.asynccontextmanager
async def killable(make_settings, tmp_path: Path, mariadb_name: str, services: tuple[str, ...],
                   point: tuple[str, str, str, Any]) -> AsyncIterator[tuple[Env, Any]]:
    """The other services in process, `oma-service failover` as its own process, all on MariaDB; yields
    the environment and `run(action, vm_name)`: the action, killed with SIGKILL at `point` when its phase
    is that action and restarted, which must complete all the same."""
    phase, step, command, match = point
    in_process = tuple(s for s in services if s != "failover")
    async with replication_env(make_settings, tmp_path, {"job_latency": 0.2}, services=in_process,
                               **mariadb_settings(mariadb_name)) as env:
        proc = FailoverProcess(env.client.settings, tmp_path / "failover.log")
        proc.start()
        try:
            await wait_for(failover_up(env), timeout=60, interval=0.2)

            async def run(action: str, vm_name: str = "app01", **options: Any) -> dict[str, Any]:
                mark = len(env.sim.calls)
                held = None
                if phase == action:
                    if command.startswith("power:"):
                        held = hold_power(env, command.removeprefix("power:"))
                    elif command.startswith("replication:"):
                        held = hold_method(env.client.appliance.services["replication"].jobs,
                                           command.removeprefix("replication:"))
                    else:
                        env.sim.hang(command)
                failover_id = (await failover(env, action, vm_name, **options))["failover_id"]
                if held is not None:
                    await held(proc)
                elif phase == action:
                    await kill_on_call(env.sim, proc, mark, command, match)
                if phase == action:
                    proc.start()
                job = await finished(env, failover_id)
                assert job["status"] == "completed", job
                if phase == action:  # the kill landed inside the step, which ran again
                    assert next(s for s in job["steps"] if s["name"] == step)["attempts"] == 2, job["steps"]
                return job
            yield env, run
        finally:
            proc.stop()


@pytest.mark.parametrize("point", KILL_POINTS, ids=[f"{p}-{s}" for p, s, _, _ in KILL_POINTS])
async def test_kill_9_at_every_step_resumes_and_leaves_nothing(make_settings, tmp_path, mariadb_name, point):
    async with killable(make_settings, tmp_path, mariadb_name, SERVICES, point) as (env, run):
        reply = await prepare(env)
        await check_test_vm(env, await run("test"), reply)
        await run("cleanup")
        assert await leftovers(env.sim, {v["volume_id"] for v in reply["created_volumes"]}) == \
            {"vms": [], "volumes": [], "snapshots": []}


async def converters(proc: FailoverProcess) -> list[int]:
    """The virt-v2v-in-place processes the failover service started: each leads its own process group
    (a child virt-v2v forks, in that group, bears the same name for a moment)."""
    def leader(pid: int) -> bool:
        try:
            return os.getpgid(pid) == pid and Path(f"/proc/{pid}/comm").read_text().startswith("virt-v2v")
        except OSError:
            return False
    return [p for p in descendants(proc.proc.pid) if leader(p)]


async def test_kill_9_while_the_converter_runs_stops_it_resumes_and_compensates(make_settings, tmp_path,
                                                                                 mariadb_name):
    """The `convert` step's kill point: SIGKILL of the failover service while virt-v2v-in-place runs on
    the boot clone. The converter's process group (virt-v2v, its qemu) outlives the service and goes on
    writing the disk; the resumed step stops that group before it converts again (never two converters
    on one disk), virt-v2v then fails on this OS-less disk, and the compensation leaves no VM, volume,
    snapshot or process behind."""
    async with replication_env(make_settings, tmp_path, {"job_latency": 0.2}, services=SERVICES[:-1],
                               **mariadb_settings(mariadb_name)) as env:
        proc = FailoverProcess(env.client.settings, tmp_path / "failover.log", OMA_DEVICE_WAIT="5",
                               OMA_DEVICE_BY_ID_DIR=str(tmp_path / "dev"), OMA_CONVERT_TIMEOUT="900",
                               OMA_CONVERT_LIBGUESTFS_BACKEND_SETTINGS="force_tcg")
        proc.start()
        try:
            await wait_for(failover_up(env), timeout=60, interval=0.2)
            reply = await prepare(env, "conv01", disks=2)
            boot = min(reply["nbd_exports"], key=lambda e: e["disk_unit_number"])["device_path"]
            subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "no-os", boot], check=True)  # a filesystem, no OS
            failover_id = (await failover(env, "test", "conv01", convert="virt-v2v"))["failover_id"]
            [first] = await wait_for(lambda: converters(proc), timeout=120, interval=0.05)
            await asyncio.sleep(2)  # well inside the conversion (libguestfs' appliance boots for ~20 s)
            proc.kill()
            assert os.getpgid(first) == first and group_alive(first)   # the orphan converts on, in its group
            proc.start()
            [second] = await wait_for(lambda: converters(proc), timeout=120, interval=0.05)
            assert second != first and not group_alive(first)   # stopped before the second started ...
            log = (tmp_path / "failover.log").read_text()
            assert re.search(rf"stopping a conversion left running.*\b{first}\b", log), log[-3000:]  # ... by it
            job = await finished(env, failover_id, timeout=900)
            assert job["status"] == "compensated", job
            steps = {s["name"]: s for s in job["steps"]}
            assert (steps["convert"]["attempts"], steps["convert"]["status"]) == (2, "compensated"), steps
            assert "inspection could not detect the source guest" in job["error"], job["error"]
            replicas = {v["volume_id"] for v in reply["created_volumes"]}
            assert await leftovers(env.sim, replicas) == {"vms": [], "volumes": [], "snapshots": []}
            assert not group_alive(second) and not list((tmp_path / "data" / "convert").iterdir())
        finally:
            proc.stop()


LIVE_KILL_POINTS = [
    ("live", "power_off_source", "power:off", None), ("live", "snapshot", "createSnapshot", None), ("live", "release", "detachVolume", None),
    ("live", "create_vm", "deployVirtualMachine", None), ("live", "swap_root", "deleteVolume", None),
    ("live", "attach_data", "attachVolume", no_device_0), ("live", "start", "startVirtualMachine", None),
    ("live", "verify", "listNics", None),
    ("rollback", "stop_vm", "stopVirtualMachine", None), ("rollback", "detach_volumes", "detachVolume", None),
    ("rollback", "destroy_vm", "destroyVirtualMachine", None),
    ("rollback", "revert_snapshots", "revertSnapshot", None), ("rollback", "reattach", "attachVolume", None),
    ("rollback", "power_on_source", "power:on", None),
    ("rollback", "delete_snapshots", "deleteSnapshot", None)]


@pytest.mark.parametrize("point", LIVE_KILL_POINTS, ids=[f"{p}-{s}" for p, s, _, _ in LIVE_KILL_POINTS])
async def test_kill_9_during_live_cutover_and_rollback(make_settings, tmp_path, mariadb_name, point):
    with live_source() as vc:
        async with killable(make_settings, tmp_path, mariadb_name, LIVE_SERVICES, point) as (env, run):
            replicas = await prepare_live(env, vc)
            served = env.client.appliance.services["export_manager"].exporter.list_exports()
            await run("live", "live01", final_sync=False)  # no VMA here: the final sync is tested above
            [target] = [v for v in env.sim.vms.values() if v["name"] == "live01"]
            assert target["state"] == "Running" and power_state(vc, "live01") == "poweredOff"
            assert [v.id for v in sorted((v for v in env.sim.volumes.values() if v.vm_id == target["id"]),
                                         key=lambda v: v.device_id)] == replicas
            await run("rollback", "live01")
            await check_rolled_back(env, vc, replicas, served)


async def test_kill_9_during_the_final_sync_follows_the_same_sync(make_settings, tmp_path, mariadb_name):
    """The VMA's copy of the final sync is held (its `hang` fault) while the failover service is
    SIGKILLed: the restarted step waits for the same replication job (none is created twice), which
    completes once the copy goes on; the cutover completes and its rollback leaves nothing behind."""
    others = tuple(s for s in SETTINGS_SERVICES if s != "failover")
    async with orchestrated(make_settings, tmp_path, services=others, vm_spec={"nics": LIVE_NICS, "power_on": True},
                            **mariadb_settings(mariadb_name)) as (c, h, cloud, vma, vc):
        env = Env(c, h, cloud, c.config_id, tmp_path, [])
        proc = FailoverProcess(c.settings, tmp_path / "failover.log")
        proc.start()
        try:
            await wait_for(failover_up(env), timeout=60, interval=0.2)
            vm = await discovered_vm(c, h, vc)
            first, replicas, served = await mapped_and_synced(c, h, vm)
            written = (await vma.mutate(vm["path"], vm["disks"][0]["id"], 1))["bytes_written"]
            await vma.set_faults(hang=True)
            failover_id = (await failover(env, "live", VM))["failover_id"]

            async def final_sync_running():
                r = await c.get("/api/v1/replication/jobs", headers=h, params={"vm_name": VM})
                newer = [j for j in r.json()["jobs"] if j["job_id"] != first["job_id"]]
                return newer if newer and newer[0]["status"] == "replicating" else None
            [final] = await wait_for(final_sync_running, timeout=60, interval=0.05)
            proc.kill()
            proc.start()
            await vma.clear_faults()
            live = await finished(env, failover_id, timeout=120)
            assert live["status"] == "completed", live
            steps = {s["name"]: s for s in live["steps"]}
            assert steps["final_sync"]["attempts"] == 2 and live["final_sync_job_id"] == final["job_id"], steps
            r = await c.get("/api/v1/replication/jobs", headers=h, params={"vm_name": VM})
            assert [j["job_id"] for j in r.json()["jobs"]] == [final["job_id"], first["job_id"]]  # none twice
            done = await env.job(final["job_id"])
            assert done["status"] == "completed" and done["bytes_transferred"] == written, done
            assert power_state(vc, VM) == "poweredOff"
            back = await finished(env, (await failover(env, "rollback", VM))["failover_id"], timeout=120)
            assert back["status"] == "completed", back
            await check_rolled_back(env, vc, replicas, served, VM)
        finally:
            proc.stop()
