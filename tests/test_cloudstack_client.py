"""The CloudStack client and the ossea plugin against the simulator, over real loopback HTTP."""
from __future__ import annotations

import asyncio
from collections import deque
import logging
import time
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import pluggy
import pytest

from oma.plugins.ossea import client as client_module
from oma.plugins.ossea import plugin
from oma.plugins.ossea.client import (
    CloudAuthError,
    CloudConfigError,
    CloudCredentials,
    CloudInternalError,
    CloudLimitError,
    CloudParamError,
    CloudStackClient,
    CloudStackError,
    CloudTimeout,
    CloudUnknownCommand,
    CloudUnreachable,
)
from oma.plugins.ossea.plugin import test_connection
from oma.plugins.ossea.simulator import (
    CUSTOM_OFFERING_ID,
    DEFAULT_VM_ID,
    DEFAULT_ZONE_ID,
    GIB,
    CloudStackSimulator,
    disk_serial,
)
from oma.shared import hookspecs
from oma.shared.errors import BadGateway, UpstreamTimeout

KEY = "client-test-key"
SECRET = "Sup3r~S3cret[key]-never-shown"


@pytest.fixture
async def sim(tmp_path) -> AsyncIterator[CloudStackSimulator]:
    async with CloudStackSimulator(KEY, SECRET, job_latency=0.05, device_dir=tmp_path) as s:
        yield s


def make_client(sim: CloudStackSimulator, **kw: Any) -> CloudStackClient:
    kw = {"timeout": 5.0, "job_timeout": 5.0, "poll_interval": 0.02, "retry_backoff": 0.01, **kw}
    return CloudStackClient(sim.url, KEY, kw.pop("secret", SECRET), **kw)


@pytest.fixture
async def cs(sim: CloudStackSimulator) -> AsyncIterator[CloudStackClient]:
    async with make_client(sim) as client:
        yield client


async def new_volume(cs: CloudStackClient, size_gb: int = 1) -> dict[str, Any]:
    return await cs.create_volume("disk", DEFAULT_ZONE_ID, CUSTOM_OFFERING_ID, size_gb)


# -- the volume lifecycle -------------------------------------------------------------------------

async def test_list_zones_vms_and_offerings(cs: CloudStackClient) -> None:
    assert [z["name"] for z in await cs.list_zones()] == ["OSSEA-Zone"]
    assert [z["id"] for z in await cs.list_zones(name="OSSEA-Zone")] == [DEFAULT_ZONE_ID]
    assert [vm["id"] for vm in await cs.list_virtual_machines(id=DEFAULT_VM_ID)] == [DEFAULT_VM_ID]
    assert {o["iscustomized"] for o in await cs.list_disk_offerings()} == {True, False}


async def test_empty_list_is_an_empty_list(cs: CloudStackClient) -> None:
    assert await cs.list_volumes(name="nothing-here") == []


async def test_create_attach_detach_delete(cs: CloudStackClient, sim: CloudStackSimulator) -> None:
    volumes = [await new_volume(cs, 3) for _ in range(3)]
    assert all(v["state"] == "Allocated" and v["size"] == 3 * GIB for v in volumes)

    attached = [await cs.attach_volume(v["id"], DEFAULT_VM_ID) for v in volumes]
    assert [v["deviceid"] for v in attached] == [1, 2, 4]  # 3 is the CD-ROM
    assert all(v["virtualmachineid"] == DEFAULT_VM_ID and v["state"] == "Ready" for v in attached)
    link = sim.device_path(volumes[0]["id"])
    assert link.name == f"virtio-{volumes[0]['id'].replace('-', '')[:20]}" and link.is_symlink()

    on_vm = await cs.list_volumes(virtualmachineid=DEFAULT_VM_ID, type="DATADISK")
    assert sorted(v["deviceid"] for v in on_vm) == [1, 2, 4]

    detached = await cs.detach_volume(volumes[1]["id"])
    assert "virtualmachineid" not in detached and not sim.device_path(volumes[1]["id"]).exists()
    await cs.delete_volume(volumes[1]["id"])
    assert await cs.list_volumes(id=volumes[0]["id"])
    assert volumes[1]["id"] not in sim.volumes


async def test_device_symlink_appears_on_attach(cs: CloudStackClient, sim: CloudStackSimulator) -> None:
    volume = await new_volume(cs, 2)
    assert not sim.device_path(volume["id"]).exists()
    await cs.attach_volume(volume["id"], DEFAULT_VM_ID)
    device = sim.device_path(volume["id"])
    assert device == sim.device_dir / f"virtio-{disk_serial(volume['id'])}"
    assert device.resolve() == sim.backing_path(volume["id"]).resolve()
    assert device.stat().st_size == 2 * GIB


# -- errors ---------------------------------------------------------------------------------------

async def test_unknown_command_is_432(cs: CloudStackClient) -> None:
    with pytest.raises(CloudUnknownCommand) as caught:
        await cs.call("listUnicorns")
    assert caught.value.errorcode == 432 and caught.value.status == 502


