"""The VMA client plugin against the VMA simulator, with a real vcsim and real nbdkit exports.

The simulator reads the inventory and power state from vcsim with the credentials each request
carries and writes the simulated disks into nbdkit exports backed by sparse files, through libnbd.
"""
from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
from fractions import Fraction
from pathlib import Path

import httpx
import pytest

from nbdutil import MiB, digest, free_port, sparse_file
from oma.plugins.nbd import ExporterConfig, NbdkitExporter
from oma.plugins.vma.client import HttpVmaClient, redact_url
from oma.plugins.vma.disks import BLOCK, DiskImage
from oma.plugins.vma.simulator import VmaSimulator
from oma.shared.plugins import get_backend, get_plugin_manager
from oma.shared.vma import (CleanupRequest, DiscoverRequest, NbdTarget, PowerRequest, ProgressResponse,
                        ReplicateRequest, VCenterCredentials, VmaClient, VmaNotFound, VmaRejected,
                        VmaRemoteError, VmaTimeout, VmaUnreachable)
from vcsim import DiskSpec, NicSpec, create_vm, find_by_name, running_vcsim

VC_USER, VC_PASS = "vma-admin", "Vc-Secret-4711"
SCALE = Fraction(1, 64)  # 1 GiB -> 16 MiB
VM_NAME = "vma-src"
_ids = itertools.count(1)


@pytest.fixture(scope="module")
def vcsim():
    with running_vcsim(username=VC_USER, password=VC_PASS) as sim:
        with sim.service_instance() as si:
            create_vm(si, VM_NAME, disks=[DiskSpec(1), DiskSpec(2, controller="sata")],
                      nics=[NicSpec("VM Network", mac_address="00:50:56:aa:bb:01")], cbt=True)
        yield sim


@pytest.fixture(scope="module")
async def exporter(tmp_path_factory):
    exp = NbdkitExporter(ExporterConfig(port=free_port(), state_dir=tmp_path_factory.mktemp("exports"),
                                        watchdog_interval=0))
    await exp.start()
    yield exp
    await exp.stop()


@pytest.fixture(scope="module")
async def sim(tmp_path_factory):
    async with VmaSimulator(tmp_path_factory.mktemp("vma"), disk_scale=SCALE, verify_tls=False) as s:
        yield s


@pytest.fixture
async def client(sim):
    await sim.clear_faults()
    async with HttpVmaClient(sim.url, timeout=10, retries=2, backoff=0.01) as c:
        yield c
    await sim.clear_faults()


def creds(vcsim, password: str = VC_PASS) -> dict:
    return {"vcenter": f"{vcsim.host}:{vcsim.port}", "username": VC_USER, "password": password}


async def discover_src(client, vcsim):
    found = await client.discover(DiscoverRequest(**creds(vcsim)))
    return next(vm for vm in found.vms if vm.name == VM_NAME), found


async def make_targets(exporter, tmp_path: Path, vm, previous: dict[str, str] | None = None):
    """One sparse file per disk (sized like the simulated disk), each an nbdkit export."""
    targets, files = [], {}
    for disk in vm.disks:
        key = disk.id.removeprefix("disk-")
        name = f"t{next(_ids)}-disk{key}"
        files[disk.id] = sparse_file(tmp_path / f"{name}.img", int(disk.capacity_bytes * SCALE))
        await exporter.add_export(name, str(files[disk.id]))
        targets.append(NbdTarget(device_path=exporter.uri(name), vmware_disk_key=key,
                                 previous_change_id=(previous or {}).get(disk.id)))
    return targets, files


async def run_job(client, vcsim, vm, targets, timeout: float = 30) -> ProgressResponse:
    job_id = f"job-{next(_ids)}"
    started = await client.replicate(ReplicateRequest(job_id=job_id, vm_paths=[vm.path], nbd_targets=targets,
                                                      oma_url="http://127.0.0.1:9/", **creds(vcsim)))
    assert started.job_id == job_id and started.vm_count == 1
    return await wait_finished(client, job_id, timeout)


async def wait_finished(client, job_id: str, timeout: float = 30) -> ProgressResponse:
    deadline = asyncio.get_running_loop().time() + timeout
    seen = []
    while True:
        p = await client.progress(job_id)
        seen.append(p.percentage)
        if p.status in ("completed", "failed", "cancelled"):
            assert seen == sorted(seen), seen  # progress never goes back
            return p
        assert asyncio.get_running_loop().time() < deadline, p
        await asyncio.sleep(0.05)


