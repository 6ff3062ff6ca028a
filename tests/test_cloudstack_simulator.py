"""The CloudStack simulator keeps CloudStack's rules: signatures, envelopes, jobs, volumes, limits.

Raw signed HTTP on loopback, so these tests check the wire shape a real client sees.
"""
from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import pytest

from oma.plugins.ossea.signing import signed_query
from oma.plugins.ossea.simulator import (
    AUTH_ERROR,
    CUSTOM_OFFERING_ID,
    DEFAULT_VM_ID,
    DEFAULT_ZONE_ID,
    FIXED_OFFERING_ID,
    GIB,
    NOT_ATTACHED_TEXT,
    STRAGGLER_DETACH,
    CloudStackSimulator,
    data_disk_limit_text,
    disk_serial,
    pci_slots_text,
)

KEY, SECRET = "sim-key", "sim-secret"


@pytest.fixture
async def sim() -> AsyncIterator[CloudStackSimulator]:
    async with CloudStackSimulator(KEY, SECRET, job_latency=0.05, max_data_disks=3) as s:
        yield s


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


class Api:
    """Signed requests exactly as a CloudStack client sends them."""

    def __init__(self, sim: CloudStackSimulator, http: aiohttp.ClientSession):
        self.sim, self.http = sim, http

    def signed(self, command: str, secret: str = SECRET, expires: datetime | None = None,
               **params: Any) -> dict[str, str]:
        expires = expires or datetime.now(UTC) + timedelta(minutes=5)
        return signed_query({"command": command, **{k: str(v) for k, v in params.items()}},
                            KEY, secret, expires)

    async def send(self, query: dict[str, str], method: str = "GET") -> tuple[int, dict[str, Any], Any]:
        if method == "GET":
            request = self.http.get(self.sim.url, params=query)
        else:
            request = self.http.post(self.sim.url, data=query)
        async with request as resp:
            return resp.status, await resp.json(), resp.headers

    async def __call__(self, command: str, method: str = "GET", **params: Any) -> tuple[int, dict[str, Any]]:
        status, body, _ = await self.send(self.signed(command, **params), method)
        return status, body

    async def ok(self, command: str, method: str = "GET", **params: Any) -> dict[str, Any]:
        status, body = await self(command, method, **params)
        assert status == 200, body
        return body[f"{command.lower()}response"]

    async def job(self, job_id: str) -> dict[str, Any]:
        for _ in range(100):
            job = await self.ok("queryAsyncJobResult", jobid=job_id)
            if job["jobstatus"]:
                return job
            await asyncio.sleep(0.02)
        raise AssertionError("job never finished")

    async def create(self, size: int = 2, **extra: Any) -> dict[str, Any]:
        submitted = await self.ok("createVolume", "POST", name="d", zoneid=DEFAULT_ZONE_ID,
                                  diskofferingid=CUSTOM_OFFERING_ID, size=size, **extra)
        return (await self.job(submitted["jobid"]))["jobresult"]["volume"]

    async def submit(self, command: str, **params: Any) -> str:
        return (await self.ok(command, "POST", **params))["jobid"]

    async def attach(self, volume_id: str, vm_id: str = DEFAULT_VM_ID) -> dict[str, Any]:
        return await self.job(await self.submit("attachVolume", id=volume_id, virtualmachineid=vm_id))

    async def detach(self, volume_id: str) -> dict[str, Any]:
        return await self.job(await self.submit("detachVolume", id=volume_id))


@pytest.fixture
def api(sim: CloudStackSimulator, http: aiohttp.ClientSession) -> Api:
    return Api(sim, http)


# -- signatures -----------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["GET", "POST"])
@pytest.mark.parametrize("fault", ["wrong secret", "tampered", "expired", "unknown key"])
async def test_bad_requests_get_401_in_cloudstacks_shape(api: Api, method: str, fault: str) -> None:
    past = datetime.now(UTC) - timedelta(seconds=5)
    query = {
        "wrong secret": lambda: api.signed("listZones", secret="not-the-secret"),
        "tampered": lambda: {**api.signed("listZones", name="OSSEA-Zone"), "name": "Other"},
        "expired": lambda: api.signed("listZones", expires=past),
        "unknown key": lambda: {**api.signed("listZones"), "apiKey": "someone-else"},
    }[fault]()
    status, body, headers = await api.send(query, method)
    assert status == 401
    assert body == {"listzonesresponse": {"uuidList": [], "errorcode": 401, "errortext": AUTH_ERROR}}
    assert headers["X-Description"] == AUTH_ERROR


