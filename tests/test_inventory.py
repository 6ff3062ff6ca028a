"""The inventory service through the gateway, against a real vCenter simulator (vcsim), real
NATS, SQLite and MariaDB: vCenter connections, discovery, re-discovery, listing."""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from prometheus_client import REGISTRY
from pyVmomi import vim
from sqlalchemy import text

from oma.shared.schemas import ReplicationRequest
from oma.shared.subjects import Inventory
from tests.conftest import assert_error_shape, login, mariadb_settings, running, wait_for
from tests.vcsim import (DiskSpec, NicSpec, Vcsim, create_vm, read_vm_direct, running_vcsim,
                         wait_for_task)

URL = "/api/v1/vcenter/config"
GIB = 1024 ** 3
SECRET = "Vc-Pa55w0rd-never-shown"
CONFIG_FIELDS = {"id", "name", "host", "port", "username", "password", "datacenter", "verify_tls", "appliance_id",
                 "created_at", "updated_at"}
SERVICES = ("auth", "inventory")


@pytest.fixture
def sim() -> Iterator[Vcsim]:
    """A fresh default model (1 DC, 4 VMs) that a test may change."""
    with running_vcsim() as s:
        yield s


def vc_config(sim: Vcsim, **overrides: Any) -> dict[str, Any]:
    return {"host": sim.host, "port": sim.port, "username": sim.username, "password": sim.password,
            "verify_tls": False, **overrides}


async def add_vcenter(client, h, sim: Vcsim, **overrides: Any) -> dict[str, Any]:
    r = await client.post(URL, json={"action": "create", "configuration": vc_config(sim, **overrides)}, headers=h)
    assert r.status_code == 201, r.text
    return r.json()["configuration"]


async def discover(client, h, vcenter: str, status: int = 200) -> dict[str, Any]:
    r = await client.get("/api/v1/vms/discover", params={"vcenter": vcenter}, headers=h)
    if status != 200:
        return assert_error_shape(r, status)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["success"] is True and set(body) == {"success", "vcenter", "vms", "summary"}, body.keys()
    return body


def discoveries(result: str) -> float:
    return REGISTRY.get_sample_value("oma_inventory_discoveries_total", {"result": result}) or 0.0


def all_vms(si) -> dict[str, Any]:
    content = si.RetrieveContent()
    view = content.viewManager.CreateContainerView(content.rootFolder, [vim.VirtualMachine], True)
    try:
        return {vm._moId: vm for vm in view.view}
    finally:
        view.DestroyView()


def add_disk(vm, size_gb: int) -> None:
    """ReconfigVM_Task: one more thin disk on the VM's first SCSI controller."""
    devices = vm.config.hardware.device
    ctl = next(d for d in devices if isinstance(d, vim.vm.device.VirtualSCSIController))
    used = {d.unitNumber for d in devices if getattr(d, "controllerKey", None) == ctl.key}
    unit = next(u for u in range(16) if u not in used and u != 7)
    ds = vm.datastore[0].name
    disk = vim.vm.device.VirtualDisk(
        key=-1, controllerKey=ctl.key, unitNumber=unit, capacityInKB=size_gb * GIB // 1024,
        capacityInBytes=size_gb * GIB,
        backing=vim.vm.device.VirtualDisk.FlatVer2BackingInfo(
            fileName=f"[{ds}] {vm.name}/{vm.name}_extra.vmdk", diskMode="persistent", thinProvisioned=True))
    spec = vim.vm.ConfigSpec(deviceChange=[vim.vm.device.VirtualDeviceSpec(
        operation="add", fileOperation="create", device=disk)])
    wait_for_task(vm.ReconfigVM_Task(spec=spec))


def destroy(vm) -> None:
    if vm.runtime.powerState == "poweredOn":
        wait_for_task(vm.PowerOffVM_Task())
    wait_for_task(vm.Destroy_Task())


# -- vCenter connections -----------------------------------------------------------------------

