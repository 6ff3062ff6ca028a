"""Protection groups and schedules (issue 20): the action endpoints and their errors, the database
claims that keep two schedulers from firing a schedule or starting a VM twice (two schedulers on one
MariaDB), and scheduled incremental syncs end to end: real NATS, MariaDB, vcsim, the VMA simulator
(a real copy into nbdkit exports) and the CloudStack simulator, with a second `oma-service scheduler`
process running beside the appliance's own."""
from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path
from typing import Any

from pyVmomi import vim
from sqlalchemy import select, update

from oma.services.scheduler.models import V_COMPLETED, V_PENDING, V_STARTING, ExecutionVm, Schedule
from oma.services.scheduler.service import Scheduler, now_s
from oma.plugins.ossea.sim_vms import PROD_NETWORK_IDS
from oma.plugins.ossea.simulator import _vm_row
from oma.shared import db as dbmod
from oma.shared import preflight
from oma.shared.plugins import get_backend, get_plugin_manager
from oma.shared.schemas import GroupRequest, ScheduleRequest
from oma.shared.settings import SERVICES
from tests.conftest import assert_error_shape, login, mariadb_settings, running, wait_for
from tests.test_orchestration import VM, orchestrated
from tests.test_replication_faults import kill, start_service
from tests.test_replication import replication_env
from tests.vcsim import DiskSpec, NicSpec, create_vm, find_by_name, running_vcsim, snapshot

LIGHT = ("auth", "scheduler")


async def test_groups_and_schedules_actions_and_their_errors(make_settings):
    async with running(make_settings(scheduler_min_interval=5), services=LIGHT) as c:
        h = await login(c)
        assert_error_shape(await c.post("/api/v1/groups", json={"action": "get"}), 401)
        assert_error_shape(await c.post("/api/v1/schedules", json={"action": "get"}), 401)
        assert_error_shape(await c.post("/api/v1/preflight", json={"group_id": 1}), 401)
        assert_error_shape(await c.get("/api/v1/schedules/1/executions"), 401)

        r = await c.post("/api/v1/schedules", headers=h, json={"action": "create", "schedule": {
            "name": "hourly", "interval_seconds": 3600, "max_concurrent": 2}})
        assert r.status_code == 201, r.text
        sched = r.json()["schedule"]
        assert (sched["max_concurrent"], sched["skip_if_running"], sched["enabled"]) == (2, True, True)
        assert sched["next_run_at"]
        for bad, status in (({"action": "create", "schedule": {"name": "fast", "interval_seconds": 1}}, 400),
                            ({"action": "create", "schedule": {"name": "x"}}, 400),
                            ({"action": "create", "schedule": {"name": "hourly", "interval_seconds": 60}}, 409),
                            ({"action": "update", "id": 99, "schedule": {"enabled": False}}, 404),
                            ({"action": "update", "id": sched["id"]}, 400),
                            ({"action": "delete"}, 400), ({"action": "nope"}, 400),
                            ({"action": "create", "schedule": {"name": "s", "interval_seconds": "60"}}, 400)):
            assert_error_shape(await c.post("/api/v1/schedules", headers=h, json=bad), status)

        r = await c.post("/api/v1/groups", headers=h, json={"action": "create", "group": {
            "name": "db", "ossea_config_id": 1, "schedule_id": sched["id"], "vm_names": ["a", "b", "a"]}})
        assert r.status_code == 201, r.text
        group = r.json()["group"]
        assert (group["vm_names"], group["vm_count"], group["next_run_at"]) == (["a", "b"], 2, sched["next_run_at"])
        r = await c.post("/api/v1/groups", headers=h, json={"action": "add_vms", "id": group["id"],
                                                             "vm_names": ["c", "a", "C", "B"]})
        assert r.json()["group"]["vm_names"] == ["a", "b", "c"], r.text  # names compare as MariaDB does
        r = await c.post("/api/v1/groups", headers=h, json={"action": "remove_vms", "id": group["id"],
                                                             "vm_names": ["b"]})
        assert r.json()["group"]["vm_names"] == ["a", "c"], r.text
        r = await c.post("/api/v1/groups", headers=h, json={"action": "update", "id": group["id"], "group": {
            "vm_names": ["c", "d"], "description": "databases"}})
        assert (r.json()["group"]["vm_names"], r.json()["group"]["description"]) == (["c", "d"], "databases")
        for bad, status in (({"action": "create", "group": {"name": "g"}}, 400),
                            ({"action": "create", "group": {"name": "db", "ossea_config_id": 1}}, 409),
                            ({"action": "create", "group": {"name": "g2", "ossea_config_id": 1,
                                                            "schedule_id": 999}}, 404),
                            ({"action": "add_vms", "id": group["id"]}, 400),
                            ({"action": "add_vms", "id": 999, "vm_names": ["x"]}, 404),
                            ({"action": "get", "id": 0}, 400),
                            ({"action": "create", "group": {"name": "g3", "ossea_config_id": 1,
                                                            "vm_names": ["a\nb"]}}, 400)):
            assert_error_shape(await c.post("/api/v1/groups", headers=h, json=bad), status)
        r = await c.post("/api/v1/groups", headers=h, json={"action": "get"})
        assert [g["name"] for g in r.json()["groups"]] == ["db"]

        # The schedule fired at the first round (no VM in the inventory: each fails with its reason).
        r = await c.get(f"/api/v1/schedules/{sched['id']}/executions", headers=h)
        assert r.status_code == 200 and r.json()["total"] >= 0, r.text
        assert_error_shape(await c.get("/api/v1/schedules/999/executions", headers=h), 404)
        assert_error_shape(await c.get(f"/api/v1/schedules/{sched['id']}/executions/exec-nope", headers=h), 404)
        assert_error_shape(await c.post("/api/v1/preflight", headers=h, json={"vm_names": ["a"]}), 400)
        assert_error_shape(await c.post("/api/v1/preflight", headers=h, json={"group_id": 999}), 404)

        # Deleting the schedule unlinks its groups; deleting the group removes it.
        r = await c.post("/api/v1/schedules", headers=h, json={"action": "delete", "id": sched["id"]})
        assert r.status_code == 200, r.text
        r = await c.post("/api/v1/groups", headers=h, json={"action": "get", "id": group["id"]})
        assert r.json()["group"]["schedule_id"] is None
        r = await c.post("/api/v1/groups", headers=h, json={"action": "delete", "id": group["id"]})
        assert r.status_code == 200, r.text
        assert_error_shape(await c.post("/api/v1/groups", headers=h, json={"action": "get", "id": group["id"]}), 404)


