"""The `nbd` plugin's settings: `OMA_NBD_<FIELD>`, `settings.nbd.<field>` (docs/exporters.md).
Loaded while shared.settings is built: imports pydantic and shared.hookspecs only."""
from __future__ import annotations

from pathlib import Path

from pydantic import Field

from oma.shared.hookspecs import PluginSettings, Register, hookimpl


class NbdSettings(PluginSettings):
    port: int = Field(10809, ge=1, le=65535, description="NBD server port")
    listen_addr: str = Field("127.0.0.1", description="NBD listen address; beyond loopback only with nbd_tls")
    binary: str | None = Field(None, description="NBD server command; default nbdkit / nbd-server on PATH")
    user: str = Field("root", description="nbd-server: user that opens the devices ('' = none)")
    group: str = Field("root", description="nbd-server: group that opens the devices (production: disk)")
    base_config: Path | None = Field(None, description="nbd-server: config template (ops/nbd/nbd-server.conf)")
    attach_pidfile: Path | None = Field(None, description="attach to a server already running with this pid file")
    watchdog_interval: float = Field(1.0, ge=0, description="seconds between liveness checks; 0 disables")
    watchdog_max_backoff: float = Field(30.0, gt=0, description="longest wait between failed restarts")
    reload_debounce: float = Field(0.05, ge=0, description="changes within this window share one reload")
    start_timeout: float = Field(10.0, gt=0, description="how long a start waits for the NBD handshake")
    check_timeout: float = Field(10.0, gt=0, description="timeout of a real NBD_OPT_GO export check")
    tls: bool = Field(False, description="nbdkit: require TLS with a pre-shared key (--tls=require --tls-psk)")
    tls_username: str = Field("oma", pattern=r"^[A-Za-z0-9._-]{1,64}$", description="PSK identity")
    tls_psk_file: Path | None = Field(None, description="PSK file (username:hexkey); default "
                                      "DATA_DIR/exports/nbd-tls.psk, generated 0600 when missing")
    tls_client_psk_file: str | None = Field(None, description="where the VMA keeps its copy of the PSK "
                                            "file (tls-psk-file in export URIs); default: nbd_tls_psk_file")


@hookimpl
def oma_register_settings(register: Register) -> None:
    register("nbd", NbdSettings)
