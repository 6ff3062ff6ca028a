"""Settings: one tree, pydantic-settings with the `OMA_` env prefix, and the seed's single-dash flags.

The tree is the core's fields (below) plus one typed section per plugin that registers one through
`oma_register_settings` (shared.hookspecs): section `nbd`'s field `port` is `settings.nbd.port`,
read from `OMA_NBD_PORT`, and may be given as `Settings(nbd_port=...)`. `variables()` lists every
`OMA_` variable; `python3 -m oma.shared.settings --markdown` prints them as docs/settings.md's table.

Precedence: command-line flag > environment > default. Flags are parsed by `parse_flags`,
which returns only the flags actually given, so that unset flags never mask the environment.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, ValidationError, create_model, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, SettingsConfigDict

from oma.shared.hookspecs import PluginSettings

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


class CoreSettings(BaseSettings):
    """The core's settings; `Settings` adds the plugins' sections."""
    # OMA_<SECTION>_<FIELD> is a plugin section's field: one level of nesting, the rest is the name.
    model_config = SettingsConfigDict(env_prefix="OMA_", extra="forbid", validate_default=True,
                                      env_nested_delimiter="_", env_nested_max_split=1)
    _sections: ClassVar[dict[str, type[PluginSettings]]] = {}

    # The seed's flags.
    port: int = Field(8080, ge=1, le=65535, description="HTTP server port")
    debug: bool = Field(False, description="Enable debug logging (SQL included)")
    db_type: str = Field("memory", description="Database type (mariadb/memory)")
    db_host: str = Field("localhost", description="MariaDB hostname")
    db_port: int = Field(3306, ge=1, le=65535, description="MariaDB port")
    db_name: str = Field("migratekit_oma", description="database name (created when missing)")
    db_user: str = Field("oma_user", description="database username")
    db_pass: str = Field("", repr=False, description="database password")
    auth_enabled: bool = Field(True, description="bearer authentication on /api/v1 (false: development only)")

    # Ours.
    host: str = Field("0.0.0.0", description="HTTP listen address")
    nats_url: str = Field("", description="NATS server URL; empty starts an embedded nats-server")
    nats_user: str = Field("", description="user of an external NATS server")
    nats_password: str = Field("", repr=False, description="password of an external NATS server")
    allow_ephemeral_with_external_nats: bool = Field(
        False, description="let a memory database run with an external NATS (throwaway tests only)")
    data_dir: Path = Field(default_factory=default_data_dir, description="local state: keys, export state")
    metrics_port: int | None = Field(None, ge=0, le=65535, description="/metrics port of a lone service")
    request_timeout: float = Field(30.0, gt=0, description="Bus request timeout (seconds)")
    startup_timeout: float = Field(60.0, gt=0, description="How long start-up waits for NATS and the DB")
    log_format: Literal["json", "logfmt"] = Field("json", description="log lines: json or logfmt")
    db_ping_interval: float = Field(15.0, gt=0, description="seconds between database checks (oma_db_up)")
    processes: str = Field("auto", pattern=r"^(auto|[1-9][0-9]?)$",
                           description="oma-api processes: 1 = all in one; N = the services and N-1 gateway "
                                       "workers; auto = 2 on two cores or more")

    # The demo (`oma-api -demo`, oma/demo.py, docs/demo.md).
    demo: bool = Field(False, description="run the demo: the appliance with a synthetic vCenter, the VMA and "
                                          "CloudStack simulators; the GUI says on every page it is a demo")
    demo_vma_url: str = Field("", max_length=255, description="the demo's VMA simulator (set by -demo): where "
                              "POST /api/v1/demo/mutate sends a guest write")

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
    secret_key_file: Path | None = Field(None, description="key that encrypts secrets at rest; "
                                         "default DATA_DIR/secret.key")

    # Cloud (CloudStack).
    cloud_backend: str = Field("ossea", description="target cloud backend (plugin)")
    cloud_timeout: float = Field(30.0, gt=0, description="cloud API request timeout (seconds)")
    cloud_job_timeout: float = Field(120.0, gt=0, description="how long a cloud async job may take (seconds)")
    cloud_retries: int = Field(5, ge=1, description="attempts of a transient cloud failure (530, timeouts)")
    cloud_retry_backoff: float = Field(0.2, ge=0, description="first retry delay (seconds), doubled each time")
    cleanup_retry_interval: float = Field(30.0, gt=0, description="seconds between retries of failed cleanups")
    cloud_poll_interval: float = Field(0.5, gt=0, description="seconds between polls of a failover's cloud jobs")

    # Failover.
    failover_stub_template: str = Field("oma-failover-stub", description="template (name or id) of the stub VM")
    failover_shutdown_timeout: float = Field(120.0, ge=0, le=3600,
                                             description="seconds a guest shutdown may take before a hard power-off")
    failover_final_sync_timeout: float = Field(3600.0, gt=0, le=86400, description="seconds a live cutover's "
                                               "final sync (after the source power-off) may take before it fails")
    failover_quiesce_timeout: float = Field(3600.0, gt=0, le=86400, description="seconds a test failover waits "
                                            "for the VM's sync in flight to finish before it snapshots the replica")

    # Scheduler (protection groups and their schedules; docs/scheduler.md).
    scheduler_tick: float = Field(5.0, gt=0, description="seconds between the scheduler's rounds (due "
                                  "schedules, starting queued VMs, following running syncs)")
    scheduler_min_interval: float = Field(60.0, gt=0, description="shortest schedule interval accepted "
                                          "(seconds); lowered in tests")
    scheduler_start_lease: float = Field(300.0, gt=0, description="seconds a VM claimed by a scheduler may "
                                         "stay `starting`; after it, the VM is recorded failed, never started twice")

    # Inventory.
    inventory_source: str = Field("vsphere", description="inventory source backend (plugin)")
    vsphere_timeout: float = Field(60.0, gt=0, description="vCenter login and per-read timeout (seconds)")

    # VM contexts (the read model's durable consumer).
    contexts_consumer: str = Field("context_aggregator-readmodel", description="durable consumer of the read model")
    contexts_deliver_policy: Literal["all", "new"] = Field("all", description="a new consumer replays all "
                                                           "events or only new ones")
    contexts_ack_wait: float = Field(30.0, gt=0, description="seconds before an unacked event is redelivered")
    contexts_max_deliver: int = Field(5, ge=1, description="deliveries before an event is dead-lettered")
    contexts_cache_mib: int = Field(32, ge=0, description="MiB of serialized VM-context replies kept by the "
                                    "aggregator and by each gateway process (0: none); a detail reply is ~10 KB, so "
                                    "32 MiB holds ~3,000 VMs")
    contexts_nak_delay: float = Field(2.0, ge=0, description="seconds before a failed event is redelivered")
    contexts_batch: int = Field(250, ge=1, description="events applied per transaction")

    # Exports (the NBD server's own settings are the `nbd` plugin's: plugins/nbd/settings.py).
    export_backend: str = Field("nbdkit", description="NBD export backend (plugin): nbdkit or nbd-server")
    nbd_keep_running: bool = Field(False, description="leave the NBD server (and its connections) up on stop")
    export_reconcile_interval: float = Field(300.0, ge=0, description="seconds between reconciles; 0 = off")
    export_batch_wait: float = Field(0.5, ge=0, description="how long an export change waits to share a reload")

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
    device_resolver: str = Field("by-id", description="device resolver backend (plugin)")
    device_wait: float = Field(60.0, gt=0, description="seconds an attached volume may take to appear as a device")
    provision_wait: float = Field(120.0, ge=0, description="seconds POST waits for ready_for_sync before answering 202")
    max_attached_disks: int = Field(32, ge=1, description="volumes attached to the OMA VM at once; more jobs wait")
    keep_failed_resources: bool = Field(False, description="keep a failed job's volumes and exports")
    # Replication under faults (docs/replication.md "Restart and faults").
    cloud_inflight_grace: float | None = Field(None, ge=0, description="seconds a cloud call sent before a "
                                               "restart may still take effect; unset = cloud_job_timeout")
    volume_sweep_interval: float = Field(300.0, ge=0, description="seconds between sweeps for orphaned "
                                         "OMA volumes; 0 = off")
    dependency_wait: float = Field(60.0, ge=0, description="how long a service waits at start-up for the "
                                   "services it needs to answer $SRV.PING")
    provision_lease: float = Field(15.0, gt=0, description="seconds a replication process's claim on a "
                                   "provisioning job lasts unrenewed; another copy resumes the job after it")

    @model_validator(mode="before")
    @classmethod
    def _fold_sections(cls, data: Any) -> Any:
        """`nbd_port=...` (keyword or flag) is the `nbd` section's `port`, over the environment's."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for section, model in cls._sections.items():
            given = {f: data.pop(f"{section}_{f}") for f in model.model_fields if f"{section}_{f}" in data}
            if given:
                current = data.get(section) or {}
                current = current.model_dump(exclude_unset=True) if isinstance(current, PluginSettings) else current
                data[section] = {**current, **given}
        return data

    @field_validator("db_type")
    @classmethod
    def _lower(cls, v: str) -> str:
        return v.strip().lower()

    @property
    def secret_key_path(self) -> Path:
        return self.secret_key_file or self.data_dir / "secret.key"


