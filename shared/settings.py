"""Settings: pydantic-settings with the `OMA_` env prefix, and the seed's single-dash CLI flags.

Precedence: command-line flag > environment > default. Flags are parsed by `parse_flags`,
which returns only the flags actually given, so that unset flags never mask the environment.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

SERVICES = ("auth", "config", "inventory", "replication", "export_manager", "context_aggregator", "failover",
            "scheduler")

# Default metrics port of each service when it runs alone (`oma-service NAME`).
METRICS_PORTS = {name: 9101 + i for i, name in enumerate(SERVICES)}


def default_data_dir() -> Path:
    """`/var/lib/oma` when we may write there, else a per-user directory."""
    system = Path("/var/lib/oma")
    try:
        system.mkdir(parents=True, exist_ok=True)
        if os.access(system, os.W_OK):
            return system
    except OSError:
        pass
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "oma"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="OMA_", extra="forbid", validate_default=True)

    # The seed's flags.
    port: int = Field(8080, ge=1, le=65535, description="HTTP server port")
    debug: bool = Field(False, description="Enable debug logging (SQL included)")
    db_type: str = Field("memory", description="Database type (mariadb/memory)")
    db_host: str = "localhost"
    db_port: int = Field(3306, ge=1, le=65535)
    db_name: str = "migratekit_oma"
    db_user: str = "oma_user"
    db_pass: str = Field("", repr=False)
    auth_enabled: bool = True

    # Ours.
    host: str = Field("0.0.0.0", description="HTTP listen address")
    nats_url: str = Field("", description="NATS server URL; empty starts an embedded nats-server")
    nats_user: str = ""
    nats_password: str = Field("", repr=False)
    allow_ephemeral_with_external_nats: bool = Field(
        False, description="let a memory database run with an external NATS (throwaway tests only)")
    data_dir: Path = Field(default_factory=default_data_dir)
    metrics_port: int | None = Field(None, ge=0, le=65535, description="/metrics port of a lone service")
    request_timeout: float = Field(30.0, gt=0, description="Bus request timeout (seconds)")
    startup_timeout: float = Field(60.0, gt=0, description="How long start-up waits for NATS and the DB")
    log_format: Literal["json", "logfmt"] = "json"
    db_ping_interval: float = Field(15.0, gt=0, description="seconds between database checks (oma_db_up)")
    processes: str = Field("auto", pattern=r"^(auto|[1-9][0-9]?)$",
                           description="oma-api processes: 1 = all in one; N = the services and N-1 gateway "
                                       "workers; auto = 2 on two cores or more")

    # Auth.
    session_ttl: float = Field(24 * 3600, gt=0, description="Session lifetime (seconds)")
    appliance_tokens: str = Field("", repr=False, description="name=token,... registered at start-up")
    auth_cache_ttl: float = Field(5.0, ge=0, description="Gateway verification cache (seconds; 0 = off)")
    login_rate_limit: int = Field(5, ge=1, description="Failed logins a minute per appliance+address (x10 per address)")
    ui_idle_timeout: float = Field(1800, gt=0, description="Web GUI sessions end after this many idle seconds")

    # HTTP hardening (the gateway's server; see docs/deployment.md).
    max_body_bytes: int = Field(1 << 20, ge=0, description="largest request body accepted (bytes); 413 beyond")
    trusted_proxies: str = Field("", description="comma-separated proxy addresses/CIDRs whose X-Forwarded-* "
                                                 "headers are believed; empty = none, the socket peer is the client")
    header_timeout: float = Field(5.0, gt=0, description="seconds a client has to send a complete request head")
    max_connections: int = Field(4096, ge=1, description="open HTTP connections; beyond, 503 at once")
    health_cache_ttl: float = Field(1.0, ge=0, description="seconds /health reuses its last service check")
    health_max_rate: float = Field(500.0, gt=0, description="/health answers per second; callers beyond wait")

    # Secrets at rest.
    secret_key_file: Path | None = None

    # Cloud (CloudStack).
    cloud_backend: str = "ossea"
    cloud_timeout: float = Field(30.0, gt=0)
    cloud_job_timeout: float = Field(120.0, gt=0)
    cloud_retries: int = Field(5, ge=1, description="attempts of a transient cloud failure (530, timeouts)")
    cloud_retry_backoff: float = Field(0.2, ge=0, description="first retry delay (seconds), doubled each time")
    cleanup_retry_interval: float = Field(30.0, gt=0, description="seconds between retries of failed cleanups")
    cloud_poll_interval: float = Field(0.5, gt=0, description="seconds between polls of a failover's cloud jobs")

    # Failover.
    failover_stub_template: str = Field("oma-failover-stub", description="template (name or id) of the stub VM")
    failover_shutdown_timeout: float = Field(120.0, ge=0, le=3600,
                                             description="seconds a guest shutdown may take before a hard power-off")

    # Scheduler (protection groups and their schedules; docs/scheduler.md).
    scheduler_tick: float = Field(5.0, gt=0, description="seconds between the scheduler's rounds (due "
                                  "schedules, starting queued VMs, following running syncs)")
    scheduler_min_interval: float = Field(60.0, gt=0, description="shortest schedule interval accepted "
                                          "(seconds); lowered in tests")
    scheduler_start_lease: float = Field(300.0, gt=0, description="seconds a VM claimed by a scheduler may "
                                         "stay `starting`; after it, the VM is recorded failed, never started twice")

    # Inventory.
    inventory_source: str = "vsphere"
    vsphere_timeout: float = Field(60.0, gt=0, description="vCenter login and per-read timeout (seconds)")

    # VM contexts (the read model's durable consumer).
    contexts_consumer: str = "context_aggregator-readmodel"
    contexts_deliver_policy: Literal["all", "new"] = "all"
    contexts_ack_wait: float = Field(30.0, gt=0)
    contexts_max_deliver: int = Field(5, ge=1, description="deliveries before an event is dead-lettered")
    contexts_nak_delay: float = Field(2.0, ge=0)
    contexts_batch: int = Field(250, ge=1, description="events applied per transaction")

    # Exports: every OMA_NBD_* / exporter variable (plugins/nbd reads only these; docs/exporters.md).
    export_backend: str = "nbdkit"
    nbd_port: int = Field(10809, ge=1, le=65535)
    nbd_listen_addr: str = Field("127.0.0.1", description="NBD listen address; beyond loopback only with nbd_tls")
    nbd_keep_running: bool = Field(False, description="leave the NBD server (and its connections) up on stop")
    nbd_binary: str | None = Field(None, description="NBD server command; default nbdkit / nbd-server on PATH")
    nbd_user: str = Field("root", description="nbd-server: user that opens the devices ('' = none)")
    nbd_group: str = Field("root", description="nbd-server: group that opens the devices (production: disk)")
    nbd_base_config: Path | None = Field(None, description="nbd-server: config template (ops/nbd/nbd-server.conf)")
    nbd_attach_pidfile: Path | None = Field(None, description="attach to a server already running with this pid file")
    nbd_watchdog_interval: float = Field(1.0, ge=0, description="seconds between liveness checks; 0 disables")
    nbd_watchdog_max_backoff: float = Field(30.0, gt=0, description="longest wait between failed restarts")
    nbd_reload_debounce: float = Field(0.05, ge=0, description="changes within this window share one reload")
    nbd_start_timeout: float = Field(10.0, gt=0, description="how long a start waits for the NBD handshake")
    nbd_check_timeout: float = Field(10.0, gt=0, description="timeout of a real NBD_OPT_GO export check")
    nbd_tls: bool = Field(False, description="nbdkit: require TLS with a pre-shared key (--tls=require --tls-psk)")
    nbd_tls_username: str = Field("oma", pattern=r"^[A-Za-z0-9._-]{1,64}$", description="PSK identity")
    nbd_tls_psk_file: Path | None = Field(None, description="PSK file (username:hexkey); default "
                                          "DATA_DIR/exports/nbd-tls.psk, generated 0600 when missing")
    nbd_tls_client_psk_file: str | None = Field(None, description="where the VMA keeps its copy of the PSK "
                                                "file (tls-psk-file in export URIs); default: nbd_tls_psk_file")
    export_reconcile_interval: float = Field(300.0, ge=0, description="seconds between reconciles; 0 = off")
    export_batch_wait: float = Field(0.5, ge=0, description="how long an export change waits to share a reload")

    # The VMA's API (through the reverse tunnel).
    vma_timeout: float = Field(30.0, gt=0, description="VMA API request timeout (seconds)")
    vma_retries: int = Field(3, ge=0, description="retries of a transient VMA failure (refused, 502/503/504)")
    # Orchestration through the VMA (docs/replication.md "Running the sync").
    nbd_host: str = Field("", max_length=255, description="host the VMA reaches OMA's NBD exports at "
                          "(OMA_NBD_HOST); empty: the export's own URI, else hostless nbd://:port/export")
    oma_url: str = Field("http://localhost:8082", description="OMA's API as the VMA reaches it (the "
                         "forward tunnel): the `oma_url` of a replicate call, for the copier's change ids")
    vma_poll_interval: float = Field(2.0, gt=0, description="seconds between polls of the VMA's progress")
    vma_stall_after: float = Field(60.0, gt=0, description="seconds without an answer from the VMA or "
                                   "without moving bytes before a job is `stalled`")
    vma_fail_after: float = Field(600.0, gt=0, description="seconds stalled before the job fails")

    # Replication.
    device_resolver: str = "by-id"
    device_by_id_dir: Path = Path("/dev/disk/by-id")
    device_wait: float = Field(60.0, gt=0)
    provision_wait: float = Field(120.0, ge=0)
    max_attached_disks: int = Field(32, ge=1)
    keep_failed_resources: bool = False
    # Replication under faults (docs/replication.md "Restart and faults").
    cloud_inflight_grace: float | None = Field(None, ge=0, description="seconds a cloud call sent before a "
                                               "restart may still take effect; unset = cloud_job_timeout")
    volume_sweep_interval: float = Field(300.0, ge=0, description="seconds between sweeps for orphaned "
                                         "OMA volumes; 0 = off")
    dependency_wait: float = Field(60.0, ge=0, description="how long a service waits at start-up for the "
                                   "services it needs to answer $SRV.PING")
    provision_lease: float = Field(15.0, gt=0, description="seconds a replication process's claim on a "
                                   "provisioning job lasts unrenewed; another copy resumes the job after it")

    @field_validator("db_type")
    @classmethod
    def _lower(cls, v: str) -> str:
        return v.strip().lower()

    @property
    def secret_key_path(self) -> Path:
        return self.secret_key_file or self.data_dir / "secret.key"


# flag -> (settings field, help). Single-dash long flags as in the seed; `--flag` works too.
FLAGS: dict[str, str] = {
    "port": "HTTP server port (default 8080)",
    "debug": "enable debug logging",
    "db-type": "database type: mariadb or memory (default memory)",
    "db-host": "MariaDB hostname (default localhost)",
    "db-port": "MariaDB port (default 3306)",
    "db-name": "database name (default migratekit_oma)",
    "db-user": "database username (default oma_user)",
    "db-pass": "database password",
    "auth-enabled": "enable authentication (default true)",
    "nats-url": "NATS URL; empty starts an embedded nats-server",
    "host": "HTTP listen address (default 0.0.0.0)",
    "data-dir": "directory for local state (keys, export state)",
    "metrics-port": "port of /metrics when a service runs alone",
}
BOOL_FLAGS = {"debug", "auth-enabled"}


class FlagError(Exception):
    """A bad flag or value: the CLI prints one line on stderr and exits with status 2."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage dump
        raise FlagError(f"{self.prog}: {message}")


