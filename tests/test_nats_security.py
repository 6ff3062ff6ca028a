"""The appliance's own bus is closed: oma-api's embedded nats-server has a user per client with the
permissions of shared/natsauth.py (= ops/nats/nats-server.conf), refuses anonymous clients, and
oma-admin reaches it with the admin credentials oma-api leaves in its data dir."""
from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import stat
import subprocess
import time
from pathlib import Path
from typing import Any, AsyncIterator

import httpx
import nats
import pytest
from nats.errors import Error as NatsError

from oma.shared import natsauth
from oma.runner import Appliance
from oma.shared.settings import SERVICES
from oma.shared.subjects import EVENTS_STREAM, Config, Contexts, health
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parent.parent
SERVICE_USERS = (*SERVICES, "gateway")


# --- one source of truth ---------------------------------------------------------------------
def test_ops_conf_is_generated_from_natsauth():
    assert (ROOT / "ops/nats/nats-server.conf").read_text() == natsauth.render_ops_conf(), \
        "regenerate it: python -m oma.shared.natsauth > ops/nats/nats-server.conf"


def test_only_admin_may_touch_streams_in_the_permissions():
    for user, perms in natsauth.permissions().items():
        js = [s for s in perms.publish if s.startswith("$JS.API")]
        if user == natsauth.ADMIN:
            assert "$JS.API.>" in js
        else:  # a stream's info and creation when missing; consumers only for the stream's reader
            allowed = {natsauth.STREAM_INFO, natsauth.STREAM_CREATE}
            if user == "context_aggregator":
                allowed |= set(natsauth.CONSUMER_API)
            assert set(js) <= allowed, (user, js)