async def test_failed_job_maps_to_a_parameter_error(cs: CloudStackClient) -> None:
    volume = await new_volume(cs)
    await cs.attach_volume(volume["id"], DEFAULT_VM_ID)
    with pytest.raises(CloudParamError) as caught:
        await cs.attach_volume(volume["id"], DEFAULT_VM_ID)
    assert caught.value.errortext == "Please specify a volume that is not attached to any VM."
    assert caught.value.job_id and caught.value.command == "attachVolume"
    with pytest.raises(CloudParamError, match="not attached to any VM"):
        await cs.delete_volume(volume["id"])


async def test_account_limit_is_535(tmp_path) -> None:
    async with CloudStackSimulator(KEY, SECRET, job_latency=0, max_volumes=2) as sim, make_client(sim) as cs:
        await new_volume(cs)  # the ROOT volume is the first
        with pytest.raises(CloudLimitError) as caught:
            await new_volume(cs)
    assert caught.value.errorcode == 535 and not caught.value.retryable
    assert "Maximum number of resources of type 'volume'" in caught.value.errortext


async def test_injected_530_on_create_surfaces_then_succeeds(cs: CloudStackClient,
                                                             sim: CloudStackSimulator) -> None:
    sim.fail("createVolume", count=2, errorcode=530, errortext="storage pool busy")
    for _ in range(2):
        with pytest.raises(CloudInternalError) as caught:
            await new_volume(cs)  # mutating: never retried by the client
        assert caught.value.retryable and caught.value.errortext == "storage pool busy"
        assert caught.value.resource_id in sim.volumes  # allocated, so the caller can clean up
    assert (await new_volume(cs))["state"] == "Allocated"
    assert [c["command"] for c in sim.calls].count("createVolume") == 3


async def test_reads_are_retried_on_retryable_errors(cs: CloudStackClient, sim: CloudStackSimulator) -> None:
    sim.fail("listZones", count=2, errorcode=530)
    assert len(await cs.list_zones()) == 1
    assert [c["status"] for c in sim.calls if c["command"] == "listZones"] == [530, 530, 200]
    sim.fail("listZones", count=3, errorcode=530)
    with pytest.raises(CloudInternalError):
        await cs.list_zones()


async def test_hang_raises_timeout_within_the_configured_timeout(sim: CloudStackSimulator) -> None:
    sim.hang("listZones")
    async with make_client(sim, timeout=0.5, retries=0) as cs:
        started = asyncio.get_running_loop().time()
        with pytest.raises(CloudTimeout) as caught:
            await cs.list_zones()
    assert asyncio.get_running_loop().time() - started < 2.0
    assert caught.value.status == 504 and isinstance(caught.value, UpstreamTimeout)
    assert isinstance(caught.value, BadGateway) and caught.value.retryable


async def test_job_that_never_finishes_times_out(sim: CloudStackSimulator) -> None:
    sim.set_job_latency(60, "createVolume")
    async with make_client(sim, job_timeout=0.3) as cs:
        with pytest.raises(CloudTimeout) as caught:
            await new_volume(cs)
    assert caught.value.job_id and caught.value.resource_id in sim.volumes
    assert not caught.value.retryable  # the job may still finish: the caller decides


async def test_jobs_that_got_faster_are_polled_at_their_pace(sim: CloudStackSimulator) -> None:
    """The first poll of a job goes where recent jobs of its command were last seen running, and a
    job found done at its first poll is recorded as maybe faster: after slow jobs, fast ones are
    soon found as they finish, not when the slow ones were (recording when a job was found done
    kept every later job waiting at least that long)."""
    sim.set_job_latency(0.6, "createVolume")
    async with make_client(sim, poll_interval=0.5) as cs:
        await new_volume(cs)
        sim.set_job_latency(0.2, "createVolume")
        late = []
        for _ in range(4):
            volume = await new_volume(cs)
            found = time.monotonic()
            job = next(j for j in sim.job_log() if j["instance_id"] == volume["id"])
            late.append(found - job["finished"])
    assert late[0] > 0.15, late  # polled first where the slow job was last seen running
    assert max(late[2:]) < 0.1, late


def test_a_first_poll_drawn_early_costs_polls_not_lateness() -> None:
    """Jobs found done at their first poll under load are recorded as maybe twice as fast, which
    draws the next first polls early; from the soonest time a recent job was found done the polls
    are POLL_MIN apart again, so a job as fast as the others is found as it finishes, not a fifth of
    the time since the early first poll later (~30 ms for a 0.3 s job)."""
    cs = CloudStackClient("http://127.0.0.1:1/client/api", KEY, SECRET, poll_interval=0.5)
    seen, found = deque([0.15] * 8), deque([0.30, 0.31])  # first polls drawn to 0.15 s; found at 0.30 s
    assert cs._poll_pause(0.10, seen, found) == pytest.approx(0.05)  # the first poll: where they were seen
    assert cs._poll_pause(0.29, seen, found) == pytest.approx(0.01)  # no later than where they were found
    assert cs._poll_pause(0.301, seen, found) == pytest.approx(client_module.POLL_MIN)  # then dense again
    assert cs._poll_pause(0.60, seen, found) == pytest.approx(0.06)  # and a fifth of the time beyond
    # Without the second anchor, the steps near 0.3 s are a fifth of the time since 0.15 s.
    assert cs._poll_pause(0.301, seen, None) == pytest.approx(0.0302)


