"""The `Exporter` protocol and the supervision machinery both NBD backends share.

An exporter serves block devices under export names on one TCP port. It starts its server
itself (or attaches to a running one through a pid file), restarts it when it dies (a watchdog
task), and proves an export with a real NBD connection (`check_export`), never with a listing.
Counters for metrics (`reloads`, `restarts`, `last_reload_seconds`) are plain attributes; the
export_manager service publishes them.
"""
from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import os
import re
import signal
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from oma.shared.contracts import Exporter, validate_device_path  # noqa: F401 - the contract, re-exported for the backends
from oma.shared.errors import BadRequest, Unavailable

from . import probe
from .probe import ExportCheckError, describe_oserror, resource_error
from .settings import NbdSettings

__all__ = ["Exporter", "ExporterConfig", "ExportCheckError", "ExporterStartError", "SpawnError", "ProcessExporter",
           "validate_export_name", "validate_device_path", "parse_version", "pid_alive"]

log = logging.getLogger("oma.nbd")

EXPORT_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")


class ExporterStartError(Unavailable):
    """The NBD server could not be started (port in use, missing binary, bad config)."""
    error = "NBD server failed to start"


class SpawnError(ExporterStartError):
    """The server process could not even be created: this process is out of file descriptors or
    processes (EMFILE, ENFILE, EAGAIN), or exec failed. Says nothing about a running server."""
    error = "NBD server cannot be spawned"


_NBD = NbdSettings()  # the defaults: one definition, the settings section's (plugins/nbd/settings.py)


def _data_dir() -> Path:
    # Imported when called: shared.settings loads plugins.nbd.settings (this package) while it is built.
    from oma.shared.settings import default_data_dir
    return default_data_dir()


@dataclass
class ExporterConfig:
    """What an exporter runs with: the `nbd` settings section, or any part of it given directly."""
    port: int = _NBD.port
    host: str = _NBD.listen_addr
    state_dir: Path = field(default_factory=lambda: _data_dir() / "exports")
    binary: str | None = _NBD.binary
    watchdog_interval: float = _NBD.watchdog_interval
    watchdog_max_backoff: float = _NBD.watchdog_max_backoff
    reload_debounce: float = _NBD.reload_debounce
    attach_pidfile: Path | None = _NBD.attach_pidfile
    user: str | None = _NBD.user               # nbd-server only; None: no `user =` line
    group: str | None = _NBD.group
    base_config: Path | None = _NBD.base_config
    start_timeout: float = _NBD.start_timeout
    check_timeout: float = _NBD.check_timeout
    tls: bool = _NBD.tls
    tls_username: str = _NBD.tls_username
    tls_psk_file: Path | None = _NBD.tls_psk_file  # None: STATE_DIR/nbd-tls.psk, generated when missing
    tls_client_psk_file: str | None = _NBD.tls_client_psk_file

    def __post_init__(self) -> None:
        self.state_dir = Path(self.state_dir)
        self.port = int(self.port)
        if self.attach_pidfile is not None:
            self.attach_pidfile = Path(self.attach_pidfile)
        if self.base_config is not None:
            self.base_config = Path(self.base_config)
        self.tls_psk_file = Path(self.tls_psk_file) if self.tls_psk_file else self.state_dir / "nbd-tls.psk"

    @classmethod
    def from_settings(cls, settings: Any = None) -> "ExporterConfig":
        """From the `nbd` settings section (NbdSettings) of shared.settings.Settings; state in
        DATA_DIR/exports."""
        if settings is None:  # imported here: plugins.nbd.settings is loaded while shared.settings is built
            from oma.shared.settings import Settings
            settings = Settings()
        nbd: NbdSettings = settings.nbd
        return cls(
            port=nbd.port,
            host=nbd.listen_addr,
            state_dir=Path(settings.data_dir) / "exports",
            binary=nbd.binary,
            watchdog_interval=nbd.watchdog_interval,
            watchdog_max_backoff=nbd.watchdog_max_backoff,
            reload_debounce=nbd.reload_debounce,
            attach_pidfile=nbd.attach_pidfile,
            user=nbd.user or None,
            group=nbd.group or None,
            base_config=nbd.base_config,
            start_timeout=nbd.start_timeout,
            check_timeout=nbd.check_timeout,
            tls=nbd.tls,
            tls_username=nbd.tls_username,
            tls_psk_file=nbd.tls_psk_file,
            tls_client_psk_file=nbd.tls_client_psk_file,
        )


