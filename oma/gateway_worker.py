"""The gateway's server, alone or as one of `oma-api`'s worker processes (oma/runner.py).

A worker imports only the gateway (no database code), so each costs ~60 MB rather than ~90.
"""
from __future__ import annotations

import asyncio
import json
import os
import socket
import sys

from oma.shared.settings import Settings

WORKER_FDS = "OMA_WORKER_FDS"  # "<listening socket>,<settings pipe>": descriptor numbers only


async def serve_gateway(settings: Settings, nats_url: str, sock: socket.socket | None = None,
                        services_metrics: str | None = None, stop: asyncio.Event | None = None) -> None:
    """Serves until SIGTERM/SIGINT (uvicorn's own handlers while it serves) or `stop`: the event our
    handlers set for a signal that came before uvicorn took them over (during start-up)."""
    import uvicorn

    from oma.services.gateway.app import create_app
    from oma.services.gateway.server import uvicorn_config

    server = uvicorn.Server(uvicorn_config(create_app(settings, nats_url, services_metrics), settings))

    async def exit_on_stop() -> None:
        await stop.wait()
        server.should_exit = True

    watcher = asyncio.ensure_future(exit_on_stop()) if stop is not None else None
    try:
        await server.serve(sockets=[sock] if sock is not None else None)
    finally:
        if watcher is not None:
            watcher.cancel()
    if not server.started:
        raise SystemExit(f"gateway could not listen on {settings.host}:{settings.port}")


def worker_main() -> None:
    """A gateway worker, started by runner.GatewayWorkers (never by hand): the listening socket
    and a pipe with the settings (NATS password included) are inherited descriptors."""
    from oma.loop import run as run_loop
    from oma.shared.logging import setup_logging

    sock_fd, conf_fd = (int(x) for x in os.environ.pop(WORKER_FDS).split(","))
    with os.fdopen(conf_fd, "rb") as pipe:
        conf = json.loads(pipe.read())
    if os.getppid() != conf["parent"]:  # the parent died before our PR_SET_PDEATHSIG took hold
        sys.exit(1)
    settings = Settings(**conf["settings"])
    setup_logging(settings.debug, settings.log_format)
    run_loop(serve_gateway(settings, conf["nats_url"], socket.socket(fileno=sock_fd), conf["metrics"]))


if __name__ == "__main__":
    worker_main()
