"""Running services: all in one process (`oma-api`) or one alone (`oma-service NAME`)."""
from __future__ import annotations

import asyncio
import importlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any, AsyncIterator, Awaitable, Callable

from oma.shared import bus as busmod
from oma.shared import natsauth
from oma.gateway_worker import WORKER_FDS, serve_gateway
from oma.shared.natsserver import EmbeddedNats, _die_with_parent
from oma.shared.plugins import get_plugin_manager
from oma.shared.service import ServiceApp
from oma.shared.settings import SERVICES, Settings

log = logging.getLogger("oma.runner")

SERVICE_CLASSES = {
    "auth": "oma.services.auth.app:AuthService",
    "config": "oma.services.config.app:ConfigService",
    "inventory": "oma.services.inventory.app:InventoryService",
    "replication": "oma.services.replication.app:ReplicationService",
    "export_manager": "oma.services.export_manager.app:ExportManagerService",
    "context_aggregator": "oma.services.context_aggregator.app:ContextAggregatorService",
    "failover": "oma.services.failover.app:FailoverService",
    "scheduler": "oma.services.scheduler.app:SchedulerService",
}


def service_class(name: str) -> type[ServiceApp]:
    module, _, attr = SERVICE_CLASSES[name].partition(":")
    return getattr(importlib.import_module(module), attr)


class Appliance:
    """Starts NATS (embedded when no URL is set) and the named services; stops them in reverse,
    each draining its in-flight requests first."""

    def __init__(self, settings: Settings, services: tuple[str, ...] = SERVICES,
                 on_bus: Callable[["Appliance"], None] | None = None):
        self.settings = settings
        self.on_bus = on_bus  # called once NATS is up, before the services start
        self.names = services
        self.services: dict[str, ServiceApp] = {}
        self.nats_url = settings.nats_url
        # user -> password of the embedded server's users (generated on each start); None with an
        # external NATS, whose user and password come from the settings.
        self.nats_passwords: dict[str, str] | None = None
        self._stack = AsyncExitStack()

    def nats_credentials(self, client: str) -> tuple[str, str]:
        """The NATS user and password a client (a service, the gateway) connects with."""
        if self.nats_passwords is not None:
            return client, self.nats_passwords[client]
        return self.settings.nats_user, self.settings.nats_password

    def client_settings(self, client: str) -> Settings:
        """The settings with this client's NATS user (for code that reads them, the gateway)."""
        user, password = self.nats_credentials(client)
        return self.settings.model_copy(update={"nats_user": user, "nats_password": password})

    async def __aenter__(self) -> "Appliance":
        try:
            await self._start()
        except BaseException:
            await self._stack.aclose()
            raise
        return self

    async def _start(self) -> None:
        s = self.settings
        if not self.nats_url:
            await self._start_embedded_nats()
        if self.on_bus is not None:
            self.on_bus(self)
        pm = get_plugin_manager()

        async def start_one(name: str) -> None:
            user, password = self.nats_credentials(name)
            nc = await busmod.connect(self.nats_url, name, user=user, password=password,
                                      timeout=s.startup_timeout)
            app = service_class(name)(s, nc, pm)
            self._stack.push_async_callback(nc.drain)
            self._stack.push_async_callback(app.stop)
            await app.start()
            self.services[name] = app

        # Sequential registration of cleanups, concurrent start-up.
        await asyncio.gather(*(start_one(n) for n in self.names))

    async def _start_embedded_nats(self) -> None:
        """Always secured: a user per client with a fresh password (shared/natsauth.py). oma-admin
        finds the URL and its own password in the data dir's nats-admin.json while we run."""
        s = self.settings
        store = s.data_dir / "nats" if s.db_type != "memory" else None
        self.nats_passwords = natsauth.generate_passwords()
        nats = EmbeddedNats(store_dir=store, passwords=self.nats_passwords)
        self.nats_url = await nats.start()
        self._stack.push_async_callback(nats.stop)
        natsauth.write_admin_file(s.data_dir, self.nats_url, self.nats_passwords[natsauth.ADMIN])
        self._stack.callback(natsauth.remove_admin_file, s.data_dir, self.nats_url)

    async def __aexit__(self, *exc: Any) -> None:
        await self._stack.aclose()


def install_stop_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)


def process_count(settings: Settings) -> int:
    """`auto`: the services and one gateway worker apart as soon as there are two cores to use."""
    if settings.processes == "auto":
        return 2 if (os.cpu_count() or 1) >= 2 else 1
    return int(settings.processes)


Started = Callable[["Appliance"], Awaitable[None]]


@asynccontextmanager
async def _running_hook(started: Started | None, appliance: Appliance) -> AsyncIterator[None]:
    """`started(appliance)` runs beside the gateway once the services are up (the demo seeds its
    data so); it is cancelled at stop if still running."""
    task = asyncio.ensure_future(started(appliance)) if started else None
    try:
        yield
    finally:
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


async def run_all(settings: Settings, started: Started | None = None) -> None:
    # uvicorn handles SIGTERM/SIGINT while it serves and re-raises the signal when it returns: our
    # handler then receives it, instead of the default one killing us before the services drain.
    stop = asyncio.Event()
    install_stop_signals(stop)
    workers = process_count(settings) - 1
    if workers:
        await run_with_workers(settings, workers, stop, started)
        return
    async with Appliance(settings) as appliance, _running_hook(started, appliance):
        log.info("services started", extra={"nats": appliance.nats_url, "services": list(appliance.services)})
        # returns on SIGTERM/SIGINT, also one received while the services started
        await serve_gateway(appliance.client_settings("gateway"), appliance.nats_url, stop=stop)
    log.info("stopped")