async def _scheduler_on(settings, name: str) -> tuple[Scheduler, Any]:
    storage = get_backend(get_plugin_manager(), "storage", settings.db_type).factory(settings)
    engine = await storage.create_engine("scheduler")
    await dbmod.run_migrations(engine, "scheduler", Path("services/scheduler/migrations"))
    import logging
    return Scheduler(settings=settings, bus=None, sessions=dbmod.sessionmaker(engine),
                     log=logging.getLogger(name), instance=name, spawn=None), engine


async def test_two_schedulers_on_one_mariadb_fire_once_and_claim_each_vm_once(make_settings, mariadb_name):
    """Two schedulers with their own connection pools race on the same rows: a due schedule makes one
    execution per group however often both fire it, and the group's VMs are claimed once each, never
    more than max_concurrent at a time."""
    settings = make_settings(**mariadb_settings(mariadb_name), scheduler_min_interval=1)
    (one, e1), (two, e2) = await _scheduler_on(settings, "one"), await _scheduler_on(settings, "two")
    try:
        r = await one.schedules(ScheduleRequest(action="create", schedule={
            "name": "s", "interval_seconds": 3600, "max_concurrent": 7}))
        sid = r.body["schedule"]["id"]
        for name in ("g1", "g2"):
            await one.groups(GroupRequest(action="create", group={
                "name": name, "ossea_config_id": 1, "schedule_id": sid,
                "vm_names": [f"{name}-vm{i:02d}" for i in range(50)]}))
        fired = await asyncio.gather(*(s.fire_due() for _ in range(10) for s in (one, two)))
        assert sum(fired) == 1
        listed = await one.executions({"schedule_id": sid})
        assert listed["total"] == 2 and all(e["vms"]["pending"] == 50 for e in listed["executions"])

        async with one.sessions() as db:
            groups = sorted(set((await db.scalars(select(ExecutionVm.group_id))).all()))
        claims: Counter[str] = Counter()
        owners: Counter[str] = Counter()
        for i in range(20):
            for targets in ([[gid] for gid in groups] if i % 2 else [groups]):  # one group, or both at once
                first = (one, two) if i % 4 < 2 else (two, one)  # each leads in turn
                results = await asyncio.gather(*(s.claim(targets) for s in (*first, *first)))
                batch = [c[2] for claimed in results for c in claimed]
                assert max(Counter(vm.split("-")[0] for vm in batch).values(), default=0) <= 7, batch
                claims.update(batch)
            async with one.sessions() as db:
                owners.update((await db.scalars(select(ExecutionVm.claimed_by).where(
                    ExecutionVm.status == V_STARTING))).all())
            async with one.sessions.begin() as db:  # the syncs end: room for the next ones
                await db.execute(update(ExecutionVm).where(ExecutionVm.status == V_STARTING)
                                 .values(status=V_COMPLETED))
        assert len(claims) == 100 and set(claims.values()) == {1}
        assert set(owners) == {"one", "two"}, owners
        async with one.sessions() as db:
            assert not (await db.scalars(select(ExecutionVm).where(ExecutionVm.status == V_PENDING))).all()
        await one.close_finished()
        listed = await two.executions({"schedule_id": sid})
        assert [e["status"] for e in listed["executions"]] == ["completed", "completed"]
        async with one.sessions() as db:
            sched = await db.get(Schedule, sid)
            assert sched.next_run_at > now_s()
    finally:
        await e1.dispose()
        await e2.dispose()