def source_digest(sim, vcsim, vm, disk) -> str:
    return digest(sim.disk_path(f"{vcsim.host}:{vcsim.port}", vm.path, disk.id.removeprefix("disk-")))


def recorded_change_ids(sim, job_id: str) -> dict[str, str]:
    return {c["body"]["disk_id"]: c["body"]["change_id"] for c in sim.reporter.calls
            if c["method"] == "POST" and c["path"] == f"/api/v1/replications/{job_id}/changeid"}


# -- the contract and the plugin ----------------------------------------------------------

def test_plugin_registers_the_http_client(tmp_path):
    from oma.shared.settings import Settings
    backend = get_backend(get_plugin_manager(load_entrypoints=False), "vma", "http")
    settings = Settings(vma_timeout=5, vma_retries=1, data_dir=tmp_path)
    client = backend.factory("http://127.0.0.1:9081", settings)
    assert isinstance(client, VmaClient) and client.retries == 1 and client.timeout.total == 5


def test_password_hidden_in_repr_revealed_on_the_wire():
    request = DiscoverRequest(vcenter="vc", username="u", password="p4ss")
    assert "p4ss" not in repr(request) and "p4ss" not in str(request)
    assert request.wire()["password"] == "p4ss"
    assert redact_url("http://h/api/v1/vms/x/cbt-status?vcenter=vc&username=u&password=p4ss") == \
        "http://h/api/v1/vms/x/cbt-status?vcenter=vc&username=***&password=***"


# -- discovery, power, CBT ----------------------------------------------------------------

async def test_discover_returns_vcsim_vms_with_disks_and_nics(client, vcsim):
    vm, found = await discover_src(client, vcsim)
    with vcsim.service_instance() as si:
        from pyVmomi import vim
        content = si.RetrieveContent()
        view = content.viewManager.CreateContainerView(content.rootFolder, [vim.VirtualMachine], True)
        names = sorted(v.name for v in view.view)
    assert sorted(v.name for v in found.vms) == names and len(names) > 1
    assert found.vcenter.host == f"{vcsim.host}:{vcsim.port}"
    assert vm.path.endswith(f"/vm/{VM_NAME}") and vm.id.startswith("vm-") and vm.num_cpu == 2
    assert [(d.capacity_bytes, d.size_gb) for d in vm.disks] == [(1 << 30, 1), (2 << 30, 2)]
    assert all(d.id.startswith("disk-") and d.unit_number == 0 and d.vmdk_path.endswith(".vmdk")
               for d in vm.disks)
    assert [(n.mac_address, n.network_name, n.adapter_type) for n in vm.networks] == \
        [("00:50:56:aa:bb:01", "VM Network", "vmxnet3")]
    only = await client.discover(DiscoverRequest(**creds(vcsim), filter=VM_NAME))
    assert [v.name for v in only.vms] == [VM_NAME]


async def test_wrong_vcenter_password_is_rejected_not_retried(client, vcsim):
    with pytest.raises(VmaRejected) as err:
        await client.discover(DiscoverRequest(**creds(vcsim, password="wrong")))
    assert err.value.status == 400 and "401" in err.value.details and "rejected the login" in err.value.details


async def test_power_off_and_on_change_vcsim_state(client, vcsim):
    vm, _ = await discover_src(client, vcsim)

    def vcsim_state() -> str:
        with vcsim.service_instance() as si:
            from pyVmomi import vim
            return str(find_by_name(si, vim.VirtualMachine, VM_NAME).runtime.powerState)

    on = await client.power_on(PowerRequest(vm_id=vm.id, **creds(vcsim)))
    assert (on.success, on.previous_state, on.new_state) == (True, "poweredOff", "poweredOn")
    assert vcsim_state() == "poweredOn"
    assert (await client.power_state(vm.id)).power_state == "poweredOn"  # the session of the call above
    off = await client.power_off(PowerRequest(vm_id=vm.path, force=True, **creds(vcsim)))
    assert (off.previous_state, off.new_state, off.shutdown_method) == ("poweredOn", "poweredOff", "forced")
    assert vcsim_state() == "poweredOff"
    again = await client.power_off(PowerRequest(vm_id=vm.id, **creds(vcsim)))
    assert again.new_state == "poweredOff" and again.message == "already poweredOff"
    state = await client.power_state(vm.id, VCenterCredentials(**creds(vcsim)))
    assert state.power_state == "poweredOff"
    with pytest.raises(VmaNotFound):
        await client.power_on(PowerRequest(vm_id="vm-99999", **creds(vcsim)))