async def test_vcenter_config_crud_test_and_errors(make_settings, sim: Vcsim) -> None:
    async with running(make_settings(), services=SERVICES) as client:
        h = await login(client)
        r = await client.post(URL, json={"action": "get"}, headers=h)
        assert r.status_code == 200 and r.json() == {"success": True, "configurations": []}

        # Defaults: port 443, verify_tls true, name = host, no datacenter.
        r = await client.post(URL, json={"action": "create", "configuration": {
            "host": "vc1.example.com", "username": "administrator@vsphere.local", "password": SECRET}}, headers=h)
        assert r.status_code == 201, r.text
        cfg = r.json()["configuration"]
        assert set(cfg) == CONFIG_FIELDS
        assert (cfg["name"], cfg["host"], cfg["port"], cfg["verify_tls"], cfg["datacenter"], cfg["password"]) == \
            ("vc1.example.com", "vc1.example.com", 443, True, None, "[REDACTED]")

        sim_cfg = await add_vcenter(client, h, sim, name="lab-vcsim", datacenter="DC0")
        assert (sim_cfg["name"], sim_cfg["port"], sim_cfg["verify_tls"], sim_cfg["datacenter"]) == \
            ("lab-vcsim", sim.port, False, "DC0")

        r = await client.post(URL, json={"action": "get"}, headers=h)
        assert [c["id"] for c in r.json()["configurations"]] == [cfg["id"], sim_cfg["id"]]
        assert all(c["password"] == "[REDACTED]" for c in r.json()["configurations"])
        r = await client.post(URL, json={"action": "get", "id": sim_cfg["id"]}, headers=h)
        assert r.status_code == 200 and r.json() == {"success": True, "configuration": sim_cfg}

        # 409 on a host (or name) that exists; 400 naming what is missing or wrong.
        r = await client.post(URL, json={"action": "create", "configuration": {
            "host": "vc1.example.com", "username": "x", "password": "y", "name": "other"}}, headers=h)
        assert "vc1.example.com" in assert_error_shape(r, 409)["details"]
        r = await client.post(URL, json={"action": "create", "configuration": {
            "host": "vc2.example.com", "username": "x", "password": "y", "name": "lab-vcsim"}}, headers=h)
        assert_error_shape(r, 409)
        r = await client.post(URL, json={"action": "create", "configuration": {"host": "vc3", "username": "x"}},
                              headers=h)
        assert "password" in assert_error_shape(r, 400)["details"]
        r = await client.post(URL, json={"action": "create", "configuration": {
            "host": "vc3", "username": "x", "password": "y", "port": 70000}}, headers=h)
        assert "port" in assert_error_shape(r, 400)["details"]
        r = await client.post(URL, json={"action": "explode"}, headers=h)
        assert_error_shape(r, 400)
        r = await client.post(URL, json={"action": "update", "configuration": {"name": "x"}}, headers=h)
        assert "id" in assert_error_shape(r, 400)["details"]

        # 404 for every action on an unknown id.
        for action in ("get", "update", "delete", "test"):
            r = await client.post(URL, json={"action": action, "id": 999, "configuration": {"name": "n"}}, headers=h)
            assert assert_error_shape(r, 404)["error"] == "vCenter configuration not found"

        # Partial update: only the given fields change.
        r = await client.post(URL, json={"action": "update", "id": cfg["id"], "configuration": {
            "name": "vc-one", "password": SECRET + "2"}}, headers=h)
        assert r.status_code == 200, r.text
        upd = r.json()["configuration"]
        assert (upd["name"], upd["host"], upd["username"], upd["password"]) == \
            ("vc-one", "vc1.example.com", "administrator@vsphere.local", "[REDACTED]")
        r = await client.post(URL, json={"action": "update", "id": cfg["id"],
                                         "configuration": {"host": sim.host, "password": "p"}}, headers=h)
        assert_error_shape(r, 409)  # (without the password a new host is a 400 first: tests/test_secret_updates.py)

        # test: a stored configuration, then a full one given inline; both really log in.
        r = await client.post(URL, json={"action": "test", "id": sim_cfg["id"]}, headers=h)
        assert r.status_code == 200, r.text
        assert r.json()["success"] is True
        assert r.json()["details"]["api_version"] == "6.5" and r.json()["details"]["vm_count"] == 4
        r = await client.post(URL, json={"action": "test", "configuration": vc_config(sim)}, headers=h)
        assert r.status_code == 200 and r.json()["details"]["vm_count"] == 4, r.text
        r = await client.post(URL, json={"action": "test", "configuration": {"host": sim.host}}, headers=h)
        assert "username" in assert_error_shape(r, 400)["details"]

        # Stored ciphertext, not the password.
        inv = client.appliance.services["inventory"]
        async with inv.sessions() as db:
            stored = (await db.execute(text("SELECT password FROM vcenter_configs WHERE id = :i"),
                                       {"i": cfg["id"]})).scalar_one()
        assert SECRET not in stored and inv.keys.decrypt(stored) == SECRET + "2"

        r = await client.post(URL, json={"action": "delete", "id": cfg["id"]}, headers=h)
        assert r.status_code == 200 and r.json()["success"] is True and r.json()["id"] == cfg["id"]
        r = await client.post(URL, json={"action": "get", "id": cfg["id"]}, headers=h)
        assert_error_shape(r, 404)

        sim.stop()  # a vCenter that is down: a 502 that says so, at once
        r = await client.post(URL, json={"action": "test", "id": sim_cfg["id"]}, headers=h)
        assert "refused" in assert_error_shape(r, 502)["details"]


