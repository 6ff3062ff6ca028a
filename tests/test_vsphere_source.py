"""VSphereSource against a real vCenter simulator (vcsim built from ops/vcsim): no mocks.

vcsim is built on first use (ops/vcsim/build.sh); when it cannot be built these tests fail.
"""
from __future__ import annotations

import logging
import math
import socket

import pluggy
import pytest
from pyVmomi import vim

import oma.shared.hookspecs
from oma.plugins.vsphere import plugin
from oma.plugins.vsphere.source import (VCenterAuthError, VCenterConnection, VCenterUnreachable,
                                    VSphereSource)
from oma.shared.errors import BadGateway, NotFound
from oma.shared.settings import Settings
from tests.vcsim import (DiskSpec, NicSpec, Vcsim, create_vm, read_vm_direct, running_vcsim, snapshot,
                         start_vcsim)

GIB = 1024 ** 3
SECRET = "Sup3r-S3cret-pa55"


@pytest.fixture(scope="module")
def default_sim():
    """The default VPX model (1 DC, 1 cluster of 3 hosts, 1 standalone host, 4 VMs), untouched."""
    with running_vcsim() as sim:
        yield sim


@pytest.fixture
def sim():
    """A fresh default model that a test may change."""
    with running_vcsim() as sim:
        yield sim


def by_name(vms: list[dict]) -> dict[str, dict]:
    return {vm["name"]: vm for vm in vms}


async def test_default_model_matches_direct_pyvmomi_reads(default_sim: Vcsim):
    vms = await VSphereSource(default_sim.connection()).discover()

    with default_sim.service_instance() as si:
        content = si.RetrieveContent()
        view = content.viewManager.CreateContainerView(content.rootFolder, [vim.VirtualMachine], True)
        direct = {vm._moId: read_vm_direct(vm) for vm in view.view}
        view.DestroyView()

    assert len(vms) == 4
    assert sorted(vm["id"] for vm in vms) == sorted(direct)
    for vm in vms:
        want = direct[vm["id"]]
        for key in ("uuid", "bios_uuid", "name", "cpus", "memory_mb", "host"):
            assert vm[key] == want[key], (vm["name"], key)
        assert vm["path"] == f"/DC0/vm/{vm['name']}"
        assert vm["datacenter"] == "DC0"
        assert vm["cluster"] == ("DC0_C0" if "_C0_" in vm["name"] else None)
        assert vm["cbt_enabled"] is False  # unset (None) in vcsim's model
        assert vm["firmware"] == "bios"
        assert vm["template"] is False
        assert vm["power_state"] == "poweredOn"

        got_disks = [{k: d[k] for k in want["disks"][0]} for d in vm["disks"]]
        assert got_disks == want["disks"]
        for disk in vm["disks"]:
            assert disk["id"] == f"disk-{disk['key']}"
            assert disk["capacity_bytes"] == 1024 * 1024  # capacityInKB only: the fallback
            assert disk["size_gb"] == 1
            assert disk["controller_type"] == "scsi"
            assert disk["datastore"] == "LocalDS_0"
            assert disk["path"].startswith(f"[LocalDS_0] {vm['name']}/")

        assert [{k: n[k] for k in ("key", "mac_address")} for n in vm["nics"]] == want["nics"]
        assert [n["network"] for n in vm["nics"]] == ["DC0_DVPG0"]
        assert [n["adapter_type"] for n in vm["nics"]] == ["e1000"]