def compose(sections: dict[str, type[PluginSettings]]) -> type[CoreSettings]:
    """The Settings class: the core's fields plus a field per plugin section."""
    clash = sorted(set(sections) & set(CoreSettings.model_fields))
    if clash:
        raise TypeError(f"settings sections {clash} are core settings' names")
    fields: dict[str, Any] = {name: (model, Field(default_factory=model, description=model.__doc__ or name))
                              for name, model in sections.items()}
    cls = create_model("Settings", __base__=CoreSettings, __module__=__name__, **fields)
    cls._sections = dict(sections)
    return cls


def _plugin_sections() -> dict[str, type[PluginSettings]]:
    from oma.shared.plugins import get_plugin_manager, settings_sections
    return settings_sections(get_plugin_manager(settings=True))


Settings = compose(_plugin_sections())


@dataclass(frozen=True)
class Variable:
    env: str            # OMA_NBD_PORT
    name: str           # nbd_port: the keyword, and the name the docs' tables use
    path: tuple[str, ...]  # ("nbd", "port"): where it is in the tree
    field: FieldInfo
    section: str = ""   # the plugin section, "" for the core's


def variables(cls: type[CoreSettings] | None = None) -> list[Variable]:
    """Every OMA_ variable of the tree: the core's, then the plugin sections' by name."""
    cls = cls or Settings
    out = [Variable(f"OMA_{n.upper()}", n, (n,), f) for n, f in CoreSettings.model_fields.items()]
    for section, model in sorted(cls._sections.items()):
        out += [Variable(f"OMA_{section.upper()}_{n.upper()}", f"{section}_{n}", (section, n), f, section)
                for n, f in model.model_fields.items()]
    return out


