"""Protection groups by filter over the inventory (issue 20): a group's members are its `vm_names` and
the discovered VMs matching its `vm_filter` (folder, name pattern, datacenter), resolved at each run.
Real NATS, vcsim and the inventory service; replication is not running, so each VM's start fails with
its reason, and the execution's VMs are exactly the members."""
from __future__ import annotations

from pyVmomi import vim

from tests.conftest import assert_error_shape, login, running, wait_for
from tests.vcsim import create_vm, find_by_name, running_vcsim

SERVICES = ("auth", "inventory", "scheduler")


async def _members(c, h, sched_id: int, group_id: int) -> list[str]:
    async def run():
        r = await c.get(f"/api/v1/schedules/{sched_id}/executions", headers=h, params={"group_id": group_id})
        runs = r.json()["executions"]
        return runs[0] if runs else None
    first = await wait_for(run, timeout=20, interval=0.2)
    r = await c.get(f"/api/v1/schedules/{sched_id}/executions/{first['execution_id']}", headers=h)
    return sorted(v["vm_name"] for v in r.json()["executions"][0]["vm_results"])


async def test_a_group_by_filter_runs_the_matching_inventory_vms_with_its_named_ones(make_settings):
    with running_vcsim() as vc:
        with vc.service_instance() as si:
            dc = find_by_name(si, vim.Datacenter, "DC0")
            prod = dc.vmFolder.CreateFolder("prod")
            for name in ("db-1", "DB-2", "web-9"):
                create_vm(si, name, folder=prod)
            for name in ("db-3", "web-1"):
                create_vm(si, name)
        async with running(make_settings(scheduler_min_interval=1, scheduler_tick=0.2), services=SERVICES) as c:
            h = await login(c)
            r = await c.post("/api/v1/vcenter/config", headers=h, json={"action": "create", "configuration": {
                "name": "lab", "host": vc.host, "port": vc.port, "username": vc.username,
                "password": vc.password, "verify_tls": False}})
            assert r.status_code == 201, r.text
            found = (await c.get("/api/v1/vms/discover", params={"vcenter": "lab"}, headers=h)).json()["vms"]
            assert next(v for v in found if v["name"] == "db-1")["path"] == "/DC0/vm/prod/db-1"

            cases = {  # filter, named VMs -> the members
                "prod-db": ({"folder": "/DC0/vm/prod/", "name_pattern": "db-*"}, [], ["DB-2", "db-1"]),
                "all-db": ({"name_pattern": "DB-*"}, ["web-1"], ["DB-2", "db-1", "db-3", "web-1"]),
                "dc-web": ({"datacenter": "DC0", "name_pattern": "web-?"}, ["web-1"], ["web-1", "web-9"]),
                "prod": ({"folder": "/DC0/vm/prod"}, [], ["DB-2", "db-1", "web-9"]),
                "none": ({"datacenter": "DC9"}, [], []),
            }
            for name, (vm_filter, named, members) in cases.items():
                r = await c.post("/api/v1/schedules", headers=h, json={"action": "create", "schedule": {
                    "name": name, "interval_seconds": 3600}})
                sched = r.json()["schedule"]
                r = await c.post("/api/v1/groups", headers=h, json={"action": "create", "group": {
                    "name": name, "ossea_config_id": 1, "schedule_id": sched["id"], "vm_names": named,
                    "vm_filter": vm_filter}})
                assert r.status_code == 201, r.text
                group = r.json()["group"]
                assert (group["vm_filter"], group["vm_names"]) == (vm_filter, named)
                assert await _members(c, h, sched["id"], group["id"]) == members, name

            # The filter is resolved at each run: a VM discovered later is in the next one.
            with vc.service_instance() as si:
                create_vm(si, "db-4", folder=find_by_name(si, vim.Folder, "prod"))
            await c.get("/api/v1/vms/discover", params={"vcenter": "lab"}, headers=h)
            groups = {g["name"]: g for g in (await c.post("/api/v1/groups", headers=h,
                                                           json={"action": "get"})).json()["groups"]}
            r = await c.post("/api/v1/schedules", headers=h, json={"action": "run",
                                                                    "id": groups["prod-db"]["schedule_id"]})
            assert r.status_code == 200, r.text

            async def second():
                r = await c.get(f"/api/v1/schedules/{groups['prod-db']['schedule_id']}/executions", headers=h)
                return r.json()["executions"] if r.json()["total"] == 2 else None
            latest = (await wait_for(second, timeout=20, interval=0.2))[0]
            r = await c.get(f"/api/v1/schedules/{latest['schedule_id']}/executions/{latest['execution_id']}",
                            headers=h)
            assert sorted(v["vm_name"] for v in r.json()["executions"][0]["vm_results"]) == ["DB-2", "db-1", "db-4"]

            # `{}` removes the filter; a filter field that is not one is refused.
            r = await c.post("/api/v1/groups", headers=h, json={"action": "update", "id": groups["prod"]["id"],
                                                                 "group": {"vm_filter": {}}})
            assert r.json()["group"]["vm_filter"] is None, r.text
            assert_error_shape(await c.post("/api/v1/groups", headers=h, json={
                "action": "update", "id": groups["prod"]["id"], "group": {"vm_filter": {"cluster": "x"}}}), 400)


async def test_a_filter_the_inventory_cannot_resolve_skips_the_run_with_the_reason(make_settings):
    """No inventory service: the run is recorded skipped, saying why, rather than run on the named VMs
    alone or retried every round."""
    async with running(make_settings(scheduler_min_interval=1, scheduler_tick=0.2),
                       services=("auth", "scheduler")) as c:
        h = await login(c)
        r = await c.post("/api/v1/schedules", headers=h, json={"action": "create", "schedule": {
            "name": "s", "interval_seconds": 3600}})
        sched = r.json()["schedule"]
        r = await c.post("/api/v1/groups", headers=h, json={"action": "create", "group": {
            "name": "g", "ossea_config_id": 1, "schedule_id": sched["id"], "vm_names": ["a"],
            "vm_filter": {"name_pattern": "db-*"}}})
        assert r.status_code == 201, r.text

        async def run():
            r = await c.get(f"/api/v1/schedules/{sched['id']}/executions", headers=h)
            return r.json()["executions"] or None
        [execution] = await wait_for(run, timeout=30, interval=0.2)
        assert execution["status"] == "skipped" and execution["vms_total"] == 0, execution
        assert "vm_filter could not be resolved" in execution["message"], execution
