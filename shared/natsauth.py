"""NATS users and permissions: the one source for oma-api's embedded nats-server and for
ops/nats/nats-server.conf (compose, split installs).

Every client has its own user; each password is `$NATS_PASSWORD_<USER>` in nats-server's
environment (compose passes them from .env; oma-api generates them on each start). A user's
permissions name only the subjects and JetStream API calls it needs; anonymous clients are
refused because users exist and there is no `no_auth_user`.

After changing a list here, regenerate the ops file (a test compares them):
    python -m oma.shared.natsauth > ops/nats/nats-server.conf
"""
from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from oma.shared.settings import SERVICES
from oma.shared.subjects import (EVENTS_STREAM, Auth, Config, Contexts, Exports, Failover, Inventory, Replication,
                                 Scheduler)

USERS = ("gateway", *SERVICES, "admin")
ADMIN = "admin"

# JetStream API calls (subjects under $JS.API, see nats-py's js/manager.py).
JS = "$JS.API"
STREAM_INFO = f"{JS}.STREAM.INFO.{EVENTS_STREAM}"
STREAM_CREATE = f"{JS}.STREAM.CREATE.{EVENTS_STREAM}"  # shared/bus.py ensure_stream, when missing
# The read model's consumers: its durable one and the throw-away ones of a rebuild, which have
# random names (a wildcard matches whole tokens only, so the names cannot be narrowed further).
CONSUMER_API = [f"{JS}.CONSUMER.{verb}.{EVENTS_STREAM}.*" for verb in ("CREATE", "INFO", "DELETE", "MSG.NEXT")]
ACKS = f"$JS.ACK.{EVENTS_STREAM}.>"
# Long enough for the slowest caller (oma-admin contexts rebuild waits up to an hour).
RESPONSES = '{ max: 1, expires: "1h" }'


@dataclass(frozen=True)
class Permissions:
    publish: list[str]
    subscribe: list[str]
    deny_publish: list[str] = field(default_factory=list)
    responses: bool = False  # may reply to requests it received
    comment: str = ""


def inbox(user: str) -> str:
    """Replies arrive on a per-user inbox (shared/bus.py sets the prefix): nobody reads another's."""
    return f"_INBOX_{user}.>"


def _service(name: str, *extra: str, comment: str = "") -> Permissions:
    """A service: answers its own subjects (queue group, nats.micro discovery on $SRV), publishes
    its own events and makes sure the events stream exists; nothing else unless listed."""
    return Permissions(publish=[*extra, f"oma.evt.{name}.>", STREAM_INFO, STREAM_CREATE],
                       subscribe=[f"oma.{name}.>", "$SRV.>", inbox(name)], responses=True, comment=comment)


def permissions() -> dict[str, Permissions]:
    perms = {
        "gateway": Permissions(
            publish=["oma.auth.session.>", "oma.auth.user.>", Auth.APPLIANCE_ACTION, "oma.config.ossea.>",
                     "oma.inventory.>", "oma.replication.>", "oma.failover.>", "oma.scheduler.>",
                     Contexts.LIST, Contexts.GET, "oma.*.health.check", "$SRV.PING.>"],
            deny_publish=["oma.config.credentials.>", Inventory.CONNECTION, Inventory.POWER,
                          Replication.HANDOVER, Replication.RECLAIM, Replication.QUIESCE, Replication.RESUME],
            # Replies, session revocations (cache eviction) and context updates (live views).
            subscribe=[inbox("gateway"), "oma.evt.auth.>", "oma.live.context_aggregator.>"],
            comment="The only caller of the public request subjects; never the decrypted credentials,\n"
                    "never the source VMs' power nor the replica's hand-over (failover's)."),
        **{name: _service(name) for name in ("auth", "export_manager")},
        "inventory": _service(
            "inventory", Auth.APPLIANCE_GET,
            comment="Asks auth for the API URL of the VMA a vCenter is reached through."),
        "config": _service(
            "config", Replication.USING_CONFIG, Failover.USING_CONFIG,
            comment="Asks replication and failover which jobs use a configuration before deleting it."),
        "replication": _service(
            "replication", Config.CREDENTIALS, Exports.ENSURE, Exports.DEACTIVATE, Exports.READY, Inventory.LIST,
            Inventory.CONNECTION, Auth.APPLIANCE_SEEN, Failover.MAPPINGS, "$SRV.PING.config",
            "$SRV.PING.export_manager",
            comment="The only caller of the decrypted cloud and vCenter credentials; ensures/deactivates\n"
                    "exports (asking first whether the NBD server serves); lists the inventory to check a\n"
                    "request's vcenter_host; tells auth whether a VMA answered; waits at start for the\n"
                    "services it needs ($SRV.PING); reads the network mappings (preflight)."),
        "scheduler": _service(
            "scheduler", Replication.CREATE, Replication.GET, Replication.PREFLIGHT, Inventory.LIST,
            comment="Starts the syncs of protection groups and follows them; asks replication for preflight;\n"
                    "finds the groups' VMs in the inventory."),
        "failover": _service(
            "failover", Config.CREDENTIALS, Replication.LIST, Replication.GET, Replication.CREATE,
            Replication.HANDOVER, Replication.RECLAIM, Replication.QUIESCE, Replication.RESUME, Inventory.POWER,
            Exports.ENSURE, Exports.DEACTIVATE, Scheduler.GROUPS,
            comment="Reads the replica volumes of a VM's latest replication job and runs the live cutover's\n"
                    "final sync; pauses the VM's syncs around a test failover's snapshots; needs the cloud\n"
                    "credentials; powers the source VM off and on; hands the replica over to the new VM and\n"
                    "takes it back; releases and restores its exports; reads the VM's protection group for\n"
                    "its failover defaults."),
        "context_aggregator": _service(
            "context_aggregator", "oma.live.context_aggregator.>", *CONSUMER_API, ACKS,
            comment="The only reader of the stream: its consumers on OMA_EVENTS, live context updates."),
        ADMIN: Permissions(
            publish=[Contexts.REBUILD, f"{JS}.>"], subscribe=[inbox(ADMIN)],
            comment="oma-admin: `contexts rebuild`, and the only user that may purge, delete or\n"
                    "change streams (the whole JetStream API)."),
    }
    return {user: perms[user] for user in USERS}