def _bool(text: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "true", "t", "yes", "on"):
        return True
    if low in ("0", "false", "f", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"invalid boolean value: {text!r}")


def build_parser(prog: str, extra: dict[str, str] | None = None, only: tuple[str, ...] | None = None,
                 **kw: Any) -> argparse.ArgumentParser:
    """The flags of FLAGS (or the `only` ones, for a command that uses a few) and `extra`."""
    parser = _Parser(prog=prog, allow_abbrev=False, argument_default=argparse.SUPPRESS, **kw)
    flags = {k: v for k, v in FLAGS.items() if only is None or k in only}
    for flag, help_text in {**flags, **(extra or {})}.items():
        names = (f"-{flag}", f"--{flag}")
        if flag in BOOL_FLAGS:
            parser.add_argument(*names, dest=flag.replace("-", "_"), nargs="?", const=True,
                                type=_bool, help=help_text)
        else:
            parser.add_argument(*names, dest=flag.replace("-", "_"), help=help_text)
    return parser


def load_settings(argv: list[str] | None = None, prog: str = "oma-api",
                  positional: tuple[str, ...] = ()) -> tuple[Settings, dict[str, Any]]:
    """Parse flags and build Settings; raise FlagError with one line naming the culprit.

    Returns the settings and the positional values (for `oma-service NAME`).
    """
    parser = build_parser(prog)
    for name in positional:
        parser.add_argument(name)
    args = vars(parser.parse_intermixed_args(argv))
    pos = {name: args.pop(name) for name in positional}
    return settings_from_flags(args, prog), pos


def settings_from_flags(args: dict[str, Any], prog: str) -> Settings:
    """Settings from parsed flags (field name -> value); FlagError names a bad one."""
    try:
        return Settings(**args)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = str(err["loc"][0]) if err["loc"] else "?"
        flag = field.replace("_", "-")
        source = f"flag -{flag}" if field in args else f"setting OMA_{field.upper()}"
        raise FlagError(f"{prog}: invalid value for {source}: {err['msg']}") from None
