"""Running services: all in one process (`oma-api`) or one alone (`oma-service NAME`)."""
from __future__ import annotations

import asyncio
import importlib
import logging
import signal
from contextlib import AsyncExitStack
from typing import Any

from shared import bus as busmod
from shared import natsauth
from shared.natsserver import EmbeddedNats
from shared.plugins import get_plugin_manager
from shared.service import ServiceApp
from shared.settings import SERVICES, Settings

log = logging.getLogger("oma.runner")

SERVICE_CLASSES = {
    "auth": "services.auth.app:AuthService",
    "config": "services.config.app:ConfigService",
    "inventory": "services.inventory.app:InventoryService",
    "replication": "services.replication.app:ReplicationService",
    "export_manager": "services.export_manager.app:ExportManagerService",
    "context_aggregator": "services.context_aggregator.app:ContextAggregatorService",
    "failover": "services.failover.app:FailoverService",
}


def service_class(name: str) -> type[ServiceApp]:
    module, _, attr = SERVICE_CLASSES[name].partition(":")
    return getattr(importlib.import_module(module), attr)


class Appliance:
    """Starts NATS (embedded when no URL is set) and the named services; stops them in reverse,
    each draining its in-flight requests first."""

    def __init__(self, settings: Settings, services: tuple[str, ...] = SERVICES):
        self.settings = settings
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


async def serve_gateway(settings: Settings, nats_url: str) -> None:
    import uvicorn

    from services.gateway.app import create_app

    config = uvicorn.Config(create_app(settings, nats_url), host=settings.host, port=settings.port,
                            log_config=None, access_log=False, lifespan="on", timeout_graceful_shutdown=10)
    server = uvicorn.Server(config)
    await server.serve()
    if not server.started:
        raise SystemExit(f"gateway could not listen on {settings.host}:{settings.port}")


async def run_all(settings: Settings) -> None:
    # uvicorn handles SIGTERM/SIGINT while it serves and re-raises the signal when it returns: our
    # handler then receives it, instead of the default one killing us before the services drain.
    stop = asyncio.Event()
    install_stop_signals(stop)
    async with Appliance(settings) as appliance:
        log.info("services started", extra={"nats": appliance.nats_url, "services": list(appliance.services)})
        # returns on SIGTERM/SIGINT
        await serve_gateway(appliance.client_settings("gateway"), appliance.nats_url)
    log.info("stopped")


async def run_one(settings: Settings, name: str) -> None:
    from prometheus_client import start_http_server

    stop = asyncio.Event()
    install_stop_signals(stop)
    if name == "gateway":
        await serve_gateway(settings, settings.nats_url)
        return
    if not settings.nats_url:
        raise SystemExit("oma-service: -nats-url (OMA_NATS_URL) is required to run one service alone")
    from shared.settings import METRICS_PORTS
    port = settings.metrics_port if settings.metrics_port is not None else METRICS_PORTS[name]
    if port:
        start_http_server(port, addr=settings.host)
    async with Appliance(settings, (name,)):
        log.info("service running", extra={"service": name, "metrics_port": port})
        await stop.wait()