# -- discovery ---------------------------------------------------------------------------------

def assert_matches_vsphere(found: dict[str, Any], direct: dict[str, Any]) -> None:
    for key in ("uuid", "bios_uuid", "name", "cpus", "memory_mb", "host"):
        assert found[key] == direct[key], (found["name"], key)
    assert len(found["disks"]) == len(direct["disks"])
    for got, want in zip(found["disks"], direct["disks"]):
        for key, value in want.items():
            assert got[key] == value, (found["name"], key, got)
        assert got["id"] == f"disk-{want['key']}"
        assert got["size_gb"] == -(-want["capacity_bytes"] // GIB)
    assert [(n["key"], n["mac_address"]) for n in found["nics"]] == \
        [(n["key"], n["mac_address"]) for n in direct["nics"]]


async def test_discovery_returns_what_vsphere_reports(make_settings, sim: Vcsim) -> None:
    with sim.service_instance() as si:
        create_vm(si, "db01", cpus=4, memory_mb=8192, cbt=True, firmware="efi", nics=[
            NicSpec("DC0_DVPG0", "vmxnet3"), NicSpec("VM Network", "e1000e")], disks=[
            DiskSpec(40), DiskSpec(8, unit=3), DiskSpec(2, controller="sata", unit=1, thin=False),
            DiskSpec(1, controller="scsi", bus=1, scsi_model="lsilogic-sas", unit=5),
            DiskSpec(3, controller="nvme"), DiskSpec(4, controller="ide", bus=1, set_capacity_in_bytes=False)])
        create_vm(si, "web01", disks=[DiskSpec(16)], nics=[NicSpec()], power_on=True)
        direct = {moid: read_vm_direct(vm) for moid, vm in all_vms(si).items()}
    async with running(make_settings(), services=SERVICES) as client:
        h = await login(client)
        await add_vcenter(client, h, sim)
        body = await discover(client, h, sim.host)
        assert body["vcenter"] == sim.host
        assert {k: v for k, v in body["summary"].items() if k != "seconds"} == \
            {"found": 6, "new": 6, "changed": 0, "gone": 0, "unchanged": 0}
        assert body["summary"]["seconds"] > 0
        vms = {vm["id"]: vm for vm in body["vms"]}
        assert set(vms) == set(direct)
        for moid, vm in vms.items():
            assert_matches_vsphere(vm, direct[moid])
            assert vm["change"] == "new" and vm["status"] == "present" and vm["vcenter"] == sim.host

        db01 = next(vm for vm in vms.values() if vm["name"] == "db01")
        assert (db01["cpus"], db01["memory_mb"], db01["cbt_enabled"], db01["firmware"], db01["path"],
                db01["datacenter"]) == (4, 8192, True, "efi", "/DC0/vm/db01", "DC0")
        assert [(d["controller_type"], d["controller_bus_number"], d["unit_number"], d["size_gb"],
                 d["thin_provisioned"]) for d in db01["disks"]] == [
            ("scsi", 0, 0, 40, True), ("scsi", 0, 3, 8, True), ("sata", 0, 1, 2, False),
            ("scsi", 1, 5, 1, True), ("nvme", 0, 0, 3, True), ("ide", 1, 0, 4, True)]
        assert [(n["network"], n["adapter_type"]) for n in db01["nics"]] == \
            [("DC0_DVPG0", "vmxnet3"), ("VM Network", "e1000e")]

        # What was stored is what was returned: GET by moref and by instance UUID.
        for vm in vms.values():
            for key in (vm["id"], vm["uuid"]):
                r = await client.get(f"/api/v1/vms/{key}", headers=h)
                assert r.status_code == 200, r.text
                assert r.json() == {"success": True, "vm": {k: v for k, v in vm.items() if k != "change"}}


async def test_rediscovery_reports_new_changed_gone(make_settings, sim: Vcsim) -> None:
    async with running(make_settings(), services=SERVICES) as client:
        h = await login(client)
        await add_vcenter(client, h, sim, name="lab")
        inv = client.appliance.services["inventory"]
        events: list[dict[str, Any]] = []

        async def on_event(msg) -> None:
            events.append(orjson.loads(msg.data))
        sub = await inv.bus.nc.subscribe(Inventory.EVT_DISCOVERED, cb=on_event)

        first = await discover(client, h, "lab")  # by configuration name
        assert first["summary"]["new"] == 4
        await wait_for(lambda: asyncio.sleep(0, len(events) >= 4))
        await asyncio.sleep(0.2)  # and no more
        assert sorted(e["vm"]["id"] for e in events) == sorted(vm["id"] for vm in first["vms"])
        assert {e["change"] for e in events} == {"new"} and all(e["vcenter"] == sim.host for e in events)
        events.clear()

        with sim.service_instance() as si:
            by_name = {vm.name: vm for vm in all_vms(si).values()}
            victim, grown = by_name["DC0_H0_VM0"], by_name["DC0_C0_RP0_VM1"]
            gone_id, grown_id = victim._moId, grown._moId
            destroy(victim)
            add_disk(grown, 5)
            added = create_vm(si, "new01", disks=[DiskSpec(10), DiskSpec(20, unit=2)])
            grown_direct, new_id = read_vm_direct(grown), added._moId

        second = await discover(client, h, sim.host)
        assert {k: v for k, v in second["summary"].items() if k != "seconds"} == \
            {"found": 4, "new": 1, "changed": 1, "gone": 1, "unchanged": 2}
        change = {vm["id"]: vm["change"] for vm in second["vms"]}
        assert change.pop(new_id) == "new" and change.pop(grown_id) == "changed"
        assert set(change.values()) == {"unchanged"} and gone_id not in change
        grown_vm = next(vm for vm in second["vms"] if vm["id"] == grown_id)
        assert_matches_vsphere(grown_vm, grown_direct)
        assert [d["size_gb"] for d in grown_vm["disks"]][-1] == 5

        await wait_for(lambda: asyncio.sleep(0, len(events) >= 3))
        await asyncio.sleep(0.2)
        assert sorted((e["vm"]["id"], e["change"]) for e in events) == \
            sorted([(new_id, "new"), (grown_id, "changed"), (gone_id, "gone")])
        gone_event = next(e for e in events if e["change"] == "gone")
        assert gone_event["vm"]["status"] == "gone" and gone_event["vm"]["disks"]
        events.clear()

        # Gone is kept, with when; the default listing leaves it out.
        r = await client.get(f"/api/v1/vms/{gone_id}", headers=h)
        gone = r.json()["vm"]
        assert gone["status"] == "gone" and gone["gone_at"] is not None and len(gone["disks"]) == 1
        r = await client.get("/api/v1/vms", headers=h)
        assert r.json()["total"] == 4 and gone_id not in {vm["id"] for vm in r.json()["vms"]}
        r = await client.get("/api/v1/vms", params={"include_gone": "true"}, headers=h)
        assert r.json()["total"] == 5
        first_seen = {vm["id"]: vm["first_seen"] for vm in first["vms"]}
        assert grown_vm["first_seen"] == first_seen[grown_id]

        # Nothing changed: all unchanged, no event.
        third = await discover(client, h, sim.host)
        assert (third["summary"]["unchanged"], third["summary"]["new"], third["summary"]["gone"]) == (4, 0, 0)
        await asyncio.sleep(0.3)
        assert events == []
        await sub.unsubscribe()
        assert REGISTRY.get_sample_value("oma_inventory_discovered_vms") == 4
        assert (REGISTRY.get_sample_value("oma_inventory_discovery_duration_seconds_count") or 0) >= 3


async def test_discovery_failures_are_clear(make_settings) -> None:
    with running_vcsim(username="admin", password=SECRET) as sim:
        async with running(make_settings(), services=SERVICES) as client:
            h = await login(client)
            body = await discover(client, h, "nowhere.example.com", status=404)
            assert "nowhere.example.com" in body["details"]

            await add_vcenter(client, h, sim, password="wrong-password")
            auth_failed = discoveries("auth_failed")
            body = await discover(client, h, sim.host, status=502)
            assert body["error"] == "vCenter authentication failed" and "admin" in body["details"]
            assert discoveries("auth_failed") == auth_failed + 1

            r = await client.post(URL, json={"action": "update", "id": 1, "configuration": {
                "password": SECRET, "datacenter": "NoSuchDC"}}, headers=h)
            assert r.status_code == 200
            assert "DC0" in (await discover(client, h, sim.host, status=404))["details"]
            r = await client.post(URL, json={"action": "update", "id": 1, "configuration": {"datacenter": "DC0"}},
                                  headers=h)
            assert (await discover(client, h, sim.host))["summary"]["found"] == 4

            sim.stop()
            unreachable = discoveries("unreachable")
            body = await discover(client, h, sim.host, status=502)
            assert body["error"] == "vCenter unreachable" and "refused" in body["details"]
            assert discoveries("unreachable") == unreachable + 1
            # The inventory stays as last read.
            r = await client.get("/api/v1/vms", headers=h)
            assert r.json()["total"] == 4


async def test_concurrent_discoveries_share_one_read(make_settings) -> None:
    with running_vcsim({"vm": 40}) as sim:  # 80 VMs: a read long enough to overlap
        async with running(make_settings(), services=SERVICES) as client:
            h = await login(client)
            await add_vcenter(client, h, sim, name="lab")
            inv = client.appliance.services["inventory"]
            before = inv.reads
            a, b, c = await asyncio.gather(discover(client, h, sim.host), discover(client, h, "lab"),
                                           discover(client, h, sim.host))
            assert inv.reads == before + 1
            assert a == b == c and a["summary"]["new"] == 80
            again = await discover(client, h, sim.host)  # a finished read is not cached
            assert inv.reads == before + 2 and again["summary"]["unchanged"] == 80


# -- listing -----------------------------------------------------------------------------------

async def test_list_filters_pagination_and_get(make_settings, sim: Vcsim) -> None:
    with sim.service_instance() as si:
        create_vm(si, "pg-db-01", cbt=True, power_on=True)
        create_vm(si, "pg-db-02", cbt=True)
        create_vm(si, "web_100%", cbt=False)
    async with running(make_settings(), services=SERVICES) as client:
        h = await login(client)
        await add_vcenter(client, h, sim, name="lab")
        found = (await discover(client, h, sim.host))["vms"]
        assert len(found) == 7

        async def names(**params: Any) -> list[str]:
            r = await client.get("/api/v1/vms", params=params, headers=h)
            assert r.status_code == 200, r.text
            body = r.json()
            assert set(body) == {"success", "vms", "total", "limit", "offset"} and body["success"] is True
            return [vm["name"] for vm in body["vms"]]

        assert await names() == sorted(vm["name"] for vm in found)
        assert await names(name="pg-db") == ["pg-db-01", "pg-db-02"]
        assert await names(name="PG-DB-0") == ["pg-db-01", "pg-db-02"]  # case-insensitive
        assert await names(name="100%") == ["web_100%"]  # % and _ are literal
        assert await names(name="db_0") == []  # "_" would match "-"
        assert await names(cbt="true") == ["pg-db-01", "pg-db-02"]
        assert len(await names(cbt="false")) == 5
        on = sorted(vm["name"] for vm in found if vm["power_state"] == "poweredOn")
        assert "pg-db-01" in on and await names(power_state="poweredOn") == on
        assert await names(power_state="poweredOn", cbt="true", name="db") == ["pg-db-01"]
        assert len(await names(datacenter="DC0")) == 7 and await names(datacenter="DC9") == []
        assert len(await names(vcenter=sim.host)) == 7 and len(await names(vcenter="lab")) == 7
        assert await names(vcenter="other.example.com") == []

        # Pages are disjoint and cover the whole listing; total is the filtered count.
        pages = []
        for offset in range(0, 8, 3):
            r = await client.get("/api/v1/vms", params={"limit": 3, "offset": offset}, headers=h)
            body = r.json()
            assert (body["total"], body["limit"], body["offset"]) == (7, 3, offset)
            pages += [vm["id"] for vm in body["vms"]]
        assert sorted(pages) == sorted(vm["id"] for vm in found) and len(pages) == 7

        for params in ({"limit": 0}, {"limit": 5000}, {"offset": -1}, {"cbt": "maybe"}):
            assert_error_shape(await client.get("/api/v1/vms", params=params, headers=h), 400)
        r = await client.get("/api/v1/vms/vm-does-not-exist", headers=h)
        assert "vm-does-not-exist" in assert_error_shape(r, 404)["details"]
        assert_error_shape(await client.get("/api/v1/vms", params={}), 401)

        # A listed VM is a valid `source_vm` of POST /api/v1/replications, as it is.
        r = await client.get("/api/v1/vms", params={"name": "pg-db-01"}, headers=h)
        vm = r.json()["vms"][0]
        req = ReplicationRequest.model_validate({"source_vm": vm, "ossea_config_id": 1})
        assert req.source_vm.id == vm["id"] and req.source_vm.uuid == vm["uuid"]
        assert req.source_vm.disks[0].unit_number == 0 and req.source_vm.disks[0].capacity_bytes == 16 * GIB
        for listed in (await client.get("/api/v1/vms", headers=h)).json()["vms"]:
            ReplicationRequest.model_validate({"source_vm": listed, "ossea_config_id": 1})


# -- MariaDB, secrets --------------------------------------------------------------------------

async def test_mariadb_discovery_and_rediscovery(make_settings, mariadb_name: str) -> None:
    with running_vcsim({"vm": 10}) as sim:  # 20 VMs
        async with running(make_settings(**mariadb_settings(mariadb_name)), services=SERVICES) as client:
            h = await login(client)
            await add_vcenter(client, h, sim)
            first = await discover(client, h, sim.host)
            assert first["summary"]["new"] == 20
            with sim.service_instance() as si:
                vms = sorted(all_vms(si).values(), key=lambda vm: vm.name)
                destroy(vms[0])
                add_disk(vms[1], 3)
            second = await discover(client, h, sim.host)
            assert (second["summary"]["gone"], second["summary"]["changed"], second["summary"]["unchanged"]) == \
                (1, 1, 18)
            r = await client.get("/api/v1/vms", params={"include_gone": "true", "limit": 5, "offset": 5}, headers=h)
            assert r.json()["total"] == 20 and len(r.json()["vms"]) == 5
            r = await client.get(f"/api/v1/vms/{vms[1]._moId}", headers=h)
            assert len(r.json()["vm"]["disks"]) == 2
            inv = client.appliance.services["inventory"]
            assert inv.engine.dialect.name == "mysql"
            async with inv.sessions() as db:
                disks = (await db.execute(text("SELECT disks FROM vms WHERE moref = :m"),
                                          {"m": vms[0]._moId})).scalar_one()
            assert len(orjson.loads(disks)) == 1  # the gone VM's disks are history, kept


async def test_password_never_in_responses_or_logs(make_settings, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    for name in ("oma", "sqlalchemy.engine", "pyVmomi", "pyVim"):
        caplog.set_level(logging.DEBUG, logger=name)
    texts: list[str] = []
    with running_vcsim(username="admin", password=SECRET) as sim:
        async with running(make_settings(debug=True), services=SERVICES) as client:
            h = await login(client)
            calls = [("create", None, vc_config(sim)), ("get", None, None), ("get", 1, None), ("test", 1, None),
                     ("test", None, vc_config(sim)), ("test", None, vc_config(sim, password=SECRET + "x")),
                     ("update", 1, {"password": SECRET, "username": "admin"}),
                     ("create", None, vc_config(sim, name="dup"))]
            for action, config_id, configuration in calls:
                body = {"action": action, **({"id": config_id} if config_id else {}),
                        **({"configuration": configuration} if configuration else {})}
                r = await client.post(URL, json=body, headers=h)
                texts.append(r.text)
            assert [orjson.loads(t)["success"] for t in texts] == [True] * 5 + [False, True, False]
            body = await discover(client, h, sim.host)
            texts.append(orjson.dumps(body).decode())
            texts.append((await client.get("/api/v1/vms", headers=h)).text)
    assert caplog.records and any(r.name.startswith("oma.inventory") for r in caplog.records)
    assert any(r.name.startswith("sqlalchemy.engine") for r in caplog.records), "SQL was not logged"
    for t in texts:
        assert SECRET not in t
    for record in caplog.records:
        assert SECRET not in record.getMessage(), record.name
        assert SECRET not in repr(record.__dict__), record.name


async def test_a_reply_too_large_for_the_bus_is_cut_down(make_settings) -> None:
    """The bus refuses messages over the server's max_payload: the discovery reply then lists
    brief VMs (and, if need be, only the first ones) and says so."""
    async with running(make_settings(), services=SERVICES) as client:
        inv = client.appliance.services["inventory"]
        limit = inv.bus.nc.max_payload
        vm = {"id": "vm-1", "uuid": "u", "name": "n" * 200, "path": "/DC0/vm/x", "datacenter": "DC0",
              "power_state": "poweredOn", "change": "new", "disks": [{"id": "disk-1", "path": "p" * 500}] * 4}
        reply = {"success": True, "vcenter": "vc", "vms": [vm] * (limit // 2000 + 10),
                 "summary": {"found": limit // 2000 + 10}}
        assert len(orjson.dumps(reply)) > limit
        body = orjson.loads(inv._fit(reply))
        assert len(orjson.dumps(body)) <= limit and "brief" in body["vms_detail"]
        assert body["vms"] == [{k: vm[k] for k in ("id", "uuid", "name", "path", "datacenter", "power_state",
                                                   "change")}] * len(reply["vms"])
        huge = {**reply, "vms": [vm] * (limit // 100), "summary": {"found": limit // 100}}
        body = orjson.loads(inv._fit(huge))
        assert 0 < len(body["vms"]) < len(huge["vms"]) and body["vms_detail"].startswith("first ")
        small = {**reply, "vms": [vm]}
        assert orjson.loads(inv._fit(small)) == small