@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_awkward_characters_verify_and_round_trip(api: Api, method: str) -> None:
    name = "migr disk~1 [scsi0:1]*+é"
    submitted = await api.ok("createVolume", method, name=name, zoneid=DEFAULT_ZONE_ID,
                             diskofferingid=CUSTOM_OFFERING_ID, size=1)
    volumes = await api.ok("listVolumes", name=name)
    assert [v["id"] for v in volumes["volume"]] == [submitted["id"]]


async def test_mixed_case_parameter_names_verify(api: Api) -> None:
    assert (await api.ok("listZones", Name="OSSEA-Zone"))["count"] == 1


# -- envelope rules -------------------------------------------------------------------------------

async def test_list_envelope_and_empty_list(api: Api) -> None:
    zones = await api.ok("listZones")
    assert zones["count"] == 1 and zones["zone"][0]["name"] == "OSSEA-Zone"
    status, body = await api("listVolumes", name="no-such-volume")
    assert (status, body) == (200, {"listvolumesresponse": {}})


async def test_unknown_command_is_432_errorresponse(api: Api) -> None:
    status, body, headers = await api.send(api.signed("listUnicorns"))
    assert status == 432 and body["errorresponse"]["errorcode"] == 432
    assert headers["X-Description"] == body["errorresponse"]["errortext"]


async def test_unknown_uuid_is_431_with_cserrorcode_9999(api: Api) -> None:
    status, body = await api("listVirtualMachines", id="00000000-0000-0000-0000-000000000000")
    error = body["listvirtualmachinesresponse"]
    assert status == 431 and error["errorcode"] == 431 and error["cserrorcode"] == 9999
    assert error["uuidList"] == [] and "Invalid parameter id" in error["errortext"]


async def test_paging_counts_the_total(api: Api) -> None:
    for _ in range(3):
        await api.create(1)
    page = await api.ok("listVolumes", type="DATADISK", page=2, pagesize=2)
    assert page["count"] == 3 and len(page["volume"]) == 1
    status, _ = await api("listVolumes", pagesize=501)
    assert status == 431


# -- volumes and offerings ------------------------------------------------------------------------

async def test_disk_offerings_one_fixed_one_custom(api: Api) -> None:
    offerings = {o["id"]: o for o in (await api.ok("listDiskOfferings"))["diskoffering"]}
    assert offerings[CUSTOM_OFFERING_ID]["iscustomized"] is True
    fixed = offerings[FIXED_OFFERING_ID]
    assert fixed["iscustomized"] is False and fixed["disksize"] == 20


async def test_create_volume_size_rules(api: Api, sim: CloudStackSimulator) -> None:
    common = {"name": "d", "zoneid": DEFAULT_ZONE_ID}
    status, body = await api("createVolume", "POST", diskofferingid=CUSTOM_OFFERING_ID, **common)
    error = body["createvolumeresponse"]
    assert (status, error["cserrorcode"]) == (431, 4350)
    assert error["errortext"] == "This disk offering requires a custom size specified"
    status, body = await api("createVolume", "POST", diskofferingid=FIXED_OFFERING_ID, size=5, **common)
    assert status == 431 and "does not allow custom size" in body["createvolumeresponse"]["errortext"]

    submitted = await api.ok("createVolume", "POST", diskofferingid=CUSTOM_OFFERING_ID, size=3, **common)
    assert set(submitted) == {"id", "jobid"}
    assert sim.volume_json(sim.volumes[submitted["id"]])["state"] == "Allocated"  # exists at once
    pending = await api.ok("queryAsyncJobResult", jobid=submitted["jobid"])
    assert pending["jobstatus"] == 0 and "jobresult" not in pending
    volume = (await api.job(submitted["jobid"]))["jobresult"]["volume"]
    assert volume["size"] == 3 * GIB and volume["state"] == "Allocated"