def password_var(user: str) -> str:
    return f"NATS_PASSWORD_{user.upper()}"


def _list(items: list[str]) -> str:
    return "[" + ", ".join(json.dumps(s) for s in items) + "]"


def render_authorization() -> str:
    """The `authorization` block, passwords as environment references."""
    out = ["authorization {", "  users = ["]
    for user, p in permissions().items():
        out.append("    {")
        out += [f"      # {line}" for line in p.comment.splitlines()]
        out += [f"      user: {user}", f"      password: ${password_var(user)}", "      permissions: {"]
        pub = f"allow: {_list(p.publish)}" + (f", deny: {_list(p.deny_publish)}" if p.deny_publish else "")
        out.append(f"        publish: {{ {pub} }}")
        out.append(f"        subscribe: {{ allow: {_list(p.subscribe)} }}")
        if p.responses:
            out.append(f"        allow_responses: {RESPONSES}")
        out += ["      }", "    }"]
    out += ["  ]", "}"]
    return "\n".join(out) + "\n"


OPS_HEADER = """\
# nats-server configuration of an OMA deployment (compose.yaml mounts it at /etc/nats/nats-server.conf).
# GENERATED from shared/natsauth.py: python -m oma.shared.natsauth > ops/nats/nats-server.conf
# (oma-api's embedded nats-server uses the same users and permissions; docs/deployment.md).
#
# JetStream holds the OMA_EVENTS stream. Every client has its own user; the passwords come from
# the environment of the nats-server process ($NATS_PASSWORD_<USER>; compose.yaml passes them
# from .env). An unset variable makes nats-server refuse to start: no user ever has an empty password.
# nats-server parses a variable's value as configuration, so a password must be letters and digits
# starting with a letter (a leading digit, a space or ";" break the parse, "#" may cut it short):
#   python3 -c 'import secrets; print("n" + secrets.token_hex(24))'

server_name: oma-nats
listen: 0.0.0.0:4222
http_port: 8222          # /healthz and /varz for the container healthcheck; not published
max_payload: 8MB

jetstream {
  store_dir: /data/jetstream
  max_file_store: 10GB
}

"""

# The embedded server takes address, port and store from flags; the default 1 MB payload is too
# small for a large inventory's reply.
EMBEDDED_BASE = "max_payload: 8MB\n"


def render_ops_conf() -> str:
    return OPS_HEADER + render_authorization()


def render_embedded_conf(secured: bool) -> str:
    return EMBEDDED_BASE + ("\n" + render_authorization() if secured else "")


def generate_passwords() -> dict[str, str]:
    """Fresh random passwords; letters and digits, a letter first (nats-server parses the value)."""
    return {user: "n" + secrets.token_hex(24) for user in USERS}


def password_env(passwords: dict[str, str]) -> dict[str, str]:
    return {password_var(user): pw for user, pw in passwords.items()}


# --- how oma-admin finds a running oma-api's bus ---------------------------------------------
# oma-api writes the embedded server's URL and the admin user's password to this file (0600) in
# its data dir at start and removes it on stop; the services' passwords never leave the process.
ADMIN_FILE = "nats-admin.json"


class AdminAccess(NamedTuple):
    url: str
    user: str
    password: str


def admin_file(data_dir: Path) -> Path:
    return Path(data_dir) / ADMIN_FILE


def write_admin_file(data_dir: Path, url: str, password: str) -> Path:
    path = admin_file(data_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    # Created 0600 (never world-readable for an instant), then renamed into place.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"url": url, "user": ADMIN, "password": password}, f)
    os.replace(tmp, path)
    return path


def read_admin_file(data_dir: Path) -> AdminAccess | None:
    try:
        data = json.loads(admin_file(data_dir).read_text())
        return AdminAccess(data["url"], data["user"], data["password"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def remove_admin_file(data_dir: Path, url: str) -> None:
    """Only our own: another oma-api on the same data dir may have written it since."""
    found = read_admin_file(data_dir)
    if found is not None and found.url == url:
        admin_file(data_dir).unlink(missing_ok=True)


if __name__ == "__main__":
    print(render_ops_conf(), end="")