GROUP_VMS = [f"sched-vm{i}" for i in range(5)]
DONE = ("completed", "failed", "cancelled")


async def make_group(client, h, vms: list[str], **schedule: Any) -> tuple[dict, dict]:
    r = await client.post("/api/v1/schedules", headers=h, json={"action": "create", "schedule": {
        "name": "warm", **schedule}})
    assert r.status_code == 201, r.text
    sched = r.json()["schedule"]
    r = await client.post("/api/v1/groups", headers=h, json={"action": "create", "group": {
        "name": "wave-1", "ossea_config_id": client.config_id, "schedule_id": sched["id"], "vm_names": vms}})
    assert r.status_code == 201, r.text
    return sched, r.json()["group"]


async def jobs_of(client, h, group_id: int) -> list[dict]:
    r = await client.get("/api/v1/replication/jobs", headers=h, params={"limit": 1000})
    assert r.status_code == 200, r.text
    return [j for j in r.json()["jobs"] if j.get("vm_group_id") == str(group_id)]


async def test_a_group_syncs_on_schedule_at_most_n_at_once_with_two_schedulers(make_settings, tmp_path,
                                                                                mariadb_name):
    log = tmp_path / "scheduler-2.log"
    async with orchestrated(make_settings, tmp_path, scheduler_tick=0.2, scheduler_min_interval=1,
                            **mariadb_settings(mariadb_name)) as (client, h, cloud, vma, vc):
        with vc.service_instance() as si:
            for name in GROUP_VMS:
                create_vm(si, name, disks=(DiskSpec(1, unit=0),), cbt=True)
        r = await client.get("/api/v1/vms/discover", params={"vcenter": vc.host}, headers=h)
        assert r.status_code == 200, r.text
        second = await start_service("scheduler", client.settings, log)
        try:
            await wait_for(lambda: _true_after_ping(client), timeout=30)
            sched, group = await make_group(client, h, GROUP_VMS, interval_seconds=3, max_concurrent=2)
            most = 0

            async def sample() -> None:  # replication's view of the group's syncs in flight
                nonlocal most
                while True:
                    live = [j for j in await jobs_of(client, h, group["id"]) if j["status"] not in DONE]
                    most = max(most, len(live))
                    await asyncio.sleep(0.1)
            sampler = asyncio.create_task(sample())

            async def two_rounds_each():
                jobs = await jobs_of(client, h, group["id"])
                done = Counter(j["vm_name"] for j in jobs if j["status"] == "completed")
                return jobs if all(done[n] >= 2 for n in GROUP_VMS) else None
            try:
                jobs = await wait_for(two_rounds_each, timeout=150, interval=0.5)
            finally:
                sampler.cancel()
            assert 1 <= most <= 2, most
            assert not [j for j in jobs if j["status"] == "failed"], [j["error"] for j in jobs]
            # One job per VM and execution, whichever scheduler started it.
            per_run = Counter((j["schedule_execution_id"], j["vm_name"]) for j in jobs)
            assert set(per_run.values()) == {1}, per_run
            assert all(j["replication_type"] == "incremental" and j["scheduled_by"].startswith("scheduler:")
                       for j in jobs)

            r = await client.get(f"/api/v1/schedules/{sched['id']}/executions", headers=h)
            assert r.status_code == 200, r.text
            runs = r.json()["executions"]
            ran = [e for e in runs if e["vms_started"]]
            assert {e["execution_id"] for e in ran} == {j["schedule_execution_id"] for j in jobs}
            assert all(e["group_id"] == group["id"] for e in runs)
            detail = (await client.get(f"/api/v1/schedules/{sched['id']}/executions/{ran[-1]['execution_id']}",
                                       headers=h)).json()["executions"][0]
            assert sorted(v["vm_name"] for v in detail["vm_results"]) == GROUP_VMS
            assert {v["status"] for v in detail["vm_results"]} == {"completed"}, detail["vm_results"]
            by_job = {j["job_id"]: j for j in jobs}
            assert all(by_job[v["job_id"]]["schedule_execution_id"] == detail["execution_id"]
                       for v in detail["vm_results"])
            # Later incrementals copied CBT deltas (nothing changed: nothing moved).
            later = [j for j in jobs if j["vma_sync_type"] == "incremental"]
            assert later and all(j["bytes_transferred"] == 0 for j in later), later
        finally:
            await kill(second)
    text = log.read_text(errors="replace")
    assert "scheduler running" in text and "Traceback" not in text, text[-3000:]


