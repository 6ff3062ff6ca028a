"""Property-based: schemathesis generates requests for every operation of /openapi.json (the seed's
examples, boundary and invalid values, then random ones), sends them with a real session's bearer to
the whole appliance (every service, MariaDB, the CloudStack simulator as the cloud), and checks
`not_a_server_error`: no input may give a 500. A 502/504 from a made-up upstream (a `test` of an
unreachable api_url or vCenter) is the right answer, not a failure.

Seeded and bounded (SEED, MAX_EXAMPLES per operation), so a run is repeatable and short.
Schemathesis' tests are synchronous; the appliance runs on uvicorn in a thread with its own loop.
"""
from __future__ import annotations

import asyncio
import threading
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
import requests
import schemathesis
import uvicorn
from schemathesis.checks import not_a_server_error

from oma.plugins.ossea.simulator import DEFAULT_VM_ID, CloudStackSimulator
from oma.services.gateway.app import create_app
from oma.shared.natsserver import EmbeddedNats
from oma.runner import Appliance
from oma.shared.settings import SERVICES, Settings
from tests.conftest import SEED_TOKEN, free_port, mariadb_exec, mariadb_settings

SEED = 20250812
MAX_EXAMPLES = 20  # per operation, fuzzing phase; the examples and coverage phases add their own
API_KEY, SECRET = "sim-key", "sim-secret"
LOGIN = {"appliance_id": "test-vma", "token": SEED_TOKEN, "version": "1.0.0"}


class BackgroundAppliance:
    """NATS, the CloudStack simulator, every service on a fresh MariaDB database and the gateway on
    uvicorn, all on one event loop in a thread. `config_id` is an OSSEA configuration pointing at
    the simulator (id 1: the id the seed's replication example names); `decoy_id` another one."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self.base_url = ""
        self.config_id = self.decoy_id = 0
        self.headers: dict[str, str] = {}
        self.sim: CloudStackSimulator | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="fuzz-appliance", daemon=True)

    def __enter__(self) -> BackgroundAppliance:
        self._thread.start()
        if not self.ready.wait(120) or self.error:
            raise RuntimeError("the appliance did not start") from self.error
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._loop and self._stop:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(60)

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # noqa: BLE001 - reported to the test thread
            self.error = exc
            self.ready.set()

    async def _main(self) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        db_name = f"oma_fuzz_{uuid.uuid4().hex[:10]}"
        await mariadb_exec(f"CREATE DATABASE `{db_name}`")
        nats = EmbeddedNats()
        (self.tmp / "dev").mkdir(exist_ok=True)
        # The simulator's device dir is the appliance's by-id dir: attached volumes appear there.
        sim = self.sim = CloudStackSimulator(API_KEY, SECRET, device_dir=self.tmp / "dev", job_latency=0.01)
        try:
            sim_url = await sim.start()
            settings = Settings(nats_url=await nats.start(), data_dir=self.tmp / "data", nbd_port=free_port(),
                                appliance_tokens=f"test-vma={SEED_TOKEN}", startup_timeout=20,
                                export_backend="nbdkit", device_by_id_dir=self.tmp / "dev", cloud_timeout=2.0,
                                cloud_job_timeout=5.0, device_wait=5.0, provision_wait=30.0, vsphere_timeout=3.0,
                                **mariadb_settings(db_name))
            async with Appliance(settings, SERVICES) as appliance:
                port = free_port()
                server = uvicorn.Server(uvicorn.Config(create_app(settings, appliance.nats_url), host="127.0.0.1",
                                                       port=port, log_config=None, access_log=False))
                serving = asyncio.create_task(server.serve())
                try:
                    while not server.started:
                        if serving.done():
                            serving.result()
                        await asyncio.sleep(0.05)
                    self.base_url = f"http://127.0.0.1:{port}"
                    await self._configure(sim_url)
                    self.ready.set()
                    await self._stop.wait()
                finally:
                    server.should_exit = True
                    await serving
        finally:
            await sim.stop()
            await nats.stop()
            await mariadb_exec(f"DROP DATABASE IF EXISTS `{db_name}`")

    async def _configure(self, sim_url: str) -> None:
        async with httpx.AsyncClient(base_url=self.base_url) as http:
            token = (await http.post("/api/v1/auth/login", json=LOGIN)).json()["session_token"]
            ids = []
            for name in ("simulator", "decoy"):
                config = {"name": name, "api_url": sim_url, "api_key": API_KEY, "secret_key": SECRET,
                          "domain": "/", "zone": "OSSEA-Zone", "oma_vm_id": DEFAULT_VM_ID}
                r = await http.post("/api/v1/ossea/config", headers={"Authorization": f"Bearer {token}"},
                                    json={"action": "create", "configuration": config})
                assert r.status_code == 201, r.text
                ids.append(r.json()["configuration"]["id"])
        self.config_id, self.decoy_id = ids

    def bearer(self) -> dict[str, str]:
        r = requests.post(f"{self.base_url}/api/v1/auth/login", json=LOGIN, timeout=30)
        assert r.status_code == 200, r.text
        return {"Authorization": f"Bearer {r.json()['session_token']}"}


@pytest.fixture(scope="module")
def appliance(tmp_path_factory) -> BackgroundAppliance:
    with BackgroundAppliance(tmp_path_factory.mktemp("fuzz")) as running:
        running.headers = running.bearer()  # one session for the run; a fuzzed logout gets its own
        yield running


@pytest.fixture(scope="module")
def api_schema(appliance: BackgroundAppliance):
    config = schemathesis.Config.from_dict({
        "seed": SEED, "base-url": appliance.base_url, "request-timeout": 60,
        "generation": {"mode": "all", "max-examples": MAX_EXAMPLES, "database": "none"},
        # An upstream that is down or made up (a fuzzed api_url, vCenter host) is a 502/504 by design.
        "checks": {"not_a_server_error": {"expected-statuses": ["2XX", "3XX", "4XX", 502, 504]}}})
    return schemathesis.openapi.from_url(f"{appliance.base_url}/openapi.json", config=config)


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
def test_no_input_gives_a_server_error(case, appliance: BackgroundAppliance):
    headers = appliance.bearer() if case.path == "/api/v1/auth/logout" else appliance.headers
    body = case.body if isinstance(case.body, dict) else {}
    if (case.path == "/api/v1/ossea/config" and body.get("id") == appliance.config_id
            and body.get("action") in ("update", "delete")):
        # The simulator's configuration must survive, so that replications reach the cloud.
        case.body = {**body, "id": appliance.decoy_id}
    if case.path.endswith("/events"):
        # A VM's event stream never ends by itself: the status line is the answer to check.
        with requests.request(**case.as_transport_kwargs(base_url=appliance.base_url, headers=headers),
                              stream=True, timeout=30) as r:
            assert r.status_code < 500, (r.status_code, r.text if r.status_code != 200 else "")
        return
    response = case.call(headers=headers)
    case.validate_response(response, checks=[not_a_server_error])



def test_the_requests_reached_the_cloud(appliance: BackgroundAppliance):
    """The run above is worth something only if replications got as far as the cloud (the seed's
    example names the simulator's configuration)."""
    commands = {c["command"] for c in appliance.sim.calls}
    assert {"createVolume", "attachVolume", "listZones"} <= commands, commands