# --- oma-api as a process ----------------------------------------------------------------------
def clean_env(data_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMA_NATS", "NATS_PASSWORD"))}
    return {**env, "OMA_DATA_DIR": str(data_dir), "OMA_NBD_PORT": str(free_port())}


class OmaApi:
    def __init__(self, data_dir: Path):
        self.data_dir = data_dir
        self.port = free_port()
        self.log = data_dir.parent / f"oma-api-{self.port}.log"
        self.proc = subprocess.Popen(["oma-api", "-port", str(self.port), "-db-type", "memory"],
                                     env=clean_env(data_dir), stdout=self.log.open("wb"), stderr=subprocess.STDOUT)

    def wait_healthy(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()[-2000:]
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise AssertionError("oma-api did not become healthy:\n" + self.log.read_text()[-2000:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def api(tmp_path_factory) -> OmaApi:
    server = OmaApi(tmp_path_factory.mktemp("oma-api") / "data")
    try:
        server.wait_healthy()
        yield server
    finally:
        server.stop()


async def refused(url: str, **auth: str) -> str:
    with pytest.raises(NatsError) as exc:
        nc = await nats.connect(url, allow_reconnect=False, connect_timeout=3, max_reconnect_attempts=0, **auth)
        await nc.close()
    return str(exc.value)


async def test_anonymous_and_wrong_password_are_refused(api: OmaApi):
    access = natsauth.read_admin_file(api.data_dir)
    assert access is not None and access.user == "admin"
    assert "authorization" in (await refused(access.url)).lower()
    for user in ("admin", "gateway", "inventory"):
        assert "authorization" in (await refused(access.url, user=user, password="n" + "0" * 48)).lower()
    # The right password is let in: the refusals above are about credentials.
    nc = await nats.connect(access.url, user=access.user, password=access.password, allow_reconnect=False)
    await nc.close()


def test_admin_file_is_private(api: OmaApi):
    path = natsauth.admin_file(api.data_dir)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert set(json.loads(path.read_text())) == {"url", "user", "password"}


def test_oma_admin_rebuilds_contexts_with_no_nats_flags(api: OmaApi):
    r = subprocess.run(["oma-admin", "contexts", "rebuild"], env=clean_env(api.data_dir),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    body = json.loads(r.stdout)
    assert body["success"] is True and body["events_failed"] == 0, body


def test_oma_admin_with_nats_url_uses_the_admin_user_from_the_environment(api: OmaApi):
    access = natsauth.read_admin_file(api.data_dir)
    argv = ["oma-admin", "-nats-url", access.url, "contexts", "rebuild"]
    env = {**clean_env(api.data_dir.parent), "OMA_NATS_USER": "admin"}
    r = subprocess.run(argv, env={**env, "OMA_NATS_PASSWORD": access.password}, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and json.loads(r.stdout)["success"] is True, r.stderr
    started = time.monotonic()
    r = subprocess.run(argv, env={**env, "OMA_NATS_PASSWORD": "nwrong"}, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "refused the credentials" in r.stderr, r.stderr
    assert time.monotonic() - started < 8, "a refused password is not retried until the timeout"


def test_oma_admin_without_a_running_appliance_says_so(tmp_path: Path):
    r = subprocess.run(["oma-admin", "contexts", "rebuild"], env=clean_env(tmp_path),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "no running oma-api" in r.stderr and "nats-admin.json" in r.stderr, r.stderr


def test_stop_removes_the_admin_file_and_no_password_is_logged(tmp_path: Path):
    server = OmaApi(tmp_path / "data")
    try:
        server.wait_healthy()
        access = natsauth.read_admin_file(server.data_dir)
        assert access is not None
    finally:
        server.stop()
    assert server.proc.returncode in (0, -signal.SIGTERM)
    assert not natsauth.admin_file(server.data_dir).exists()
    assert access.password not in server.log.read_text()
    # The nats-server configuration on disk names the passwords, never holds them.
    assert not any(access.password in p.read_text(errors="replace")
                   for p in tmp_path.rglob("*") if p.is_file() and p.stat().st_size < 1_000_000)


def test_oma_admin_help_shows_its_commands_and_only_their_flags():
    r = subprocess.run(["oma-admin", "--help"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    for text in ("appliance add NAME [TOKEN]", "appliance list", "appliance revoke NAME", "contexts rebuild",
                 "-db-type", "-data-dir", "-nats-url"):
        assert text in r.stdout, text
    for flag in ("-port", "-auth-enabled", "-metrics-port", "-host", "-debug"):
        assert not re.search(rf"(?<![\w-]){flag}\b", r.stdout), flag
    assert "words" not in r.stdout
    r = subprocess.run(["oma-admin", "appliance", "--help"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and all(a in r.stdout for a in ("add", "list", "revoke")), r.stdout


# --- each generated user, against the appliance in this process --------------------------------
@pytest.fixture(scope="module")
async def appliance(tmp_path_factory) -> AsyncIterator[Appliance]:
    from oma.shared.settings import Settings
    from tests.conftest import SEED_TOKEN
    settings = Settings(nats_url="", data_dir=tmp_path_factory.mktemp("appliance"), nbd_port=free_port(),
                        appliance_tokens=f"test-vma={SEED_TOKEN}", startup_timeout=20)
    async with Appliance(settings) as a:
        yield a


class Client:
    """A connection as one of the appliance's users, recording what the server refused."""

    def __init__(self, appliance: Appliance, user: str):
        self.appliance, self.user = appliance, user
        self.errors: list[str] = []
        self.nc: Any = None

    async def __aenter__(self) -> "Client":
        async def on_error(exc: Exception) -> None:
            self.errors.append(str(exc))
        user, password = self.appliance.nats_credentials(self.user)
        self.nc = await nats.connect(self.appliance.nats_url, user=user, password=password, error_cb=on_error,
                                     inbox_prefix=f"_INBOX_{user}", allow_reconnect=False)
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.nc.close()

    async def violation(self, subject: str) -> None:
        for _ in range(100):
            if any("permissions violation" in e.lower() and subject.lower() in e.lower() for e in self.errors):
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"no permissions violation for {self.user} on {subject}: {self.errors}")


async def request(client: Client, subject: str, payload: Any = None) -> Any:
    return await client.nc.request(subject, json.dumps(payload or {}).encode(), timeout=0.5)


async def test_inventory_cannot_fetch_credentials(appliance: Appliance):
    async with Client(appliance, "inventory") as c:
        with pytest.raises(NatsError):  # no answer: the server dropped the request
            await request(c, Config.CREDENTIALS, {"id": 1})
        await c.violation(Config.CREDENTIALS)


@pytest.mark.parametrize("user", [u for u in SERVICE_USERS if u not in ("replication", "failover")])
async def test_only_the_cloud_services_reach_credentials(appliance: Appliance, user: str):
    """replication (volumes) and failover (VMs, snapshots) act in the cloud; nobody else may."""
    async with Client(appliance, user) as c:
        with pytest.raises(NatsError):
            await request(c, Config.CREDENTIALS, {"id": 1})
        await c.violation(Config.CREDENTIALS)


async def test_allowed_calls_are_answered(appliance: Appliance):
    for user in ("replication", "failover"):
        async with Client(appliance, user) as c:
            msg = await request(c, Config.CREDENTIALS, {"id": 999})  # an error reply is an answer
            assert (msg.headers or {}).get("Nats-Service-Error-Code") == "404"
    async with Client(appliance, "gateway") as c:
        assert json.loads((await request(c, health("config"))).data)["status"] == "up"
        await request(c, Config.ACTION, {"action": "list"})


@pytest.mark.parametrize("user", SERVICE_USERS)
async def test_no_client_listens_to_everything(appliance: Appliance, user: str):
    async with Client(appliance, user) as c:
        await c.nc.subscribe(">")
        await c.nc.flush()
        await c.violation(">")


@pytest.mark.parametrize("user", SERVICE_USERS)
async def test_no_service_user_can_purge_or_delete_the_stream(appliance: Appliance, user: str):
    async with Client(appliance, user) as c:
        js = c.nc.jetstream(timeout=0.5)
        with pytest.raises(NatsError):
            await js.purge_stream(EVENTS_STREAM)
        await c.violation(f"$JS.API.STREAM.PURGE.{EVENTS_STREAM}")
        with pytest.raises(NatsError):
            await js.delete_stream(EVENTS_STREAM)
        await c.violation(f"$JS.API.STREAM.DELETE.{EVENTS_STREAM}")
        if user != "context_aggregator":  # the stream's only reader
            with pytest.raises(NatsError):
                await js.delete_consumer(EVENTS_STREAM, appliance.settings.contexts_consumer)


async def test_admin_purges_the_stream_and_rebuilds(appliance: Appliance):
    async with Client(appliance, "auth") as c:  # auth publishes its own events to the stream
        await c.nc.jetstream().publish("oma.evt.auth.test.probed", b"{}")
    async with Client(appliance, natsauth.ADMIN) as c:
        js = c.nc.jetstream()
        assert (await js.stream_info(EVENTS_STREAM)).state.messages >= 1
        assert await js.purge_stream(EVENTS_STREAM)
        assert (await js.stream_info(EVENTS_STREAM)).state.messages == 0
        # The read model's consumer survives (context_aggregator created it with its own user).
        assert (await js.consumer_info(EVENTS_STREAM, appliance.settings.contexts_consumer)).name
        body = json.loads((await c.nc.request(Contexts.REBUILD, b"{}", timeout=30)).data)
        assert body["success"] is True, body