async def test_cbt_status_and_credentials_never_logged(client, vcsim, caplog):
    caplog.set_level(logging.DEBUG)
    vm, _ = await discover_src(client, vcsim)
    cbt = await client.cbt_status(vm.path, VCenterCredentials(**creds(vcsim)))
    assert cbt.cbt_enabled is True and cbt.vm_path == vm.path
    with pytest.raises(VmaRejected):
        await client.discover(DiscoverRequest(**creds(vcsim, password="also-secret-xyz")))
    text = caplog.text
    assert "cbt-status?" in text and "password=***" in text  # the calls were logged, redacted
    assert VC_PASS not in text and "also-secret-xyz" not in text


# -- copies -------------------------------------------------------------------------------

async def test_full_then_incremental_copy_matches_source(client, sim, vcsim, exporter, tmp_path):
    vm, _ = await discover_src(client, vcsim)
    targets, files = await make_targets(exporter, tmp_path, vm)
    full = await run_job(client, vcsim, vm, targets)
    assert full.status == "completed" and full.sync_type == "full" and full.percentage == 100.0, full
    sizes = [int(d.capacity_bytes * SCALE) for d in vm.disks]
    assert full.bytes_transferred == full.total_bytes == sum(sizes)
    assert [(p.disk_id, p.status, p.percent) for p in full.disk_progresses] == \
        [(d.id, "completed", 100.0) for d in vm.disks]
    assert [p.name for p in full.phases] == ["snapshot", "transfer", "record_change_ids", "cleanup"]
    assert all(p.status == "completed" for p in full.phases)
    assert full.vm_info.path == vm.path and full.vm_info.cbt_enabled and full.throughput.average_mbps > 0
    for disk in vm.disks:
        src = sim.disk_path(f"{vcsim.host}:{vcsim.port}", vm.path, disk.id.removeprefix("disk-"))
        assert digest(files[disk.id]) == digest(src)
        assert digest(src) != hashlib.sha256(bytes(src.stat().st_size)).hexdigest()  # not all zeros

    # What the copier would send OMA (no appliance token given: recorded, not sent).
    change_ids = recorded_change_ids(sim, full.job_id)
    assert set(change_ids) == {d.id for d in vm.disks}
    assert all(c["sent"] is False for c in sim.reporter.calls)

    mutated = vm.disks[0]
    grown = await sim.mutate(vm.path, mutated.id, 1)
    assert 0.005 <= grown["bytes_written"] / sizes[0] <= 0.02
    assert source_digest(sim, vcsim, vm, mutated) != digest(files[mutated.id])

    # The same exports again, each handed its last change id.
    for t in targets:
        t.previous_change_id = change_ids[f"disk-{t.vmware_disk_key}"]
    inc = await run_job(client, vcsim, vm, targets)
    assert inc.status == "completed" and inc.sync_type == "incremental", inc
    assert inc.bytes_transferred == grown["bytes_written"]
    assert 0.005 * sizes[0] <= inc.bytes_transferred <= 0.02 * sizes[0]
    assert [p.bytes_transferred for p in inc.disk_progresses] == [grown["bytes_written"], 0]
    for disk in vm.disks:
        assert digest(files[disk.id]) == source_digest(sim, vcsim, vm, disk)
    new_ids = recorded_change_ids(sim, inc.job_id)
    assert all(new_ids[d] != change_ids[d] for d in change_ids)

    # A change id the disk never issued: a full sync, said so in the job.
    targets[0].previous_change_id = "52 00 00 00 00 00 00 00-00 00 00 00 00 00 00 00/7"
    targets[1].previous_change_id = new_ids[vm.disks[1].id]
    mixed = await run_job(client, vcsim, vm, targets)
    assert mixed.status == "completed" and mixed.sync_type == "full"
    assert mixed.disk_progresses[0].bytes_transferred == sizes[0] and mixed.disk_progresses[1].total_bytes == 0
    assert any("not issued by this disk" in e for e in mixed.errors)


async def test_fail_after_n_bytes_fails_with_last_error(client, sim, vcsim, exporter, tmp_path):
    vm, _ = await discover_src(client, vcsim)
    targets, _ = await make_targets(exporter, tmp_path, vm)
    async with httpx.AsyncClient(base_url=sim.url) as http:
        r = await http.post("/sim/faults", json={"fail_after_bytes": 3 * MiB})
        assert r.status_code == 200 and r.json()["fail_after_bytes"] == 3 * MiB
        await asyncio.sleep(0.1)  # the fault is applied just after the answer
    failed = await run_job(client, vcsim, vm, targets)
    assert failed.status == "failed" and failed.bytes_transferred == 3 * MiB
    assert "failed after 3145728 bytes" in failed.last_error
    assert any(p.status == "failed" for p in failed.phases)
    assert (await client.status(failed.job_id)).status == "failed"