def validate_export_name(name: str) -> str:
    if not isinstance(name, str) or not EXPORT_NAME_RE.fullmatch(name):
        raise BadRequest("Invalid export name", {
            "export_name": name,
            "rule": "1-200 characters of letters, digits, '-', '_', '.', starting with a letter or digit"})
    return name


def parse_version(text: str) -> tuple[int, ...]:
    """First dotted number in `text`: 'This is nbd-server version 3.24' -> (3, 24),
    '1:3.24-1.1' (dpkg) -> (3, 24), 'nbdkit 1.32.5' -> (1, 32, 5)."""
    text = re.sub(r"^\d+:", "", text.strip())      # dpkg epoch
    m = re.search(r"(\d+(?:\.\d+)+)", text)
    if not m:
        raise ValueError(f"no version number in {text!r}")
    return tuple(int(x) for x in m.group(1).split("."))


def pid_alive(pid: int | None, command: str | None = None) -> bool:
    """True if `pid` runs and is not a zombie (killed daemons are reparented to a PID 1 that may
    never reap them); with `command`, argv[0] must also end with that name (pid reuse).
    Raises OSError when it cannot tell (EMFILE: no descriptor left to read /proc), never
    answering "gone" for "cannot look"."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)                         # needs no descriptor
    except ProcessLookupError:
        return False
    except PermissionError:
        pass                                    # exists; another user's (pid reuse): argv tells
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat.rsplit(")", 1)[1].split()[0] in ("Z", "X"):
            return False
        if command:
            argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0", 1)[0].decode(errors="replace")
            return os.path.basename(argv0) == os.path.basename(command)
        return True
    except OSError as exc:
        if resource_error(exc):
            raise
        return False
    except IndexError:
        return False


def process_start_time(pid: int) -> float | None:
    """Start time of a process in epoch seconds, from /proc."""
    try:
        ticks = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
        btime = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                     if line.startswith("btime "))
        return btime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def port_in_use(host: str, port: int) -> bool:
    """True if another socket LISTENs on host:port (what the server would fail to bind)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                return True
            raise
    return False


