"""nbdkit backend (the default): `nbdkit file dir=DIR` serves every entry of DIR as an export.

An export is a symlink DIR/<export_name> -> <device>. nbdkit reads the directory on every
listing and opens the entry on every connection, so adding, re-pointing or removing an export
is one atomic rename or unlink: nothing to reload, ever (this is how it avoids nbd-server 3.24's
SIGHUP heap corruption). `reloads` therefore stays 0.

Layout under STATE_DIR/nbdkit/: exports/ (the served directory; nothing else may live there,
every entry is an export), tmp/ (symlinks are built here, then renamed into exports/),
nbdkit.pid, nbdkit.start.log.
"""
from __future__ import annotations

import logging
import os
import secrets
import signal
import stat
import uuid
from pathlib import Path

from .base import ExporterStartError, ProcessExporter, _Batch, validate_device_path, validate_export_name
from .probe import _run

log = logging.getLogger("oma.nbd")


def ensure_psk_file(path: Path, username: str) -> None:
    """The TLS pre-shared key file nbdkit reads (`--tls-psk`), in psktool's format
    `username:hexkey`. Generated once (256-bit key, mode 0600, created exclusively so the key is never
    readable by others, not even briefly); an existing file must be private and name `username`.
    The key itself is never logged nor sent anywhere: the VMA gets a copy out of band."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            raise ExporterStartError(details=f"TLS PSK file {path} is readable by others (mode {mode:o}); "
                                     "chmod 600 it") from None
        identities = [line.split(":", 1)[0] for line in path.read_text().splitlines() if ":" in line]
        if username not in identities:
            raise ExporterStartError(details=f"TLS PSK file {path} has no key for user {username!r} "
                                     "(format username:hexkey, one per line)")
        return
    with os.fdopen(fd, "w") as f:
        f.write(f"{username}:{secrets.token_hex(32)}\n")


class NbdkitExporter(ProcessExporter):
    backend = "nbdkit"
    command = "nbdkit"

    @property
    def export_dir(self):
        return self.dir / "exports"

    def _prepare(self) -> None:
        super()._prepare()
        self.export_dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "tmp").mkdir(parents=True, exist_ok=True)
        if self.config.tls:
            ensure_psk_file(self.config.tls_psk_file, self.config.tls_username)

    def _argv(self) -> list[str]:
        # forks after binding; writes the pid file once it accepts connections; logs to syslog.
        # --tls=require: a client that does not negotiate TLS with the key gets no export at all.
        tls = ["--tls=require", f"--tls-psk={self.config.tls_psk_file}"] if self.config.tls else []
        return [self.binary, "--port", str(self.port), "--ip-addr", self.host,
                "--pidfile", str(self.pidfile), "--log=syslog", *tls,
                "file", f"dir={self.export_dir}"]

    async def _after_attach(self) -> None:
        """A server left running (nbd_keep_running) with other options than configured, e.g. before
        TLS was turned on, is replaced: attaching would keep serving the old way."""
        try:
            running = Path(f"/proc/{self.pid}/cmdline").read_bytes().split(b"\0")[1:-1]
        except OSError:
            running = []
        wanted = [arg.encode() for arg in self._argv()[1:]]
        if running != wanted:
            log.warning("nbdkit pid %s runs with other options than configured (TLS %s); restarting it",
                        self.pid, "on" if self.config.tls else "off")
            await self._terminate(signal.SIGTERM)
            await self._spawn()

    async def _detect_version(self) -> str:
        rc, out, err = await _run([self.binary, "--version"], 10)
        return (out or err).strip()

    async def _reload(self, batch: _Batch) -> None:  # pragma: no cover - never needed
        return None

    async def add_export(self, name: str, device_path: str) -> bool:
        """Serve `device_path` as `name`. Returns False when it already did (reuse), True when
        the export was created or re-pointed. Takes effect for the next connection."""
        validate_export_name(name)
        device = validate_device_path(device_path)
        if self.list_exports().get(name) == device:
            return False
        self._prepare()
        tmp = self.dir / "tmp" / f"{name}.{uuid.uuid4().hex}"
        os.symlink(device, tmp)
        os.replace(tmp, self.export_dir / name)      # atomic: create or re-point
        return True

    async def remove_export(self, name: str) -> bool:
        """Stop serving `name` to new connections (open ones keep their device). False if absent."""
        validate_export_name(name)
        try:
            os.unlink(self.export_dir / name)
            return True
        except FileNotFoundError:
            return False

    def list_exports(self) -> dict[str, str]:
        out: dict[str, str] = {}
        try:
            entries = list(os.scandir(self.export_dir))
        except FileNotFoundError:
            return out
        for entry in entries:
            if entry.is_symlink():
                out[entry.name] = os.readlink(entry.path)
        return dict(sorted(out.items()))
