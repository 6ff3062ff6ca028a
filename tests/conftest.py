"""Shared fixtures: a real nats-server, real MariaDB databases, the appliance in-process.

No test may skip: a missing component (MariaDB, NATS, nbd-server, nbdkit, vcsim) must fail the run.
"""
from __future__ import annotations

import asyncio
import contextlib
import uuid
from pathlib import Path
from typing import Any, AsyncIterator

import httpx
import pytest

from oma.shared.natsserver import EmbeddedNats, free_port  # noqa: F401  (tests import free_port from here)
from oma.shared.settings import SERVICES, Settings
from tests.natsaudit import Audit
from tests.mariadbutil import MARIADB, mariadb_exec, mariadb_settings  # noqa: F401  (tests import them from here)

SEED_TOKEN = "vma_test_token_abc123def456789012345678"


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = len(reporter.stats.get("skipped", [])) if reporter else 0
    if skipped:
        reporter.write_line(f"FAILED: {skipped} test(s) skipped; every component must be present", red=True)
        session.exitstatus = 1


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "nats_forbidden: the test makes forbidden publishes on purpose "
                            "(not checked against shared/natsauth.py)")


@pytest.fixture(scope="session")
def _nats_audit():
    audit = Audit()
    audit.install()
    yield audit
    audit.uninstall()


@pytest.fixture(autouse=True)
def nats_permissions(request: pytest.FixtureRequest, _nats_audit: Audit):
    """What the services and the gateway published in this test, each allowed to its NATS user."""
    _nats_audit.take()
    yield
    found = _nats_audit.take()
    if found and request.node.get_closest_marker("nats_forbidden") is None:
        raise AssertionError("publishes that shared/natsauth.py does not allow (the secured appliance "
                             "would refuse them):\n  " + "\n  ".join(found))


@pytest.fixture(scope="session")
async def nats_url() -> AsyncIterator[str]:
    server = EmbeddedNats()
    yield await server.start()
    await server.stop()


@pytest.fixture
async def mariadb_name() -> AsyncIterator[str]:
    """A fresh MariaDB database on the machine's server, dropped afterwards."""
    name = f"oma_test_{uuid.uuid4().hex[:10]}"
    await mariadb_exec(f"CREATE DATABASE `{name}`")
    yield name
    await mariadb_exec(f"DROP DATABASE IF EXISTS `{name}`")


@pytest.fixture
def make_settings(tmp_path: Path, nats_url: str):
    def make(**overrides: Any) -> Settings:
        base: dict[str, Any] = dict(nats_url=nats_url, data_dir=tmp_path / "data", nbd_port=free_port(),
                                    appliance_tokens=f"test-vma={SEED_TOKEN}", startup_timeout=20,
                                    # The session's stream holds every earlier test's events: a read model
                                    # started here wants this test's events, not a replay of all of them.
                                    contexts_deliver_policy="new")
        base.update(overrides)
        return Settings(**base)
    return make


@contextlib.asynccontextmanager
async def running(settings: Settings, services: tuple[str, ...] = SERVICES):
    """The named services and the gateway, in this process; yields an httpx client on the gateway."""
    from oma.services.gateway.app import create_app
    from oma.runner import Appliance

    async with Appliance(settings, services) as appliance:
        app = create_app(settings, appliance.nats_url)
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://oma") as client:
                client.appliance = appliance  # type: ignore[attr-defined]
                client.app = app  # type: ignore[attr-defined]
                yield client


async def login(client: httpx.AsyncClient, appliance_id: str = "test-vma", token: str = SEED_TOKEN) -> dict[str, str]:
    r = await client.post("/api/v1/auth/login", json={"appliance_id": appliance_id, "token": token,
                                                     "version": "1.0.0"})
    assert r.status_code == 200, r.text
    return {"Authorization": f"Bearer {r.json()['session_token']}"}


def assert_error_shape(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert body["success"] is False and isinstance(body["error"], str) and "details" in body, body
    return body


async def wait_for(predicate, timeout: float = 10.0, interval: float = 0.05):
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        result = await predicate()
        if result:
            return result
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(interval)
