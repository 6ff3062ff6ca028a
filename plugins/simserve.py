"""Serve one of the project's simulators (CloudStack, VMA) until SIGINT or SIGTERM."""
from __future__ import annotations

import asyncio
import signal
from typing import Any


async def serve_until_signalled(sim: Any, host: str, port: int) -> None:
    """Start `sim`, print its URL (the ready signal for scripts), stop it on SIGINT/SIGTERM."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(await sim.start(host, port), flush=True)
    try:
        await stop.wait()
    finally:
        await sim.stop()
