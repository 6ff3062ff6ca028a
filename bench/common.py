"""What the benchmark scripts share: start `oma-api` as a process and wait until it is healthy, or
run the appliance in-process against the CloudStack simulator."""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from oma.shared.natsserver import free_port  # noqa: E402
from tests.procutil import descendants  # noqa: E402

TOKEN = "vma_test_token_abc123def456789012345678"


def oma_command(entry: str) -> list[str]:
    """`oma-api`/`oma-service` of this checkout: the installed scripts import the editable install's
    (the main checkout's) code wherever they are run from. Run with cwd=ROOT."""
    return [sys.executable, "-c", f"from oma.cli import {entry}; {entry}()"]
SIM_KEY, SIM_SECRET = "bench-key", "bench-secret"


def start_oma_api(*flags: str, env: dict[str, str] | None = None, timeout: float = 60.0,
                  stderr: Any = subprocess.DEVNULL) -> tuple[subprocess.Popen, str, float]:
    """`oma-api -port <free> -host 127.0.0.1 FLAGS` with a fresh data dir and the seed's appliance
    token; returns the process, its base URL and the seconds it took to answer /health with 200.
    `stderr` (a file) keeps its log."""
    port = free_port()
    full_env = {**os.environ, "OMA_DATA_DIR": tempfile.mkdtemp(prefix="oma-bench-"),
                "OMA_NBD_PORT": str(free_port()), "OMA_APPLIANCE_TOKENS": f"test-vma={TOKEN}", **(env or {})}
    started = time.perf_counter()
    proc = subprocess.Popen([*oma_command("oma_api"), "-port", str(port), "-host", "127.0.0.1", *flags],
                            env=full_env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=stderr)
    base = f"http://127.0.0.1:{port}"
    wait_healthy([proc], base, timeout)
    return proc, base, time.perf_counter() - started


def wait_healthy(procs: list[subprocess.Popen], base: str, timeout: float, path: str = "/health") -> None:
    """Until `base + path` answers 200; SystemExit when a process exits or the time is up."""
    started = time.perf_counter()
    while time.perf_counter() - started < timeout:
        try:
            if httpx.get(f"{base}{path}", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        for proc in procs:
            if proc.poll() is not None:
                raise SystemExit(f"{proc.args[0]} exited with {proc.returncode}")
        time.sleep(0.02)
    for proc in procs:
        proc.kill()
    raise SystemExit(f"{base} did not become healthy")


def process_tree(pids: list[int]) -> list[int]:
    """The pids and all their live descendants."""
    return [q for p in pids for q in (p, *descendants(p))]


async def nbdcopy_seconds(copies: list[tuple[str, str]]) -> float:
    """The baseline: `nbdcopy --flush SOURCE URI` of every (source, uri) pair at once, in seconds."""
    t0 = time.monotonic()
    procs = [await asyncio.create_subprocess_exec("nbdcopy", "--flush", src, uri) for src, uri in copies]
    assert [await p.wait() for p in procs] == [0] * len(procs)
    return time.monotonic() - t0


def sim_arguments(doc: str) -> argparse.ArgumentParser:
    """The command line of a benchmark against the CloudStack simulator: --job-latency, --rounds."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--job-latency", type=float, default=0.3)
    p.add_argument("--rounds", type=int, default=3)
    return p


def run_in_scratch(main: Callable[[argparse.Namespace, Path], Awaitable[None]], args: argparse.Namespace,
                   prefix: str) -> None:
    """asyncio.run(main(args, work)) in a scratch folder under args.dir, removed afterwards."""
    work = Path(tempfile.mkdtemp(prefix=prefix, dir=args.dir))
    try:
        asyncio.run(main(args, work))
    finally:
        shutil.rmtree(work, ignore_errors=True)


@asynccontextmanager
async def appliance_on_sim(services: tuple[str, ...], job_latency: float, **settings: Any,
                           ) -> AsyncIterator[tuple[httpx.AsyncClient, str]]:
    """The in-process CloudStack simulator (jobs of `job_latency` s, account limits raised), a fresh
    nats-server, `services` in-process with an nbdkit exporter, and the gateway over ASGI: yields
    a client of the gateway and the simulator's API URL. `settings` add to the Settings."""
    logging.basicConfig(level=logging.WARNING)
    from oma.plugins.ossea.simulator import CloudStackSimulator
    from oma.services.gateway.app import create_app
    from oma.shared.natsserver import EmbeddedNats
    from oma.runner import Appliance
    from oma.shared.settings import Settings

    with tempfile.TemporaryDirectory(prefix="oma-bench-") as tmp:
        dev = Path(tmp) / "dev"
        dev.mkdir()
        nats = EmbeddedNats()
        sim = CloudStackSimulator(SIM_KEY, SIM_SECRET, device_dir=dev, job_latency=job_latency,
                                  max_volumes=10_000, max_primary_gb=10_000_000)
        url = await sim.start()
        config = Settings(nats_url=await nats.start(), data_dir=Path(tmp) / "data",
                          appliance_tokens=f"bench={TOKEN}", export_backend="nbdkit", nbd_port=free_port(),
                          device_by_id_dir=dev, provision_wait=300, cloud_timeout=10, cloud_job_timeout=60,
                          **settings)
        try:
            async with Appliance(config, services) as appliance:
                app = create_app(config, appliance.nats_url)
                async with app.router.lifespan_context(app), httpx.AsyncClient(
                        transport=httpx.ASGITransport(app=app), base_url="http://oma", timeout=600) as c:
                    yield c, url
        finally:
            await sim.stop()
            await nats.stop()


async def sign_in_with_cloud(c: httpx.AsyncClient, url: str) -> tuple[dict[str, str], int]:
    """Log in as the `bench` appliance and add the simulator at `url` as the cloud configuration:
    the auth headers and the configuration's id."""
    from oma.plugins.ossea.simulator import DEFAULT_VM_ID

    r = await c.post("/api/v1/auth/login", json={"appliance_id": "bench", "token": TOKEN})
    h = {"Authorization": f"Bearer {r.json()['session_token']}"}
    r = await c.post("/api/v1/ossea/config", headers=h, json={"action": "create", "configuration": {
        "name": "sim", "api_url": url, "api_key": SIM_KEY, "secret_key": SIM_SECRET,
        "zone": "OSSEA-Zone", "oma_vm_id": DEFAULT_VM_ID}})
    return h, r.json()["configuration"]["id"]