async def test_stopped_cloud_is_unreachable(tmp_path) -> None:
    sim = CloudStackSimulator(KEY, SECRET)
    await sim.start()
    await sim.stop()
    async with make_client(sim, retries=1) as cs:
        with pytest.raises(CloudUnreachable) as caught:
            await cs.list_zones()
    assert caught.value.retryable and caught.value.status == 502
    assert sim.url.split("?")[0] in caught.value.details


async def test_wrong_path_says_to_check_api_url(sim: CloudStackSimulator) -> None:
    async with CloudStackClient(sim.base_url + "/client", KEY, SECRET, timeout=2) as cs:
        with pytest.raises(CloudStackError, match="/client/api"):
            await cs.list_zones()


# -- secrets --------------------------------------------------------------------------------------

async def test_secret_never_in_errors_reprs_or_logs(sim: CloudStackSimulator, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    errors: list[Exception] = []
    async with make_client(sim, secret="wrong-" + SECRET) as bad:
        with pytest.raises(CloudAuthError) as caught:
            await bad.list_zones()
        errors.append(caught.value)
        assert SECRET not in repr(bad)
    async with make_client(sim, timeout=0.3, retries=0) as cs:
        for call in (cs.call("listUnicorns"), cs.create_volume("d", DEFAULT_ZONE_ID, CUSTOM_OFFERING_ID)):
            with pytest.raises(CloudStackError) as caught:
                await call
            errors.append(caught.value)
        sim.hang("listZones")
        with pytest.raises(CloudTimeout) as caught:
            await cs.list_zones()
        errors.append(caught.value)
    creds = CloudCredentials(sim.url, KEY, SECRET)
    texts = [str(e) for e in errors] + [repr(e) for e in errors] + [str(e.body()) for e in errors]
    texts += [repr(creds), str(creds), caplog.text]
    assert caplog.text and "createVolume" in caplog.text
    for text in texts:
        assert SECRET not in text and "signature" not in text.lower().replace("request signature", "")
    assert KEY not in caplog.text


async def test_auth_error_says_what_to_check(sim: CloudStackSimulator) -> None:
    async with make_client(sim, secret="wrong") as cs:
        with pytest.raises(CloudAuthError) as caught:
            await cs.list_zones()
    error = caught.value
    assert (error.status, error.error, error.errorcode) == (502, "OSSEA authentication failed", 401)
    assert "api_key" in error.details and "secret_key" in error.details and "clock" in error.details


# -- plugin ---------------------------------------------------------------------------------------

def test_plugin_registers_the_ossea_backend() -> None:
    pm = pluggy.PluginManager("oma")
    pm.add_hookspecs(hookspecs)
    pm.register(plugin)
    registered: dict[str, Any] = {}
    pm.hook.oma_register_cloud_backends(
        register=lambda name, factory, description="": registered.update({name: (factory, description)}))
    factory, description = registered["ossea"]
    assert "CloudStack" in description
    settings = SimpleNamespace(cloud_timeout=7.0, cloud_job_timeout=70.0)
    client = factory(CloudCredentials("http://127.0.0.1:1/client/api", KEY, SECRET), settings)
    assert isinstance(client, CloudStackClient)
    assert (client.timeout, client.job_timeout) == (7.0, 70.0)
    from_dict = factory({"api_url": "http://x/client/api", "api_key": KEY, "secret_key": SECRET})
    assert (from_dict.timeout, from_dict.job_timeout) == (30.0, 120.0)


async def test_connection_success(cs: CloudStackClient) -> None:
    assert await test_connection(cs, "OSSEA-Zone", DEFAULT_VM_ID) == {
        "zones_found": 1, "zone_verified": "OSSEA-Zone", "api_accessible": True}


async def test_connection_wrong_keys(sim: CloudStackSimulator) -> None:
    async with make_client(sim, secret="not-it") as cs:
        with pytest.raises(CloudAuthError, match="secret_key"):
            await test_connection(cs, "OSSEA-Zone")


async def test_connection_wrong_zone_lists_existing_zones(cs: CloudStackClient) -> None:
    with pytest.raises(CloudConfigError) as caught:
        await test_connection(cs, "Moon-Zone")
    assert caught.value.status == 400
    assert "'Moon-Zone' not found" in caught.value.details and "'OSSEA-Zone'" in caught.value.details


@pytest.mark.parametrize("vm_id", ["00000000-0000-4000-8000-000000000000", "not-a-uuid"])
async def test_connection_unknown_oma_vm(cs: CloudStackClient, vm_id: str) -> None:
    with pytest.raises(CloudConfigError, match="oma_vm_id") as caught:
        await test_connection(cs, "OSSEA-Zone", vm_id)
    assert vm_id in caught.value.details