# --- oma-api on several processes ------------------------------------------------------------
# The parent runs the embedded NATS and the services; the gateway runs in worker processes that
# share one listening socket bound by the parent. They talk only over NATS, as in a split install.


def listen_socket(settings: Settings) -> socket.socket:
    """Bound before anything starts: a busy port fails at once, as with one process."""
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((settings.host, settings.port))
    except OSError as exc:
        sock.close()
        raise SystemExit(f"oma-api: cannot listen on {settings.host}:{settings.port}: {exc.strerror}") from None
    sock.listen(2048)
    # Not inheritable: Popen's pass_fds hands it to the workers only. Made inheritable, every child
    # spawned under uvloop (which closes only close-on-exec descriptors) kept it: nbdkit, a daemon
    # that outlives a killed appliance, then held the API's port.
    return sock


class GatewayWorkers:
    """Gateway processes under this one. Their settings, NATS password included, go through a pipe
    read once at start: never a command line (ps shows it) nor the environment (/proc/PID/environ).
    They get SIGTERM when we die, even by SIGKILL (PR_SET_PDEATHSIG, as the embedded nats-server)."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.procs: list[subprocess.Popen] = []

    def start(self, count: int, settings: Settings, nats_url: str, metrics_url: str) -> None:
        conf = json.dumps({"settings": settings.model_dump(mode="json"), "nats_url": nats_url,
                           "metrics": metrics_url, "parent": os.getpid()}).encode()
        for _ in range(count):
            r, w = os.pipe()
            try:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "oma.gateway_worker"],
                    env={**os.environ, WORKER_FDS: f"{self.sock.fileno()},{r}"},
                    pass_fds=(self.sock.fileno(), r), preexec_fn=_die_with_parent, stdin=subprocess.DEVNULL)
            finally:
                os.close(r)
            with os.fdopen(w, "wb") as pipe:
                pipe.write(conf)  # far below a pipe's buffer: never blocks
            self.procs.append(proc)
        log.info("gateway workers started", extra={"pids": [p.pid for p in self.procs]})

    async def wait_any(self, every: float = 0.5) -> subprocess.Popen:
        """Returns the first worker that exits (polled: no thread per worker)."""
        while True:
            for p in self.procs:
                if p.poll() is not None:
                    return p
            await asyncio.sleep(every)

    async def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM, then wait: each worker drains its requests (uvicorn's graceful shutdown)."""
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                await asyncio.to_thread(p.wait, timeout)
            except subprocess.TimeoutExpired:
                log.warning("gateway worker did not stop in time: killed", extra={"pid": p.pid})
                p.kill()
                await asyncio.to_thread(p.wait)


async def run_with_workers(settings: Settings, workers: int, stop: asyncio.Event,
                           started: Started | None = None) -> None:
    from prometheus_client import start_http_server

    sock = listen_socket(settings)
    gateways = GatewayWorkers(sock)
    # The services' metrics, for the workers' /metrics to include (loopback only).
    metrics_server, _ = start_http_server(0, addr="127.0.0.1")
    metrics_url = f"http://127.0.0.1:{metrics_server.server_address[1]}/metrics"

    def start_gateways(appliance: Appliance) -> None:
        # As soon as the bus is up: the workers import and connect while the services start.
        appliance._stack.push_async_callback(gateways.stop)  # on a failed start too
        gateways.start(workers, appliance.client_settings("gateway"), appliance.nats_url, metrics_url)

    try:
        async with Appliance(settings, on_bus=start_gateways) as appliance, _running_hook(started, appliance):
            log.info("services started", extra={"nats": appliance.nats_url, "services": list(appliance.services),
                                                "gateway_workers": workers})
            stopped = asyncio.ensure_future(stop.wait())
            died = asyncio.ensure_future(gateways.wait_any())
            await asyncio.wait([stopped, died], return_when=asyncio.FIRST_COMPLETED)
            stopped.cancel()
            died.cancel()
            if not stop.is_set():
                proc = died.result()
                log.error("gateway worker exited: stopping", extra={"pid": proc.pid, "code": proc.returncode})
            await gateways.stop()  # no new requests before the services drain theirs
    finally:
        sock.close()
        metrics_server.shutdown()
    log.info("stopped")
    if not stop.is_set():
        raise SystemExit(1)


async def run_one(settings: Settings, name: str) -> None:
    from prometheus_client import start_http_server

    stop = asyncio.Event()
    install_stop_signals(stop)
    if name == "gateway":
        await serve_gateway(settings, settings.nats_url)
        return
    if not settings.nats_url:
        raise SystemExit("oma-service: -nats-url (OMA_NATS_URL) is required to run one service alone")
    from oma.shared.settings import METRICS_PORTS
    port = settings.metrics_port if settings.metrics_port is not None else METRICS_PORTS[name]
    if port:
        start_http_server(port, addr=settings.host)
    async with Appliance(settings, (name,)):
        log.info("service running", extra={"service": name, "metrics_port": port})
        await stop.wait()