class ProcessExporter:
    """Shared base: spawn a daemonizing server that writes a pid file, wait until it answers
    the NBD handshake, supervise it, and coalesce reloads. Subclasses provide the command line,
    the export state (symlinks or conf.d files) and `_reload()`."""

    backend: ClassVar[str] = ""
    command: ClassVar[str] = ""                  # default binary name on PATH

    def __init__(self, config: ExporterConfig | None = None):
        self.config = config or ExporterConfig()
        self.name = self.backend
        self.port = self.config.port
        self.host = self.config.host
        self.reloads = 0
        self.restarts = 0
        self.watchdog_failures = 0              # failed watchdog rounds (cannot spawn / check / restart)
        self.last_error: str | None = None      # why the watchdog could not bring the server back
        self.last_reload_seconds = 0.0
        self._unanswered = 0                    # handshakes in a row the live server did not answer
        self._reported_gone = False             # "is gone" logged once per death, not once per retry
        self.pid: int | None = None
        self.attached = False
        self.version: tuple[int, ...] = ()
        self.version_string = ""
        self.dir = self.config.state_dir / self.backend
        self.pidfile = self.config.attach_pidfile or (self.dir / f"{self.backend}.pid")
        self._binary: str | None = None
        self._lock = asyncio.Lock()              # one server operation at a time
        self._watchdog: asyncio.Task | None = None
        self._started = False
        self._batch: _Batch | None = None
        self._tasks: set[asyncio.Task] = set()
        self._pending: dict[str, asyncio.Future] = {}    # export name -> reload that will apply it
        self._unapplied: set[str] = set()                # names whose reload failed

    # ----- subclass hooks
    def _prepare(self) -> None:
        """Create directories and files the server needs before it starts."""
        self.dir.mkdir(parents=True, exist_ok=True)

    def _argv(self) -> list[str]:
        raise NotImplementedError

    async def _detect_version(self) -> str:
        raise NotImplementedError

    async def _after_attach(self) -> None:
        """Called when start() attached to a running server instead of spawning one."""

    async def _reload(self, batch: "_Batch") -> None:
        """Make the running server serve the state on disk (nbd-server only)."""

    # ----- properties
    @property
    def binary(self) -> str:
        if self._binary is None:
            from shutil import which
            found = which(self.config.binary or self.command)
            if found is None:
                raise ExporterStartError(details=f"{self.config.binary or self.command} is not installed "
                                         f"(backend {self.backend})")
            self._binary = found
        return self._binary

    @property
    def connect_host(self) -> str:
        """Where clients on this machine connect (a wildcard listen address means loopback)."""
        return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(self.host, self.host)

    def uri(self, name: str = "", *, client: bool = False) -> str:
        """Where a libnbd client connects to export `name`. With TLS: an nbds:// URI naming the PSK
        identity and file; `client=True` names the VMA's copy of the file (tls_client_psk_file)."""
        cfg = self.config
        if not cfg.tls:
            return probe.nbd_uri(self.connect_host, self.port, name)
        psk = (cfg.tls_client_psk_file or cfg.tls_psk_file) if client else cfg.tls_psk_file
        return probe.nbd_uri(self.connect_host, self.port, name, tls_username=cfg.tls_username, psk_file=psk)

    def running(self) -> bool:
        return pid_alive(self.pid, self.binary if self._binary else self.command)

    # ----- lifecycle
    async def detect_version(self) -> tuple[int, ...]:
        self.version_string = await self._detect_version()
        self.version = parse_version(self.version_string)
        return self.version

    async def start(self) -> None:
        """Start (or attach to) the server, wait until it answers a real NBD handshake, then
        start the watchdog. Raises ExporterStartError with the reason."""
        if self._started:
            return
        self.binary  # fail early and clearly when not installed
        await self.detect_version()
        self._prepare()
        async with self._lock:
            if await self._try_attach():
                await self._after_attach()
            else:
                await self._spawn()
        self._started = True
        self.last_error = None
        self._warn_if_exposed()
        if self.config.watchdog_interval > 0:
            self._watchdog = asyncio.create_task(self._watch(), name=f"nbd-watchdog-{self.backend}-{self.port}")
        log.info("%s serving on %s:%s (pid %s, version %s%s)", self.backend, self.host, self.port, self.pid,
                 self.version_string, ", attached" if self.attached else "")

    def _warn_if_exposed(self) -> None:
        try:
            loopback = ipaddress.ip_address(self.host).is_loopback
        except ValueError:                      # a host name: cannot tell, say it
            loopback = False
        if not loopback and not self.config.tls:
            log.warning("%s listens on %s without TLS: whoever reaches port %s can list, read and write "
                        "every export; listen on loopback (the VMA's tunnel) or set OMA_NBD_TLS=true",
                        self.backend, self.host, self.port)

    async def serving_error(self, handshake: bool = True) -> str | None:
        """None when our server runs and (with `handshake`) answers the NBD handshake on its port;
        otherwise why not (for health and the export_manager's ready check). A process that squats
        the port is not ours. While a reload or restart replaces the server (lock held), it counts
        as serving: a failure of that operation is reported by the operation and `last_error`."""
        if self.last_error is not None:
            return self.last_error
        if not self._started:
            return f"{self.backend} is not started"
        if self._lock.locked():
            return None
        try:
            if not self.running():
                return f"{self.backend} (pid {self.pid}) is not running"
            if handshake:
                generation = (self.pid, self.reloads, self.restarts)
                if not await probe.handshake(self.connect_host, self.port, timeout=1.0):
                    if self._lock.locked() or generation != (self.pid, self.reloads, self.restarts):
                        return None     # replaced by a reload while we knocked
                    return f"no NBD server answers on {self.host}:{self.port}"
        except OSError as exc:
            return f"cannot check {self.backend}: {describe_oserror(exc)}"
        return None

    async def stop(self, keep_running: bool = False) -> None:
        """Stop supervising; unless keep_running, terminate the server (SIGTERM, then SIGKILL)."""
        self._started = False
        if self._watchdog:
            self._watchdog.cancel()
            try:
                await self._watchdog
            except (asyncio.CancelledError, Exception):
                pass
            self._watchdog = None
        if self._batch is not None:                 # let waiting adds finish first
            try:
                await asyncio.shield(self._batch.future)
            except Exception:
                pass
        if keep_running:
            return
        async with self._lock:
            await self._terminate(signal.SIGTERM)
            try:
                self.pidfile.unlink()
            except FileNotFoundError:
                pass
            self.pid = None

    async def _terminate(self, sig: int, timeout: float = 5.0) -> None:
        pid = self.pid
        if not self.running():
            return
        try:
            os.kill(pid, sig)  # type: ignore[arg-type]
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout
        while pid_alive(pid):
            if time.monotonic() > deadline:
                if sig != signal.SIGKILL:
                    os.kill(pid, signal.SIGKILL)  # type: ignore[arg-type]
                    sig = signal.SIGKILL
                    deadline = time.monotonic() + timeout
                else:
                    raise ExporterStartError(details=f"{self.backend} pid {pid} does not die")
            await asyncio.sleep(0.01)

    def _read_pidfile(self) -> int | None:
        try:
            return int(self.pidfile.read_text().strip())
        except OSError as exc:
            if resource_error(exc):
                raise
            return None
        except ValueError:
            return None

    async def _try_attach(self) -> bool:
        pid = self._read_pidfile()
        if pid and pid_alive(pid, self.binary) and await probe.handshake(self.connect_host, self.port):
            self.pid, self.attached = pid, True
            return True
        if self.config.attach_pidfile is not None:
            log.warning("%s: no running server to attach to via %s; starting one", self.backend, self.pidfile)
        return False

    async def _spawn(self) -> None:
        """Start the server and wait until it answers on its port. Caller holds self._lock.
        An OSError on our side (out of descriptors or processes) is a SpawnError."""
        try:
            await self._spawn_server()
        except OSError as exc:
            raise SpawnError(details=f"cannot spawn {self.backend}: {describe_oserror(exc)}") from exc

    async def _spawn_server(self) -> None:
        self.attached = False
        if port_in_use(self.host, self.port):
            raise ExporterStartError(details=f"port {self.host}:{self.port} is already in use; "
                                     f"{self.backend} cannot listen there")
        try:
            self.pidfile.unlink()
        except FileNotFoundError:
            pass
        argv = self._argv()
        startlog = self.dir / f"{self.backend}.start.log"
        # stderr goes to a file, not a pipe: the daemon may inherit it and keep a pipe open forever
        with open(startlog, "wb") as err:
            proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL,
                                                        stdout=err, stderr=err, start_new_session=True)
            try:
                rc = await asyncio.wait_for(proc.wait(), self.config.start_timeout)
            except asyncio.TimeoutError:
                proc.kill()
                await proc.wait()
                rc = -1
        if rc != 0:
            raise ExporterStartError(details=f"{' '.join(argv)} exited {rc}: {self._startlog(startlog)}")
        deadline = time.monotonic() + self.config.start_timeout
        while True:
            pid = self._read_pidfile()
            if pid is not None and not pid_alive(pid):
                raise ExporterStartError(details=f"{self.backend} (pid {pid}) exited right after start "
                                         f"on {self.host}:{self.port}: {self._startlog(startlog) or 'see syslog'}")
            if pid is not None and await probe.handshake(self.connect_host, self.port, timeout=1.0):
                if pid_alive(pid):
                    self.pid = pid
                    self._unapplied.clear()     # a fresh server read every export from disk
                    return
            if time.monotonic() > deadline:
                if pid:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                raise ExporterStartError(details=f"{self.backend} did not answer on {self.host}:{self.port} "
                                         f"within {self.config.start_timeout}s")
            await asyncio.sleep(0.01)

    @staticmethod
    def _startlog(path: Path) -> str:
        try:
            return path.read_text(errors="replace").strip()[-2000:]
        except OSError:
            return ""

    # ----- supervision
    async def _watch(self) -> None:
        """Restart the server when its process is gone or stops answering. A round that fails is
        logged with its kind (cannot spawn / cannot check / restart failed) and the next one waits
        twice as long, up to watchdog_max_backoff: no tight restart loop while the cause lasts."""
        interval = self.config.watchdog_interval
        delay, tick = interval, 0
        while self._started:
            await asyncio.sleep(delay)
            tick += 1
            if self._lock.locked():
                continue                        # a reload is replacing the server right now
            try:
                async with self._lock:
                    if not self._started:
                        return
                    await self._check(tick)
                delay = interval
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the watchdog must outlive any failure
                delay = min(delay * 2, max(self.config.watchdog_max_backoff, interval))
                self.watchdog_failures += 1
                if isinstance(exc, SpawnError):
                    kind, reason = "cannot spawn", str(exc.details)
                elif isinstance(exc, ExporterStartError):
                    kind, reason = "restart failed", str(exc.details or exc.error)
                elif isinstance(exc, OSError):
                    kind, reason = "cannot check the server", describe_oserror(exc)
                else:
                    kind, reason = "watchdog error", repr(exc)
                self.last_error = f"{kind}: {reason}"
                log.error("%s watchdog: %s: %s; next try in %.1fs", self.backend, kind, reason, delay)

    async def _check(self, tick: int) -> None:
        """One watchdog round (lock held): restart a server whose process is gone or that stopped
        answering. Raises what prevented the check or the restart."""
        alive = self.running()
        if alive and tick % 5 == 0:
            self._unanswered = 0 if await probe.handshake(self.connect_host, self.port) else self._unanswered + 1
            if self._unanswered >= 3:
                log.error("%s pid %s stopped answering on port %s; killing it", self.backend, self.pid, self.port)
                await self._terminate(signal.SIGKILL)
                alive = False
        if alive:
            if self.last_error is not None:
                log.warning("%s serving again (pid %s)", self.backend, self.pid)
                self.last_error = None
            return
        if not self._reported_gone:
            log.warning("%s (pid %s) is gone; restarting it", self.backend, self.pid)
            self._reported_gone = True
        self._unanswered = 0
        await self._spawn()
        self.restarts += 1
        self.last_error, self._reported_gone = None, False
        log.warning("%s restarted (pid %s)", self.backend, self.pid)

    # ----- reload coalescing
    async def _apply(self, name: str, kind: str) -> None:
        """Wait for a reload that starts after this call (kind: 'add' or 'change'). All changes
        made within `reload_debounce` of each other, or while a reload runs, share one reload."""
        if not self._started:
            return                              # start() reads the state from disk
        batch = self._batch
        if batch is None:
            batch = self._batch = _Batch(asyncio.get_running_loop().create_future())
            task = asyncio.create_task(self._run_batch(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        batch.names[name] = kind
        self._pending[name] = batch.future
        await asyncio.shield(batch.future)

    async def _settled(self, name: str) -> None:
        """Reuse of an export whose state is already on disk: return only once it is served
        (a concurrent add of the same export may still be waiting for its reload)."""
        future = self._pending.get(name)
        if future is not None:
            await asyncio.shield(future)
        elif name in self._unapplied:
            await self._apply(name, "change")

    async def _run_batch(self, batch: "_Batch") -> None:
        await asyncio.sleep(self.config.reload_debounce)
        async with self._lock:
            if self._batch is batch:
                self._batch = None              # later changes start the next batch
            started = time.monotonic()
            try:
                await self._reload(batch)
            except Exception as e:
                log.error("%s reload of %d exports failed: %s", self.backend, len(batch.names), e)
                self._unapplied.update(batch.names)
                if not batch.future.done():
                    batch.future.set_exception(e if isinstance(e, ExporterStartError)
                                               else ExporterStartError("NBD server reload failed", str(e)))
                batch.future.exception()        # retrieved: no "never retrieved" warning without waiters
                return
            finally:
                for name in batch.names:
                    if self._pending.get(name) is batch.future:
                        del self._pending[name]
            self._unapplied.difference_update(batch.names)
            self.reloads += 1
            self.last_reload_seconds = time.monotonic() - started
            batch.future.set_result(None)

    # ----- exports
    def list_exports(self) -> dict[str, str]:
        raise NotImplementedError

    async def check_export(self, name: str) -> int:
        """Size in bytes of export `name`, proven by a real NBD_OPT_GO; ExportCheckError otherwise."""
        validate_export_name(name)
        return await probe.export_size(self.uri(name), timeout=self.config.check_timeout)

    def state(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "running": self.running(),
            "pid": self.pid,
            "host": self.host,
            "port": self.port,
            "attached": self.attached,
            "version": self.version_string,
            "reloads": self.reloads,
            "restarts": self.restarts,
            "watchdog_failures": self.watchdog_failures,
            "last_error": self.last_error,
            "tls": self.config.tls,
            "last_reload_seconds": self.last_reload_seconds,
            "exports": len(self.list_exports()),
            "state_dir": str(self.dir),
        }


@dataclass
class _Batch:
    future: asyncio.Future
    names: dict[str, str] = field(default_factory=dict)   # export name -> "add" | "change"