async def test_hang_then_cleanup_cancels(client, sim, vcsim, exporter, tmp_path):
    vm, _ = await discover_src(client, vcsim)
    targets, _ = await make_targets(exporter, tmp_path, vm)
    await sim.set_faults(hang=True)
    started = await client.replicate(ReplicateRequest(job_id="hung-1", vm_paths=[vm.path], nbd_targets=targets,
                                                      **creds(vcsim)))
    await asyncio.sleep(0.3)
    p = await client.progress(started.job_id)
    assert p.status == "running" and p.bytes_transferred == 0 and p.phase == "transfer"
    with pytest.raises(VmaRejected) as err:  # 409: the same job id while it runs
        await client.replicate(ReplicateRequest(job_id="hung-1", vm_paths=[vm.path], nbd_targets=targets,
                                                **creds(vcsim)))
    assert "409" in err.value.details
    done = await client.cleanup(CleanupRequest(job_id="hung-1", action="cleanup_all"))
    assert done.status == "cleaned"
    assert (await client.progress("hung-1")).status == "cancelled"
    # The disk locks were released: a guest write goes through.
    assert (await sim.mutate(vm.path, vm.disks[0].id, 1))["bytes_written"] > 0


async def test_throttle_limits_the_rate(client, sim, vcsim, exporter, tmp_path):
    vm, _ = await discover_src(client, vcsim)
    targets, _ = await make_targets(exporter, tmp_path, vm)
    total = sum(int(d.capacity_bytes * SCALE) for d in vm.disks)
    await sim.set_faults(throttle_bps=total)  # the whole job (both disks together) in one second
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    done = await run_job(client, vcsim, vm, targets)
    assert done.status == "completed" and done.bytes_transferred == total and loop.time() - t0 >= 0.9


async def test_refused_connections_are_unreachable(client, sim):
    assert (await client.health()).status == "healthy"
    await sim.refuse()
    try:
        with pytest.raises(VmaUnreachable) as err:
            await client.health()
        assert "cannot connect" in err.value.details and err.value.retryable
    finally:
        await sim.accept()
    assert (await client.health()).status == "healthy"
    async with httpx.AsyncClient(base_url=sim.url) as http:  # the same through the control endpoint
        assert (await http.post("/sim/faults", json={"refuse_seconds": 0.5})).status_code == 200
    await asyncio.sleep(0.2)
    with pytest.raises(VmaUnreachable):
        await HttpVmaClient(sim.url, retries=0).health()
    await asyncio.sleep(0.5)
    assert (await client.health()).status == "healthy"


# -- bad input ----------------------------------------------------------------------------

async def test_bad_requests_answer_in_the_seed_shape(client, sim, vcsim, exporter, tmp_path):
    async with httpx.AsyncClient(base_url=sim.url) as http:
        r = await http.post("/api/v1/replicate", json={"job_id": "x", "password": "leak-me-not"})
        body = r.json()
        assert r.status_code == 400 and body["success"] is False and body["error"] == "Invalid request"
        assert "leak-me-not" not in r.text
        r = await http.post("/api/v1/discover", content=b"not json")
        assert r.status_code == 400 and r.json()["success"] is False
        r = await http.post("/sim/mutate", json={"vm": "/nope", "disk": "2000", "percent": 1})
        assert r.status_code == 404 and r.json()["success"] is False
    with pytest.raises(VmaNotFound):
        await client.progress("no-such-job")
    vm, _ = await discover_src(client, vcsim)
    targets, _ = await make_targets(exporter, tmp_path, vm)
    targets[0].vmware_disk_key = "31337"
    with pytest.raises(VmaRemoteError) as err:  # 500: cannot start, as the original answers
        await client.replicate(ReplicateRequest(job_id="bad-key", vm_paths=[vm.path], nbd_targets=targets,
                                                **creds(vcsim)))
    assert "no disk with key 31337" in err.value.details and not err.value.retryable


