"""`oma-api -demo`: the whole appliance plus the project's CloudStack and VMA simulators, in this
process tree, on loopback, with everything a first migration needs already in place (docs/demo.md).

- a synthetic vCenter of a dozen VMs behind the VMA simulator (plugins/vma/synthetic.py), its disks
  small sparse files (1 MiB per GiB of the VM's disk), so that a sync takes seconds;
- the CloudStack simulator attaching volumes under DATA_DIR/dev, which is the appliance's by-id
  directory (the two must match, docs/cloudstack-simulator.md);
- the VMA registered with its API URL, an OSSEA configuration, the vCenter (reached through the VMA),
  network mappings for failover, the inventory discovered, and an operator account `demo` whose
  password is printed once with the URL.

Everything lives in the data directory (a temporary one, removed at exit, unless -data-dir is
given; temporary files go there too) and listens on 127.0.0.1. SIGTERM or Ctrl-C stops it all.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import sys
import tempfile
import time
from contextlib import AsyncExitStack
from fractions import Fraction
from pathlib import Path
from typing import Any

import aiohttp

from oma.shared.errors import OmaError
from oma.shared.settings import FlagError, Settings

log = logging.getLogger("oma.demo")

VMA_ID = "demo-vma"
OPERATOR = "demo"
DISK_SCALE = Fraction(1, 1024)   # a 40 GiB vCenter disk is a 40 MiB sparse file
JOB_LATENCY = 0.1                # seconds a simulated CloudStack job runs
LARGE_OFFERING = {"id": "5e000000-0000-4000-8000-000000000003", "name": "Large Instance", "cpunumber": 4,
                  "cpuspeed": 2000, "memory": 8192, "iscustomized": False, "storagetype": "shared"}


def changed(settings: Settings, **changes: Any) -> Settings:
    """The settings with some fields changed, validated again: a plugin section's field is given by
    its flat name (`nbd_port`), as to `Settings(...)`."""
    return type(settings)(**{**settings.model_dump(), **changes})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Demo:
    """The simulators and the seed data of one demo run."""

    def __init__(self, settings: Settings, data_dir: Path):
        from oma.plugins.ossea.simulator import CloudStackSimulator
        from oma.plugins.vma.simulator import VmaSimulator
        from oma.plugins.vma.synthetic import SyntheticInventory
        from oma.services.auth.service import new_appliance_token

        self.data_dir, self.started = data_dir, time.monotonic()
        self.api_key, self.secret_key = "demo-api-key", secrets.token_urlsafe(24)
        self.vma_token, self.password = new_appliance_token(), secrets.token_urlsafe(12)
        self.inventory = SyntheticInventory(password=secrets.token_urlsafe(16))
        self.cloud = CloudStackSimulator(self.api_key, self.secret_key, device_dir=data_dir / "dev",
                                         job_latency=JOB_LATENCY, max_volumes=1000, max_primary_gb=1 << 20)
        self.cloud.lab.service_offerings[LARGE_OFFERING["id"]] = dict(LARGE_OFFERING)
        self.vma = VmaSimulator(data_dir / "vma", disk_scale=DISK_SCALE, inventory=self.inventory,
                                appliance_id=VMA_ID, appliance_token=self.vma_token)
        self.url = f"http://127.0.0.1:{settings.port}"
        self.settings = settings

    async def start(self, stack: AsyncExitStack) -> Settings:
        """Start the simulators; the appliance's settings to run with them."""
        (self.data_dir / "dev").mkdir(exist_ok=True)
        self.cloud_url = await self.cloud.start("127.0.0.1", 0)
        stack.push_async_callback(self.cloud.stop)
        self.vma_url = await self.vma.start("127.0.0.1", 0)
        stack.push_async_callback(self.vma.stop)
        return changed(self.settings, data_dir=self.data_dir, device_by_id_dir=self.data_dir / "dev",
                       nbd_port=free_port(), nbd_listen_addr="127.0.0.1", oma_url=self.url,
                       demo_vma_url=self.vma_url, vma_poll_interval=min(self.settings.vma_poll_interval, 0.5),
                       cloud_poll_interval=min(self.settings.cloud_poll_interval, 0.2))

    # -- seeding, once the services are up ------------------------------------------------------

    async def seed(self, appliance: Any) -> None:
        """Accounts in the auth service's database (in memory, so only from this process), the rest
        through the API as an operator would; then the URL and password, once."""
        from oma.services.auth import operators, service

        auth = appliance.services["auth"]
        async with auth.sessions.begin() as db:
            await service.upsert_appliance(db, auth.keys, VMA_ID, self.vma_token, self.vma_url)
            await operators.add_operator(db, OPERATOR, self.password, "operator")
        async with aiohttp.ClientSession(self.url, timeout=aiohttp.ClientTimeout(total=60)) as http:
            await self._wait_for_gateway(http)
            login = await _call(http, "POST", "/api/v1/auth/login", {"appliance_id": VMA_ID, "token": self.vma_token})
            http.headers["Authorization"] = f"Bearer {login['session_token']}"
            await self._configure(http)
        self._write_state()
        print(f"\nOMA demo ready in {time.monotonic() - self.started:.1f} s: {self.url}/ui/\n"
              f"  user: {OPERATOR}\n  password: {self.password}\n"
              f"  (shown once; simulated vCenter, VMA and CloudStack; data in {self.data_dir}; Ctrl-C stops it)\n",
              flush=True)

    async def _wait_for_gateway(self, http: aiohttp.ClientSession) -> None:
        deadline = time.monotonic() + self.settings.startup_timeout
        while True:
            try:
                async with http.get("/health") as r:
                    await r.read()
                    return
            except aiohttp.ClientError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.05)

    async def _configure(self, http: aiohttp.ClientSession) -> None:
        from oma.plugins.vma.synthetic import NETWORKS

        inv = self.inventory
        await _call(http, "POST", "/api/v1/ossea/config", {"action": "create", "configuration": {
            "name": "demo-cloud", "api_url": self.cloud_url, "api_key": self.api_key,
            "secret_key": self.secret_key, "zone": "OSSEA-Zone", "oma_vm_id": self.cloud.oma_vm_id}})
        await _call(http, "POST", "/api/v1/vcenter/config", {"action": "create", "configuration": {
            "name": "demo-vcenter", "host": inv.host, "port": 443, "username": inv.username,
            "password": inv.password, "verify_tls": False, "appliance_id": VMA_ID}})
        for i, network in enumerate(NETWORKS):  # one production and one test network per source network
            prod = self.cloud.lab.add_network(f"demo-prod-{i + 1}", f"10.{20 + i}.0.0/24")
            test = self.cloud.lab.add_network(f"demo-test-{i + 1}", f"10.{120 + i}.0.0/24")
            await _call(http, "POST", "/api/v1/network/mappings", {"action": "create", "mapping": {
                "source_network": network, "production_network_id": prod["id"], "test_network_id": test["id"]}})
        await _call(http, "GET", f"/api/v1/vms/discover?vcenter={inv.host}")

    def _write_state(self) -> None:
        """For scripts and tests (0600): where the simulators are, the cloud's keys, and the VMA's
        appliance token, which logs in to the API (`POST /api/v1/auth/login`)."""
        path = self.data_dir / "demo.json"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"url": self.url, "vma_url": self.vma_url, "appliance_id": VMA_ID, "token": self.vma_token,
                       "cloudstack": {"url": self.cloud_url, "api_key": self.api_key, "secret_key": self.secret_key},
                       "vcenter": {"host": self.inventory.host, "username": self.inventory.username}}, f)