async def test_created_vms_are_reported_as_built(sim: Vcsim):
    with sim.service_instance() as si:
        create_vm(si, "db01", firmware="efi", cbt=True, cpus=8, memory_mb=16384,
                  guest_id="rhel8_64Guest", power_on=True,
                  disks=[DiskSpec(40), DiskSpec(100, unit=3, thin=False),
                         DiskSpec(2, controller="sata"), DiskSpec(1, controller="ide", bus=1),
                         DiskSpec(5, controller="scsi", bus=1, scsi_model="lsilogic-sas"),
                         DiskSpec(3, controller="nvme")],
                  nics=[NicSpec("DC0_DVPG0", "vmxnet3"), NicSpec("VM Network", "e1000e")])
        web01 = create_vm(si, "web01", firmware="bios", cbt=False, host="DC0_H0",
                          disks=[DiskSpec(20, thin=False), DiskSpec(0.5, unit=1)],
                          nics=[NicSpec("VM Network", "vmxnet3", mac_address="00:50:56:aa:bb:cc")])
        for snap in ("before-upgrade", "after-upgrade"):  # a chain of two
            snapshot(web01, snap)
        create_vm(si, "tmpl01", template=True, disks=[DiskSpec(10, set_capacity_in_bytes=False)])
        direct = {vm.name: read_vm_direct(vm) for vm in
                  si.RetrieveContent().viewManager.CreateContainerView(
                      si.RetrieveContent().rootFolder, [vim.VirtualMachine], True).view}

    vms = by_name(await VSphereSource(sim.connection()).discover())
    assert len(vms) == 7

    db = vms["db01"]
    assert (db["firmware"], db["cbt_enabled"], db["template"]) == ("efi", True, False)
    assert (db["cpus"], db["memory_mb"], db["guest_os"]) == (8, 16384, "rhel8_64Guest")
    assert db["power_state"] == "poweredOn"
    assert db["path"] == "/DC0/vm/db01" and db["datacenter"] == "DC0"
    disks = [(d["controller_type"], d["controller_bus_number"], d["unit_number"], d["size_gb"],
              d["capacity_bytes"], d["thin_provisioned"]) for d in db["disks"]]
    assert disks == [
        ("scsi", 0, 0, 40, 40 * GIB, True),
        ("scsi", 0, 3, 100, 100 * GIB, False),
        ("sata", 0, 0, 2, 2 * GIB, True),
        ("ide", 1, 0, 1, 1 * GIB, True),
        ("scsi", 1, 0, 5, 5 * GIB, True),
        ("nvme", 0, 0, 3, 3 * GIB, True),
    ]
    assert [d["controller_class"] for d in db["disks"]] == [
        "ParaVirtualSCSIController", "ParaVirtualSCSIController", "VirtualAHCIController",
        "VirtualIDEController", "VirtualLsiLogicSASController", "VirtualNVMEController"]
    assert [d["path"] for d in db["disks"]] == [
        f"[LocalDS_0] db01/db01{suffix}.vmdk" for suffix in ("", "_1", "_2", "_3", "_4", "_5")]
    assert {d["datastore"] for d in db["disks"]} == {"LocalDS_0"}
    assert len({d["id"] for d in db["disks"]}) == 6
    assert [(n["network"], n["adapter_type"]) for n in db["nics"]] == [
        ("DC0_DVPG0", "vmxnet3"), ("VM Network", "e1000e")]

    web = vms["web01"]
    assert (web["firmware"], web["cbt_enabled"], web["host"], web["cluster"]) == \
        ("bios", False, "DC0_H0", None)
    assert [(d["unit_number"], d["size_gb"], d["capacity_bytes"], d["thin_provisioned"])
            for d in web["disks"]] == [(0, 20, 20 * GIB, False), (1, 1, GIB // 2, True)]
    assert web["nics"][0]["mac_address"] == "00:50:56:aa:bb:cc"
    assert (web["snapshot_count"], db["snapshot_count"]) == (2, 0)  # from layoutEx.snapshot

    tmpl = vms["tmpl01"]
    assert tmpl["template"] is True and tmpl["cbt_enabled"] is False
    assert tmpl["disks"][0]["capacity_bytes"] == 10 * GIB  # from capacityInKB
    assert tmpl["power_state"] == "poweredOff"

    for name, vm in vms.items():  # every VM agrees with a direct per-VM read
        want = direct[name]
        assert vm["uuid"] == want["uuid"] and vm["host"] == want["host"]
        assert [{k: d[k] for k in want["disks"][0]} for d in vm["disks"]] == want["disks"]
        for disk in vm["disks"]:
            assert disk["size_gb"] == math.ceil(disk["capacity_bytes"] / GIB)


async def test_test_reports_api_version_and_vm_count():
    with running_vcsim({"vm": 3, "api-version": "7.0"}) as sim:
        result = await VSphereSource(sim.connection()).test()
    assert result["api_version"] == "7.0"
    assert result["vm_count"] == 1 * (1 + 1) * 3  # dc x (standalone-host + cluster) x vm
    assert "vCenter" in result["about"]


async def test_folders_datacenters_and_datacenter_filter():
    with running_vcsim({"dc": 2, "folder": 1, "vm": 1}) as sim:
        everything = await VSphereSource(sim.connection()).discover()
        only_dc1 = await VSphereSource(sim.connection(datacenter="DC1")).discover()
        count_dc1 = await VSphereSource(sim.connection(datacenter="DC1")).test()
        with pytest.raises(NotFound) as missing:
            await VSphereSource(sim.connection(datacenter="NoSuchDC")).discover()

    assert len(everything) == 4
    paths = {vm["name"]: (vm["path"], vm["datacenter"]) for vm in everything}
    assert paths["DC0_H0_VM0"] == ("/DC0/vm/DC0_H0_VM0", "DC0")
    assert paths["DC1_C0_RP0_VM0"] == ("/F0/DC1/vm/F0/DC1_C0_RP0_VM0", "DC1")
    assert {vm["name"] for vm in only_dc1} == {"DC1_H0_VM0", "DC1_C0_RP0_VM0"}
    assert count_dc1["vm_count"] == 2
    assert "NoSuchDC" in str(missing.value) and "DC0" in str(missing.value)
    assert missing.value.status == 404


async def test_wrong_password_is_an_auth_error_without_the_password(caplog):
    caplog.set_level(logging.DEBUG)
    with running_vcsim(username="admin", password=SECRET) as sim:
        assert (await VSphereSource(sim.connection()).test())["vm_count"] == 4

        wrong = sim.connection(password="not-" + SECRET)
        with pytest.raises(VCenterAuthError) as exc:
            await VSphereSource(wrong).discover()
        with pytest.raises(VCenterAuthError):
            await VSphereSource(sim.connection(username="nobody")).test()

    err = exc.value
    assert isinstance(err, BadGateway) and err.status == 502
    assert "admin" in str(err) and "rejected" in str(err)
    for text in (str(err), repr(err), str(err.body()), repr(wrong), repr(VSphereSource(wrong)),
                 caplog.text, *(str(r.args) for r in caplog.records)):
        assert SECRET not in text
    assert err.__cause__ is None and err.__suppress_context__


async def test_stopped_vcsim_is_unreachable(caplog):
    caplog.set_level(logging.DEBUG)
    sim = start_vcsim(username="admin", password=SECRET)
    connection = sim.connection()
    assert (await VSphereSource(connection).test())["vm_count"] == 4
    sim.stop()

    with pytest.raises(VCenterUnreachable) as exc:
        await VSphereSource(connection, timeout=5).discover()
    assert isinstance(exc.value, BadGateway) and exc.value.status == 502
    assert "refused" in str(exc.value) and f"{sim.host}:{sim.port}" in str(exc.value)
    assert SECRET not in str(exc.value) and SECRET not in caplog.text


async def test_silent_server_times_out_as_unreachable():
    """A port that accepts TCP but never answers: bounded by the timeout, not hanging."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        port = server.getsockname()[1]
        source = VSphereSource(VCenterConnection("127.0.0.1", port, "u", SECRET, verify_tls=False),
                               timeout=1.0)
        with pytest.raises(VCenterUnreachable) as exc:
            await source.test()
    assert "1 s" in str(exc.value) and SECRET not in str(exc.value)


async def test_untrusted_certificate_is_refused_when_verifying(default_sim: Vcsim):
    with pytest.raises(VCenterUnreachable) as exc:
        await VSphereSource(default_sim.connection(verify_tls=True), timeout=10).test()
    assert "certificate" in str(exc.value) and "verify_tls" in str(exc.value)


def test_connection_repr_hides_password():
    c = VCenterConnection("vc.example.com", username="administrator@vsphere.local", password=SECRET)
    assert SECRET not in repr(c) and SECRET not in repr(VSphereSource(c))
    assert (c.port, c.verify_tls, c.datacenter) == (443, True, None)


def test_plugin_registers_the_vsphere_source():
    pm = pluggy.PluginManager("oma")
    pm.add_hookspecs(oma.shared.hookspecs)
    pm.register(plugin)
    registered = {}
    pm.hook.oma_register_inventory_sources(
        register=lambda name, factory, description="": registered.setdefault(name, (factory, description)))
    factory, description = registered["vsphere"]
    assert description
    source = factory(VCenterConnection("vc", username="u", password="p"), Settings(vsphere_timeout=5))
    assert isinstance(source, VSphereSource) and source.timeout == 5
    from_dict = factory({"host": "vc", "username": "u", "password": "p"})
    assert from_dict.connection.host == "vc" and from_dict.timeout == 60.0
