"""nbd-server backend: one conf.d file per export, changes applied by a coalesced reload.

nbd-server 3.24 (Debian 12) corrupts its heap on SIGHUP (NetworkBlockDevice/nbd#143, fixed in
3.25). So a reload is:
- version >= 3.25 and the batch only adds new names: SIGHUP to the main pid, then wait until
  the new names are listed;
- otherwise (older versions, or a batch that removes or re-points an export, which SIGHUP
  ignores): SIGKILL the main pid only and start it again with the same config. Children serving
  open connections keep running (SIGTERM would kill them); new connections are refused for the
  ~0.2 s the restart takes.
Adds and removes made within `reload_debounce` of each other, or while a reload runs, share one
reload; each caller returns once a reload that includes its change has completed. Reusing an
export whose device did not change costs nothing.

Layout under STATE_DIR/nbd-server/: nbd-server.conf (rendered from ops/nbd/nbd-server.conf),
conf.d/<export_name>.conf, placeholder.img, nbd-server.pid, nbd-server.start.log.
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import string
import time
from pathlib import Path

from .base import (ExporterStartError, ProcessExporter, _Batch, process_start_time,
                   validate_device_path, validate_export_name)
from .probe import ExportCheckError, _run, list_export_names

log = logging.getLogger("oma.nbd")

SIGHUP_MIN_VERSION = (3, 25)
PLACEHOLDER = "_placeholder"
TEMPLATE_PATH = Path(__file__).resolve().parents[2] / "ops" / "nbd" / "nbd-server.conf"
# Used when ops/ is not shipped (installed wheel); same settings as ops/nbd/nbd-server.conf.
FALLBACK_TEMPLATE = """\
[generic]
listenaddr = ${listenaddr}
port = ${port}
allowlist = true
includedir = ${includedir}
${identity}

[_placeholder]
exportname = ${placeholder}
readonly = true
"""
EXPORT_TEMPLATE = """\
# written by the OMA export manager; one export per file
[{name}]
exportname = {device}
flush = true
fua = true
"""


def reload_mode(version: tuple[int, ...], kinds: set[str]) -> str:
    """'sighup' when the installed nbd-server can reload safely and the batch only adds names;
    'restart' (of the main process) otherwise."""
    return "sighup" if tuple(version) >= SIGHUP_MIN_VERSION and kinds <= {"add"} else "restart"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")   # not *.conf: never read half-written
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class NbdServerExporter(ProcessExporter):
    backend = "nbd-server"
    command = "nbd-server"

    def __init__(self, config=None):
        super().__init__(config)
        if self.config.tls:
            raise ExporterStartError(details="OMA_NBD_TLS (TLS with a pre-shared key) is supported by the "
                                     "nbdkit backend only; set OMA_EXPORT_BACKEND=nbdkit or OMA_NBD_TLS=false")
        self.conf = self.dir / "nbd-server.conf"
        self.confd = self.dir / "conf.d"
        self.placeholder = self.dir / "placeholder.img"
        self._exports: dict[str, str] | None = None

    # ----- configuration
    def template(self) -> str:
        path = self.config.base_config or (TEMPLATE_PATH if TEMPLATE_PATH.exists() else None)
        return path.read_text() if path else FALLBACK_TEMPLATE

    def render_config(self) -> str:
        identity = "\n".join(f"{k} = {v}" for k, v in (("user", self.config.user), ("group", self.config.group)) if v)
        return string.Template(self.template()).substitute(
            listenaddr=self.host, port=self.port, includedir=self.confd,
            placeholder=self.placeholder, identity=identity)

    def _prepare(self) -> None:
        super()._prepare()
        self.confd.mkdir(parents=True, exist_ok=True)
        if not self.placeholder.exists():
            with open(self.placeholder, "wb") as f:
                f.truncate(4096)
        _write_atomic(self.conf, self.render_config())

    def _argv(self) -> list[str]:
        return [self.binary, "-C", str(self.conf), "-p", str(self.pidfile)]

    async def _detect_version(self) -> str:
        rc, out, err = await _run([self.binary, "-V"], 10)
        text = (out + err).strip()
        if any(ch.isdigit() for ch in text):
            return text.splitlines()[0]
        rc, out, _ = await _run(["dpkg-query", "-W", "-f=${Version}", "nbd-server"], 10)
        if rc == 0 and out.strip():
            return f"nbd-server {out.strip()} (dpkg)"
        raise ExporterStartError(details=f"cannot tell the version of {self.binary}: {text!r}")

    # ----- exports (state = conf.d files, cached)
    def list_exports(self) -> dict[str, str]:
        if self._exports is None:
            exports: dict[str, str] = {}
            for path in sorted(self.confd.glob("*.conf")) if self.confd.is_dir() else []:
                for line in path.read_text().splitlines():
                    key, _, value = line.partition("=")
                    if key.strip() == "exportname":
                        exports[path.stem] = value.strip()
            self._exports = exports
        return dict(self._exports)

    async def add_export(self, name: str, device_path: str) -> bool:
        """Serve `device_path` as `name`. Returns False when it already did (reuse: no reload);
        True once a reload that includes the new or re-pointed export has completed."""
        validate_export_name(name)
        device = validate_device_path(device_path)
        current = self.list_exports().get(name)
        if current == device:
            await self._settled(name)
            return False
        self.confd.mkdir(parents=True, exist_ok=True)
        _write_atomic(self.confd / f"{name}.conf", EXPORT_TEMPLATE.format(name=name, device=device))
        assert self._exports is not None
        self._exports[name] = device
        await self._apply(name, "add" if current is None else "change")
        return True

    async def remove_export(self, name: str) -> bool:
        """Stop serving `name` to new connections (open ones keep running). False if absent."""
        validate_export_name(name)
        self.list_exports()
        try:
            (self.confd / f"{name}.conf").unlink()
        except FileNotFoundError:
            return False
        assert self._exports is not None
        self._exports.pop(name, None)
        await self._apply(name, "change")
        return True

    # ----- reloads
    async def _reload(self, batch: _Batch) -> None:
        if reload_mode(self.version, set(batch.names.values())) == "sighup" and self.running():
            if await self._sighup(list(batch.names)):
                return
            log.warning("nbd-server did not list the new exports after SIGHUP; restarting it")
        await self._restart_main()

    async def _sighup(self, names: list[str], timeout: float = 5.0) -> bool:
        os.kill(self.pid, signal.SIGHUP)  # type: ignore[arg-type]  # main pid only: children die of SIGHUP
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if set(names) <= set(await list_export_names(self.connect_host, self.port)):
                    return True
            except ExportCheckError:
                pass
            await asyncio.sleep(0.02)
        return False

    async def _restart_main(self) -> None:
        """SIGKILL only the main process, then start it again with the same config."""
        await self._terminate(signal.SIGKILL)
        await self._spawn()

    async def _after_attach(self) -> None:
        """An attached server may predate exports written while we were away: restart it then."""
        started = process_start_time(self.pid) if self.pid else None
        newest = max((p.stat().st_mtime for p in [self.confd, *self.confd.glob("*.conf")]), default=0.0)
        if started is not None and newest > started:
            log.info("nbd-server pid %s is older than its conf.d; restarting it", self.pid)
            t0 = time.monotonic()
            await self._restart_main()
            self.reloads += 1
            self.last_reload_seconds = time.monotonic() - t0

    def state(self) -> dict:
        st = super().state()
        st["reload_mode"] = reload_mode(self.version, {"add"}) if self.version else None
        return st