def test_disk_content_is_deterministic_and_cbt_exact(tmp_path):
    a = DiskImage.open(tmp_path / "a.img", 40 * BLOCK + 1, "vm-1/2000")
    b = DiskImage.open(tmp_path / "b.img", 40 * BLOCK + 1, "vm-1/2000")
    assert a.size == 41 * BLOCK and digest(a.path) == digest(b.path)
    assert digest(DiskImage.open(tmp_path / "c.img", 41 * BLOCK, "vm-1/2001").path) != digest(a.path)
    assert sum(n for _, n, data in a.extents() if data) not in (0, a.size)  # data and holes
    first = a.snapshot()
    written = a.mutate(10)
    assert written == 4 * BLOCK and sum(n for _, n in a.changed_since(first)) == written
    second = a.snapshot()
    assert a.changed_since(second) == []
    reopened = DiskImage.open(tmp_path / "a.img", 0, "")
    assert reopened.change_id == a.change_id and reopened.changed_since(first) == a.changed_since(first)


def test_command_line_serves_and_stops_on_sigterm(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parent.parent),
                                                         os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "oma.plugins.vma.simulator", "--port", "0", "--data-dir",
                             str(tmp_path), "--disk-scale", "1/1024"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:"), proc.stderr.read() if proc.poll() is not None else url
        health = httpx.get(f"{url}/api/v1/health", timeout=5).json()
        assert health["status"] == "healthy" and "uptime" in health
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0


async def test_transient_refusal_is_retried_4xx_is_not(sim, vcsim, caplog):
    caplog.set_level(logging.WARNING, logger="oma.vma.client")
    async with HttpVmaClient(sim.url, retries=5, backoff=0.1) as patient:
        await sim.refuse(0.3)  # back after 0.3 s; the client waits 0.1 + 0.2 + 0.4 s at most
        assert (await patient.health()).status == "healthy"
        assert "retrying" in caplog.text
        caplog.clear()
        with pytest.raises(VmaRejected):
            await patient.discover(DiscoverRequest(**creds(vcsim, password="wrong")))
        assert "retrying" not in caplog.text


async def test_change_ids_go_to_a_real_oma_as_its_appliance(vcsim, exporter, tmp_path, make_settings):
    """The simulator logs in to the real gateway with an appliance token and makes the copier's calls."""
    import uvicorn
    from conftest import SEED_TOKEN, running
    async with running(make_settings(), ("auth",)) as oma:
        port = free_port()
        server = uvicorn.Server(uvicorn.Config(oma.app, host="127.0.0.1", port=port, lifespan="off",
                                               log_config=None))
        serving = asyncio.create_task(server.serve())
        try:
            while not server.started:
                await asyncio.sleep(0.02)
            async with VmaSimulator(tmp_path / "vma", disk_scale=SCALE, verify_tls=False, appliance_id="test-vma",
                                    appliance_token=SEED_TOKEN) as own, \
                    HttpVmaClient(own.url, backoff=0.01) as client:
                vm, _ = await discover_src(client, vcsim)
                targets, files = await make_targets(exporter, tmp_path, vm)
                job_id = f"job-{next(_ids)}"
                await client.replicate(ReplicateRequest(job_id=job_id, vm_paths=[vm.path], nbd_targets=targets,
                                                        oma_url=f"http://127.0.0.1:{port}", **creds(vcsim)))
                done = await wait_finished(client, job_id)
                assert done.status == "completed"
                calls = own.reporter.calls
                # One lookup per disk (no previous_change_id given), then one record per disk.
                assert [c["method"] for c in calls] == ["GET", "GET", "POST", "POST"]
                assert all(c["sent"] and c["status"] not in (None, 401) for c in calls), calls
                assert {c["params"]["disk_id"] for c in calls[:2]} == {d.id for d in vm.disks}
                assert calls[2]["body"]["change_id"].endswith("/0")
        finally:
            server.should_exit = True
            await serving


async def test_a_timeout_is_reported_not_retried(caplog):
    """A VMA that accepts the connection but does not answer in time: VmaTimeout at once."""
    caplog.set_level(logging.WARNING, logger="oma.vma.client")
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)  # accepts, never answers
    port = server.sockets[0].getsockname()[1]
    try:
        async with HttpVmaClient(f"http://127.0.0.1:{port}", timeout=0.3, retries=3, backoff=0.01) as slow:
            t0 = asyncio.get_running_loop().time()
            with pytest.raises(VmaTimeout) as err:
                await slow.progress("job-1")
            assert asyncio.get_running_loop().time() - t0 < 1.0 and err.value.status == 504
            assert "no answer within 0.3 s" in err.value.details and "retrying" not in caplog.text
    finally:
        server.close()