async def _true_after_ping(client) -> bool:
    r = await client.get("/health")
    return r.status_code == 200 and "scheduler" in r.json().get("services", {})


async def test_mutating_more_between_cycles_shows_a_rising_dirty_rate(make_settings, tmp_path):
    """1 %, 2 % and 4 % of a disk written between scheduled cycles: each cycle's incremental copies what
    changed, and the VM context shows the dirty rate rising with it."""
    async with orchestrated(make_settings, tmp_path, scheduler_tick=0.2, scheduler_min_interval=1) as \
            (client, h, cloud, vma, vc):
        r = await client.get("/api/v1/vms/discover", params={"vcenter": vc.host}, headers=h)
        vm = next(v for v in r.json()["vms"] if v["name"] == VM)
        disk_bytes = sum(d["capacity_bytes"] for d in vm["disks"])
        # A long interval: the cycles are started by `run`, so each mutation lands between two syncs.
        sched, group = await make_group(client, h, [VM], interval_seconds=3600, max_concurrent=1)

        async def cycle(n: int) -> dict:
            async def finished():
                r = await client.get(f"/api/v1/schedules/{sched['id']}/executions", headers=h)
                runs = [e for e in r.json()["executions"] if e["status"] == "completed" and e["vms_started"]]
                return runs if len(runs) >= n else None
            try:
                await wait_for(finished, timeout=60, interval=0.5)
            except AssertionError:
                r = await client.get(f"/api/v1/schedules/{sched['id']}/executions", headers=h)
                last = r.json()["executions"][0]["execution_id"] if r.json()["executions"] else "-"
                r2 = await client.get(f"/api/v1/schedules/{sched['id']}/executions/{last}", headers=h)
                raise AssertionError(f"cycle {n} did not finish: {r.json()} {r2.text}") from None
            job = max((j for j in await jobs_of(client, h, group["id"])), key=lambda j: j["created_at"] + j["job_id"])
            assert job["status"] == "completed", job

            async def context_has_it():
                r = await client.get(f"/api/v1/vm-contexts/{VM}", headers=h)
                return r.json() if r.status_code == 200 and r.json()["current_job"]["id"] == job["job_id"] \
                    and r.json()["current_job"]["status"] == "completed" else None
            return await wait_for(context_has_it, timeout=20)

        ctx = await cycle(1)  # the first sync is a full copy: no dirty rate
        assert ctx["current_job"]["dirty_rate"] is None and ctx["context"]["cycles"]["sync_count"] == 1
        rates, written = [], []
        for n, percent in enumerate((1, 2, 4), start=2):
            written.append((await vma.mutate(vm["path"], vm["disks"][0]["id"], percent))["bytes_written"])
            r = await client.post("/api/v1/schedules", headers=h, json={"action": "run", "id": sched["id"]})
            assert r.status_code == 200, r.text
            ctx = await cycle(n)
            job = ctx["current_job"]
            assert job["vma_sync_type"] == "incremental" and job["bytes_transferred"] == written[-1], job
            assert job["dirty_rate"] == round(written[-1] / disk_bytes, 6)
            assert ctx["context"]["cycles"]["dirty_rate"] == job["dirty_rate"]
            assert ctx["context"]["cycles"]["last_changed_bytes"] == written[-1]
            assert ctx["context"]["cycles"]["estimated_cutover_seconds"] > 0
            rates.append(job["dirty_rate"])
        assert rates[0] < rates[1] < rates[2], rates
        assert ctx["context"]["cycles"]["sync_count"] == 4
        assert [j["dirty_rate"] for j in ctx["job_history"][:3]] == rates[::-1]