async def test_deviceids_skip_3_and_the_data_disk_cap(api: Api) -> None:
    volumes = [await api.create() for _ in range(5)]
    ids = [(await api.attach(v["id"]))["jobresult"]["volume"]["deviceid"] for v in volumes[:3]]
    assert ids == [1, 2, 4]
    failed = await api.attach(volumes[3]["id"])
    assert failed["jobstatus"] == 2 and failed["jobresultcode"] == 431
    assert "maximum number of data disks (3)" in failed["jobresult"]["errortext"]

    detached = await api.job((await api.ok("detachVolume", "POST", id=volumes[1]["id"]))["jobid"])
    assert "virtualmachineid" not in detached["jobresult"]["volume"]
    assert (await api.attach(volumes[4]["id"]))["jobresult"]["volume"]["deviceid"] == 2


async def test_attach_twice_fails_the_job_and_delete_refuses_attached(api: Api) -> None:
    volume = await api.create()
    assert (await api.attach(volume["id"]))["jobresult"]["volume"]["state"] == "Ready"
    failed = await api.attach(volume["id"])
    assert failed["jobresult"] == {"uuidList": [], "errorcode": 431, "cserrorcode": 4350,
                                   "errortext": NOT_ATTACHED_TEXT}
    status, body = await api("deleteVolume", "POST", id=volume["id"])
    assert status == 431
    assert body["deletevolumeresponse"]["errortext"] == NOT_ATTACHED_TEXT
    await api.job((await api.ok("detachVolume", "POST", id=volume["id"]))["jobid"])
    assert await api.ok("deleteVolume", "POST", id=volume["id"]) == {"success": True}


async def test_account_limits_are_535() -> None:
    async with CloudStackSimulator(KEY, SECRET, job_latency=0, max_volumes=3, max_primary_gb=30) as sim, \
            aiohttp.ClientSession() as http:
        api = Api(sim, http)
        status, body = await api("createVolume", "POST", name="big", zoneid=DEFAULT_ZONE_ID,
                                 diskofferingid=CUSTOM_OFFERING_ID, size=23)  # + 8 GiB ROOT > 30
        assert status == 535 and "'primary_storage'" in body["createvolumeresponse"]["errortext"]
        await api.create(1)
        await api.create(1)  # with ROOT: 3 volumes
        status, body = await api("createVolume", "POST", name="x", zoneid=DEFAULT_ZONE_ID,
                                 diskofferingid=CUSTOM_OFFERING_ID, size=1)
        assert status == 535
        assert body["createvolumeresponse"]["errortext"].startswith(
            "Maximum number of resources of type 'volume' for account")


async def test_device_symlink_lifecycle(tmp_path) -> None:
    async with CloudStackSimulator(KEY, SECRET, job_latency=0, device_dir=tmp_path) as sim, \
            aiohttp.ClientSession() as http:
        api = Api(sim, http)
        volume = await api.create(2)
        link = tmp_path / f"virtio-{disk_serial(volume['id'])}"
        assert not link.exists()
        await api.attach(volume["id"])
        assert link.is_symlink() and link.resolve() == sim.backing_path(volume["id"]).resolve()
        assert os.path.getsize(link) == 2 * GIB
        await api.job((await api.ok("detachVolume", "POST", id=volume["id"]))["jobid"])
        assert not link.exists() and sim.backing_path(volume["id"]).exists()
        await api.ok("deleteVolume", "POST", id=volume["id"])
        assert not sim.backing_path(volume["id"]).exists()


# -- per-VM work queue, data-disk limits, hazards -------------------------------------------------

@pytest.fixture
async def queue_api(http: aiohttp.ClientSession) -> AsyncIterator[Api]:
    """A simulator whose jobs take long enough to see how they line up, with a second VM."""
    async with CloudStackSimulator(KEY, SECRET, job_latency=0.15) as s:
        s.add_vm("target-vm", OTHER_VM)
        yield Api(s, http)


OTHER_VM = "0be1e5e0-0000-4000-8000-00000000b0b0"


def intervals(sim: CloudStackSimulator, vm_id: str) -> list[tuple[float, float]]:
    return sorted((j["started"], j["finished"]) for j in sim.job_log() if j["vm_id"] == vm_id)