async def _call(http: aiohttp.ClientSession, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    async with http.request(method, path, json=body) as r:
        answer = await r.json(content_type=None)
        if r.status >= 300:
            raise OmaError(f"demo set-up: {method} {path} answered {r.status}",
                           answer.get("details") or answer.get("error"), status=502)
        return answer


def demo_settings(settings: Settings) -> tuple[Settings, Path | None]:
    """The settings a demo runs with, and the temporary data directory to remove at exit (None
    when -data-dir was given)."""
    if settings.db_type != "memory":
        raise FlagError("oma-api: -demo runs on the memory database only (it keeps nothing outside its data dir)")
    given = settings.model_fields_set
    temp = None if "data_dir" in given else Path(tempfile.mkdtemp(prefix="oma-demo-"))
    data_dir = temp or settings.data_dir
    (data_dir / "tmp").mkdir(parents=True, exist_ok=True)
    update: dict[str, Any] = {"data_dir": data_dir}
    if "host" not in given:
        update["host"] = "127.0.0.1"
    if "processes" not in given:  # a gateway worker apart costs ~2 CPU seconds of imports at start
        update["processes"] = "1"
    return changed(settings, **update), temp


async def run_demo(settings: Settings) -> None:
    from oma.runner import run_all

    settings, temp = demo_settings(settings)
    # Temporary files (the embedded NATS's stream, the simulators' scratch) inside the data dir too.
    os.environ["TMPDIR"] = tempfile.tempdir = str(settings.data_dir / "tmp")
    if not settings.debug:  # the printed URL and password, not a page of start-up logs
        logging.getLogger().setLevel(logging.WARNING)
    failed: list[BaseException] = []
    try:
        async with AsyncExitStack() as stack:
            demo = Demo(settings, settings.data_dir)
            settings = await demo.start(stack)

            async def seed(appliance: Any) -> None:
                try:
                    await demo.seed(appliance)
                except Exception as exc:  # noqa: BLE001 - stop the whole demo, one clear line
                    failed.append(exc)
                    detail = f"{exc.error}: {exc.details}" if isinstance(exc, OmaError) else repr(exc)
                    print(f"oma-api: the demo could not set itself up: {detail}", file=sys.stderr, flush=True)
                    os.kill(os.getpid(), signal.SIGTERM)  # the same way out as SIGTERM: everything drains

            await run_all(settings, started=seed)
    finally:
        if temp is not None:
            shutil.rmtree(temp, ignore_errors=True)
    if failed:
        raise SystemExit(1)