# --- preflight ---------------------------------------------------------------------------------
PREFLIGHT_VMS = {  # name -> (create_vm keywords, the checks that must fail)
    "pf-ok": (dict(cbt=True, nics=[NicSpec("VM Network")]), set()),
    "pf-nocbt": (dict(cbt=False), {"cbt"}),
    "pf-disks": (dict(cbt=True, disks=[DiskSpec(1, unit=u) for u in range(3)]), {"disk_slots"}),
    "pf-net": (dict(cbt=True, nics=[NicSpec("DC0_DVPG0")]), {"network"}),
    "pf-taken": (dict(cbt=True), {"target_name"}),
    "pf-snap": (dict(cbt=False, snapshots=1), {"cbt", "snapshots"}),  # CBT cannot be enabled until removed
}


async def test_preflight_flags_each_problem_with_a_reason_and_replication_refuses_with_the_same(
        make_settings, tmp_path):
    with running_vcsim() as vc:
        with vc.service_instance() as si:
            for name, (kw, _) in PREFLIGHT_VMS.items():
                kw = {"disks": [DiskSpec(1)], **kw}
                snaps = kw.pop("snapshots", 0)
                made = create_vm(si, name, **kw)
                for n in range(snaps):
                    snapshot(made, f"{name}-{n}")
        async with replication_env(make_settings, tmp_path, services=SERVICES, max_attached_disks=2) as env:
            c, h = env.client, env.headers
            env.sim.vms["c0ffee00-0000-4000-8000-000000000001"] = _vm_row(
                "c0ffee00-0000-4000-8000-000000000001", "pf-taken", "OSSEA-Zone")  # the name is taken
            r = await c.post("/api/v1/vcenter/config", headers=h, json={"action": "create", "configuration": {
                "name": "lab", "host": vc.host, "port": vc.port, "username": vc.username,
                "password": vc.password, "verify_tls": False}})
            assert r.status_code == 201, r.text
            found = (await c.get("/api/v1/vms/discover", params={"vcenter": "lab"}, headers=h)).json()["vms"]
            source = {v["name"]: v for v in found}
            assert (source["pf-snap"]["snapshot_count"], source["pf-ok"]["snapshot_count"]) == (1, 0)
            r = await c.post("/api/v1/network/mappings", headers=h, json={"action": "create", "mapping": {
                "source_network": "VM Network", "production_network_id": PROD_NETWORK_IDS[0]}})
            assert r.status_code == 201, r.text
            r = await c.post("/api/v1/groups", headers=h, json={"action": "create", "group": {
                "name": "pf", "ossea_config_id": env.config_id, "vm_names": ["pf-unknown"],
                "vm_filter": {"name_pattern": "pf-*"}}})  # the discovered pf-* VMs by filter
            assert r.status_code == 201, r.text

            r = await c.post("/api/v1/preflight", headers=h, json={"group_id": r.json()["group"]["id"]})
            assert r.status_code == 200, r.text
            results = {x["vm_name"]: x for x in r.json()["results"]}
            assert r.json()["summary"] == {"vms": 7, "ready": 1, "not_ready": 6}
            assert [c_["check"] for c_ in results["pf-ok"]["checks"]] == list(preflight.CHECKS)
            assert {c_["status"] for c_ in results["pf-ok"]["checks"]} == {"pass"}, results["pf-ok"]
            assert results["pf-unknown"]["checks"][0]["check"] == "inventory"
            volumes = set(env.sim.volumes)
            for name, (_, expected) in PREFLIGHT_VMS.items():
                failed = [c_ for c_ in results[name]["checks"] if c_["status"] == "fail"]
                assert {c_["check"] for c_ in failed} == expected, results[name]
                assert all(c_["reason"] for c_ in results[name]["checks"])
                r = await env.post({"source_vm": source[name], "ossea_config_id": env.config_id,
                                    "replication_type": "incremental"})
                if not expected:
                    assert r.status_code == 201, r.text
                    continue
                body = assert_error_shape(r, 400)
                assert body["error"] == "Preflight failed"
                assert all(c_["reason"] in body["details"] for c_ in failed), (body, failed)
            assert {v for v in env.sim.volumes if v not in volumes} == \
                {v["volume_id"] for v in (await jobs_for(env, "pf-ok"))[0]["disks"]}  # refused: nothing made
            reasons = {n: [c_["reason"] for c_ in results[n]["checks"] if c_["status"] == "fail"] for n in results}
            assert "3 new data disks" in reasons["pf-disks"][0] and "at most 2" in reasons["pf-disks"][0]
            assert "'DC0_DVPG0'" in reasons["pf-net"][0] and "CBT" in reasons["pf-nocbt"][0]
            assert "1 snapshot(s) and CBT is off" in reasons["pf-snap"][1] and "remove them" in reasons["pf-snap"][1]

            # The account's volume limit reached: a new VM cannot get its volumes; one that holds its
            # volumes already (pf-ok, for its next incremental) needs none.
            env.sim.max_volumes = len(env.sim.volumes)
            r = await c.post("/api/v1/preflight", headers=h, json={"vm_names": ["pf-taken", "pf-ok"],
                                                                   "ossea_config_id": env.config_id})
            results = {x["vm_name"]: x for x in r.json()["results"]}
            limit = next(c_ for c_ in results["pf-taken"]["checks"] if c_["check"] == "volume_limit")
            assert limit["status"] == "fail" and "volume limit is reached" in limit["reason"], limit
            assert next(c_ for c_ in results["pf-ok"]["checks"] if c_["check"] == "volume_limit")["status"] == "pass"
            body = assert_error_shape(await env.post({"source_vm": source["pf-taken"],
                                                      "ossea_config_id": env.config_id}), 400)
            assert limit["reason"] in body["details"]

            # No customized disk offering left: no volume can be made to a disk's size.
            env.sim.max_volumes = 10_000
            customized = [o for o in env.sim.offerings.values() if o.get("iscustomized")]
            for o in customized:
                o["iscustomized"] = False
            r = await c.post("/api/v1/preflight", headers=h, json={"vm_names": ["pf-ok"],
                                                                   "ossea_config_id": env.config_id})
            [offering] = [c_ for c_ in r.json()["results"][0]["checks"] if c_["check"] == "disk_offering"]
            assert offering["status"] == "fail" and "no customized disk offering" in offering["reason"], offering
            body = assert_error_shape(await env.post({"source_vm": source["pf-taken"],
                                                      "ossea_config_id": env.config_id}), 400)
            assert offering["reason"] in body["details"] and "limit" not in body["details"], body
            for o in customized:
                o["iscustomized"] = True

            # A snapshot taken on a VM with CBT on, seen by the next discovery: a warn, still ready.
            with vc.service_instance() as si:
                snapshot(find_by_name(si, vim.VirtualMachine, "pf-ok"), "before-cutover")
            found = (await c.get("/api/v1/vms/discover", params={"vcenter": "lab"}, headers=h)).json()["vms"]
            assert next(v for v in found if v["name"] == "pf-ok")["snapshot_count"] == 1
            r = await c.post("/api/v1/preflight", headers=h, json={"vm_names": ["pf-ok"],
                                                                   "ossea_config_id": env.config_id})
            [snaps] = [c_ for c_ in r.json()["results"][0]["checks"] if c_["check"] == "snapshots"]
            assert snaps["status"] == "warn" and "has 1 snapshot(s): CBT is on" in snaps["reason"], snaps
            assert r.json()["results"][0]["ready"] is True, r.json()


async def jobs_for(env, vm_name: str) -> list[dict]:
    r = await env.client.get("/api/v1/replication/jobs", headers=env.headers, params={"vm_name": vm_name})
    return [await env.job(j["job_id"]) for j in r.json()["jobs"]]