async def test_attaches_to_one_vm_run_one_at_a_time_two_vms_overlap(queue_api: Api) -> None:
    api, sim = queue_api, queue_api.sim
    volumes = [(await api.create())["id"] for _ in range(6)]
    sim.calls.clear()
    sim.jobs.clear()  # only the attaches in the job log
    submitted = await asyncio.gather(*(
        api.submit("attachVolume", id=v, virtualmachineid=DEFAULT_VM_ID if i < 3 else OTHER_VM)
        for i, v in enumerate(volumes)))
    jobs = [await api.job(j) for j in submitted]
    assert [j["jobstatus"] for j in jobs] == [1] * 6

    for vm in (DEFAULT_VM_ID, OTHER_VM):
        spans = intervals(sim, vm)
        assert len(spans) == 3
        for (_, end), (start, _) in zip(spans, spans[1:]):
            assert start >= end  # the next job of the VM starts only when the last one ended
        assert spans[-1][1] - spans[0][0] >= 3 * 0.15
    oma, other = intervals(sim, DEFAULT_VM_ID)[0], intervals(sim, OTHER_VM)[0]
    assert oma[0] < other[1] and other[0] < oma[1]  # the two VMs' queues ran side by side
    async with api.http.get(f"{sim.base_url}/sim/job-log") as r:
        assert {j["jobid"] for j in await r.json()} == set(submitted)


async def test_vm_queue_keeps_submission_order(queue_api: Api) -> None:
    api, sim = queue_api, queue_api.sim
    volumes = [(await api.create())["id"] for _ in range(3)]
    await api.attach(volumes[0])
    sim.jobs.clear()
    submitted = [await api.submit("detachVolume", id=volumes[0])]
    submitted += [await api.submit("attachVolume", id=v, virtualmachineid=DEFAULT_VM_ID) for v in volumes[1:]]
    done = [await api.job(j) for j in submitted]
    assert [j["jobstatus"] for j in done] == [1] * 3
    started = sorted(sim.job_log(), key=lambda j: j["started"])
    assert [j["jobid"] for j in started] == submitted


async def test_data_volume_limit_counts_pre_attached_disks(http: aiohttp.ClientSession) -> None:
    async with CloudStackSimulator(KEY, SECRET, job_latency=0, max_data_disks=10) as sim:
        api = Api(sim, http)
        async with http.post(f"{sim.base_url}/sim/pre-attach", json={"count": 3}) as r:
            assert r.status == 200 and len(await r.json()) == 3
        listed = await api.ok("listVolumes", virtualmachineid=DEFAULT_VM_ID, type="DATADISK")
        assert listed["count"] == 3 and {v["deviceid"] for v in listed["volume"]} == {1, 2, 4}

        volumes = [(await api.create(1))["id"] for _ in range(8)]
        for v in volumes[:7]:
            assert (await api.attach(v))["jobstatus"] == 1
        refused = await api.attach(volumes[7])
        assert (refused["jobstatus"], refused["jobresultcode"]) == (2, 431)
        assert refused["jobresult"]["errortext"] == (
            "The specified VM already has the maximum number of data disks (10) attached. "
            "Please specify another VM.") == data_disk_limit_text(10)
        assert sim.volumes[volumes[7]].vm_id is None and sim.volumes[volumes[7]].state == "Allocated"

        await api.detach(volumes[0])  # a slot frees up, the refused disk fits
        assert (await api.attach(volumes[7]))["jobstatus"] == 1
        async with http.post(f"{sim.base_url}/sim/pre-attach", json={"count": 1}) as r:
            assert r.status == 400 and "exceed the limit of 10" in await r.text()