def environ(settings: CoreSettings) -> dict[str, str]:
    """The settings as OMA_ environment variables (for a child process), unset ones left out."""
    dumped = settings.model_dump(mode="json")
    env = {}
    for var in variables(type(settings)):
        value: Any = dumped
        for key in var.path:
            value = value[key]
        if value is not None:
            env[var.env] = str(value).lower() if isinstance(value, bool) else str(value)
    return env


def _default(field: FieldInfo) -> str:
    if field.default_factory is not None:
        return {"default_data_dir": "/var/lib/oma, else $XDG_DATA_HOME/oma"}.get(
            getattr(field.default_factory, "__name__", ""), "(computed)")
    value = field.default
    if value is None or value == "":
        return "(empty)"
    return str(value).lower() if isinstance(value, bool) else str(value)


def markdown(cls: type[CoreSettings] | None = None) -> str:
    """The table of every OMA_ variable (docs/settings.md between its markers)."""
    rows = ["| variable | default | description |", "| --- | --- | --- |"]
    for var in variables(cls):
        where = f" (plugin section `{var.section}`)" if var.section else ""
        text = (var.field.description or "").replace("|", "\\|")
        rows.append(f"| `{var.env}` | {_default(var.field).replace('|', '/')} | {text}{where} |")
    return "\n".join(rows) + "\n"


# The command-line flags: single-dash long flags as in the seed (`--flag` works too), each a core
# setting's name with dashes; the help is the setting's description and default.
FLAGS = ("port", "debug", "db-type", "db-host", "db-port", "db-name", "db-user", "db-pass", "auth-enabled",
         "nats-url", "host", "data-dir", "metrics-port", "demo")


def flag_help(flag: str) -> str:
    field = CoreSettings.model_fields[flag.replace("-", "_")]
    default = _default(field)
    return field.description if default == "(empty)" else f"{field.description} (default {default})"


BOOL_FLAGS = {"debug", "auth-enabled", "demo"}


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
    flags = {k: flag_help(k) for k in FLAGS if only is None or k in only}
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
        field = "_".join(str(part) for part in err["loc"]) or "?"  # ("nbd", "port") -> nbd_port
        flag = field.replace("_", "-")
        source = f"flag -{flag}" if field in args else f"setting OMA_{field.upper()}"
        raise FlagError(f"{prog}: invalid value for {source}: {err['msg']}") from None


# docs/settings.md holds the generated table between these markers (tests/test_docs_settings.py).
DOC = Path(__file__).resolve().parent.parent / "docs" / "settings.md"
BEGIN, END = "<!-- generated: python3 -m oma.shared.settings --markdown --write -->", "<!-- end generated -->"


def with_table(text: str, table: str) -> str:
    """`text` with the part between BEGIN and END replaced by `table`."""
    head, sep, rest = text.partition(BEGIN)
    _, sep2, tail = rest.partition(END)
    if not (sep and sep2):
        raise ValueError(f"the markers {BEGIN!r} and {END!r} are missing")
    return f"{head}{BEGIN}\n{table}{END}{tail}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python3 -m oma.shared.settings",
                                     description="print (or write into docs/settings.md) every OMA_ variable")
    parser.add_argument("--markdown", action="store_true", required=True, help="a Markdown table")
    parser.add_argument("--write", action="store_true", help=f"replace the table in {DOC}")
    args = parser.parse_args(argv)
    table = markdown()
    if args.write:
        DOC.write_text(with_table(DOC.read_text(), table))
    else:
        print(table, end="")


if __name__ == "__main__":
    # Through the imported module, whose Settings is the one the rest of the code sees.
    from oma.shared.settings import main as _main
    _main()
