"""Plain helpers for the NBD exporter tests and the benchmark (no fixtures here)."""
from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import time
from pathlib import Path
from typing import Awaitable, Callable

from oma.shared.natsserver import free_port  # noqa: F401  (tests and benchmarks import it from here)

NBD_TOOLS = ("nbd-server", "nbdkit", "nbdinfo", "nbdcopy")
MiB = 1 << 20


def missing_tools(tools=NBD_TOOLS) -> list[str]:
    return [t for t in tools if shutil.which(t) is None]


def sparse_file(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def random_file(path: Path, size: int, chunk: int = 4 * MiB) -> Path:
    with open(path, "wb") as f:
        left = size
        while left > 0:
            n = min(chunk, left)
            f.write(os.urandom(n))
            left -= n
    return path


def digest(path: Path, length: int | None = None, offset: int = 0) -> str:
    """sha256 of `length` bytes of `path` starting at `offset` (whole file by default)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(offset)
        left = length if length is not None else os.path.getsize(path) - offset
        while left > 0:
            block = f.read(min(8 * MiB, left))
            if not block:
                break
            h.update(block)
            left -= len(block)
    return h.hexdigest()


async def nbdcopy(src: str | Path, dst: str | Path, *args: str) -> None:
    proc = await asyncio.create_subprocess_exec("nbdcopy", *args, str(src), str(dst),
                                                stderr=asyncio.subprocess.PIPE)
    _, err = await proc.communicate()
    if proc.returncode != 0:
        raise AssertionError(f"nbdcopy {src} {dst} failed: {err.decode().strip()}")


async def wait_until(pred: Callable[[], Awaitable[bool] | bool], timeout: float = 10.0,
                     interval: float = 0.05, what: str = "condition") -> float:
    """Poll `pred` (sync or async) until true; return the seconds it took; AssertionError on timeout."""
    start = time.monotonic()
    while True:
        result = pred()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)