async def test_concurrent_attaches_past_the_limit_run_out_of_device_ids(http: aiohttp.ClientSession) -> None:
    """CloudStack counts before queueing: a burst all passes the count, the surplus fails in the queue."""
    async with CloudStackSimulator(KEY, SECRET, job_latency=0.02, max_data_disks=10, pre_attached=3) as sim:
        api = Api(sim, http)
        volumes = [(await api.create(1))["id"] for _ in range(9)]
        submitted = await asyncio.gather(*(
            api.submit("attachVolume", id=v, virtualmachineid=DEFAULT_VM_ID) for v in volumes))
        jobs = [await api.job(j) for j in submitted]
        assert [j["jobstatus"] for j in jobs] == [1] * 7 + [2] * 2  # in submission order
        for failed in jobs[7:]:
            assert failed["jobresultcode"] == 530
            assert failed["jobresult"]["errortext"] == f"All device Ids are used by vm {DEFAULT_VM_ID}"
        attached = await api.ok("listVolumes", virtualmachineid=DEFAULT_VM_ID, type="DATADISK")
        assert attached["count"] == 10


async def test_pci_slot_limit_fails_in_the_hypervisor(http: aiohttp.ClientSession) -> None:
    async with CloudStackSimulator(KEY, SECRET, job_latency=0, pci_slots=3, pre_attached=1) as sim:
        api = Api(sim, http)
        volumes = [await api.create(1) for _ in range(3)]
        assert [(await api.attach(v["id"]))["jobstatus"] for v in volumes[:2]] == [1, 1]
        failed = await api.attach(volumes[2]["id"])
        assert (failed["jobstatus"], failed["jobresultcode"]) == (2, 530)
        assert failed["jobresult"]["errortext"] == pci_slots_text("d", "oma-appliance") == (
            "Failed to attach volume d to VM oma-appliance; org.libvirt.LibvirtException: "
            "internal error: No more available PCI slots")
        assert sim.volumes[volumes[2]["id"]].vm_id is None  # created on storage, not attached
        assert sim.volumes[volumes[2]["id"]].state == "Ready"
        await api.detach(volumes[0]["id"])
        assert (await api.attach(volumes[2]["id"]))["jobstatus"] == 1


async def test_straggler_detach_clears_a_newer_attach_elsewhere_and_is_recorded(queue_api: Api) -> None:
    """apache/cloudstack #14214: a client retries a detach without waiting, then attaches the volume
    to another VM as soon as the first detach is done; the retry, still queued on the old VM, runs
    last and clears the new attachment while the disk stays in the other VM."""
    api, sim = queue_api, queue_api.sim
    volume = (await api.create())["id"]
    fillers = [(await api.create())["id"] for _ in range(4)]
    assert (await api.attach(volume))["jobstatus"] == 1

    first = await api.submit("detachVolume", id=volume)
    for f in fillers:  # the OMA VM has other work queued: the retry waits behind it
        await api.submit("attachVolume", id=f, virtualmachineid=DEFAULT_VM_ID)
    retry = await api.submit("detachVolume", id=volume)
    assert (await api.job(first))["jobstatus"] == 1
    moved = await api.attach(volume, OTHER_VM)
    assert moved["jobresult"]["volume"]["virtualmachineid"] == OTHER_VM
    assert (await api.ok("queryAsyncJobResult", jobid=retry))["jobstatus"] == 0  # still queued

    straggler = await api.job(retry)
    assert straggler["jobstatus"] == 1  # CloudStack reports success
    shown = (await api.ok("listVolumes", id=volume))["volume"][0]
    assert "virtualmachineid" not in shown  # the attach to the other VM is forgotten...
    assert sim.orphans[OTHER_VM] == {volume}  # ...while its libvirt domain still holds the disk
    async with api.http.get(f"{sim.base_url}/sim/hazards") as r:
        hazards = await r.json()
    assert hazards == sim.hazards and len(hazards) == 1
    assert {k: hazards[0][k] for k in ("kind", "jobid", "volume_id", "detached_from", "attached_to")} == {
        "kind": STRAGGLER_DETACH, "jobid": retry, "volume_id": volume,
        "detached_from": DEFAULT_VM_ID, "attached_to": OTHER_VM}


