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

from plugins.ossea.signing import signed_query
from plugins.ossea.simulator import (
    AUTH_ERROR,
    CUSTOM_OFFERING_ID,
    DEFAULT_VM_ID,
    DEFAULT_ZONE_ID,
    FIXED_OFFERING_ID,
    GIB,
    NOT_ATTACHED_TEXT,
    CloudStackSimulator,
    disk_serial,
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

    async def attach(self, volume_id: str) -> dict[str, Any]:
        submitted = await self.ok("attachVolume", "POST", id=volume_id, virtualmachineid=DEFAULT_VM_ID)
        return await self.job(submitted["jobid"])


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
        sys.executable, "-m", "plugins.ossea.simulator", "--port", "0", "--api-key", KEY,
        "--secret-key", SECRET, "--zone-name", "Zone-CLI", stdout=asyncio.subprocess.PIPE)
    try:
        url = (await asyncio.wait_for(proc.stdout.readline(), 20)).decode().strip()
        assert url.startswith("http://127.0.0.1:") and url.endswith("/client/api")
        query = signed_query({"command": "listZones"}, KEY, SECRET,
                             datetime.now(UTC) + timedelta(minutes=5))
        async with http.get(url, params=query) as r:
            assert (await r.json())["listzonesresponse"]["zone"][0]["name"] == "Zone-CLI"
    finally:
        proc.terminate()
        assert await asyncio.wait_for(proc.wait(), 10) == 0