async def test_detach_confirmed_before_attach_elsewhere_leaves_no_hazard(queue_api: Api) -> None:
    api, sim = queue_api, queue_api.sim
    volume = (await api.create())["id"]
    await api.attach(volume)
    detach = await api.submit("detachVolume", id=volume)
    early = await api.attach(volume, OTHER_VM)  # not waiting: still attached when asked, refused
    assert early["jobstatus"] == 2 and early["jobresult"]["errortext"] == NOT_ATTACHED_TEXT
    assert (await api.job(detach))["jobstatus"] == 1
    assert (await api.attach(volume, OTHER_VM))["jobstatus"] == 1
    assert (await api.detach(volume))["jobstatus"] == 1
    assert sim.hazards == [] and not any(sim.orphans.values())


# -- control endpoint and fault injection ---------------------------------------------------------

async def test_control_endpoint_fail_calls_and_volumes(api: Api, http: aiohttp.ClientSession) -> None:
    base = api.sim.base_url
    async with http.post(f"{base}/sim/fail", json={"command": "listZones", "count": 1,
                                                   "errorcode": 530, "errortext": "boom"}) as r:
        assert r.status == 200
    status, body = await api("listZones")
    assert status == 530 and body["listzonesresponse"]["errortext"] == "boom"
    assert (await api("listZones"))[0] == 200

    async with http.get(f"{base}/sim/calls") as r:
        calls = await r.json()
    assert [c["status"] for c in calls] == [530, 200]
    assert all("signature" not in c["params"] and c["command"] == "listZones" for c in calls)
    async with http.get(f"{base}/sim/volumes") as r:
        assert [v["type"] for v in await r.json()] == ["ROOT"]


async def test_fault_on_async_command_fails_its_job(api: Api) -> None:
    api.sim.fail("attachVolume", errorcode=530, errortext="host down")
    volume = await api.create()
    failed = await api.attach(volume["id"])
    assert (failed["jobstatus"], failed["jobresultcode"]) == (2, 530)
    assert failed["jobresult"]["errortext"] == "host down"
    assert (await api.attach(volume["id"]))["jobstatus"] == 1


async def test_hang_and_release_over_http(api: Api, http: aiohttp.ClientSession) -> None:
    async with http.post(f"{api.sim.base_url}/sim/hang", json={"command": "listZones"}):
        pass
    pending = asyncio.ensure_future(api("listZones"))
    await asyncio.sleep(0.2)
    assert not pending.done()
    async with http.post(f"{api.sim.base_url}/sim/release", json={}):
        pass
    assert (await asyncio.wait_for(pending, 2))[0] == 200


async def test_job_latency_and_latency(api: Api) -> None:
    api.sim.set_job_latency(0.3, "createVolume")
    api.sim.set_latency("listZones", 0.2)
    started = asyncio.get_running_loop().time()
    await api.ok("listZones")
    assert asyncio.get_running_loop().time() - started >= 0.2
    submitted = await api.ok("createVolume", "POST", name="d", zoneid=DEFAULT_ZONE_ID,
                             diskofferingid=CUSTOM_OFFERING_ID, size=1)
    await asyncio.sleep(0.1)
    assert (await api.ok("queryAsyncJobResult", jobid=submitted["jobid"]))["jobstatus"] == 0
    assert (await api.job(submitted["jobid"]))["jobstatus"] == 1


async def test_command_line_prints_its_url_when_ready(http: aiohttp.ClientSession) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "oma.plugins.ossea.simulator", "--port", "0", "--api-key", KEY,
        "--secret-key", SECRET, "--zone-name", "Zone-CLI", "--pre-attached", "2",
        "--max-data-disks", "4", "--pci-slots", "3", stdout=asyncio.subprocess.PIPE)
    try:
        url = (await asyncio.wait_for(proc.stdout.readline(), 20)).decode().strip()
        assert url.startswith("http://127.0.0.1:") and url.endswith("/client/api")

        async def call(command: str, **params: str) -> dict[str, Any]:
            query = signed_query({"command": command, **params}, KEY, SECRET,
                                 datetime.now(UTC) + timedelta(minutes=5))
            async with http.get(url, params=query) as r:
                return (await r.json())[f"{command.lower()}response"]
        assert (await call("listZones"))["zone"][0]["name"] == "Zone-CLI"
        assert (await call("listVolumes", virtualmachineid=DEFAULT_VM_ID, type="DATADISK"))["count"] == 2
    finally:
        proc.terminate()
        assert await asyncio.wait_for(proc.wait(), 10) == 0
