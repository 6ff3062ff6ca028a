"""`oma-admin`: operator commands against the configured database (and bus, where needed).

`appliance ...` works on the auth database (-db-* flags, the master key in -data-dir);
`contexts rebuild` asks the running appliance's bus: a local `oma-api` is found through the
nats-admin.json it keeps in its data dir, an external NATS through -nats-url with the admin user
in OMA_NATS_USER / OMA_NATS_PASSWORD.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys

from oma.shared import natsauth
from oma.shared.settings import FlagError, Settings, build_parser, settings_from_flags

# The only flags a command here reads, with what they mean here.
FLAGS = ("db-type", "db-host", "db-port", "db-name", "db-user", "db-pass")
FLAG_HELP = {
    "data-dir": "oma-api's data dir: the master key, and the running appliance's bus (nats-admin.json)",
    "nats-url": "an external NATS (as admin: OMA_NATS_USER / OMA_NATS_PASSWORD); default: the local oma-api's",
}
COMMANDS = """commands:
  appliance add NAME [TOKEN] [--api-url URL]
                              register (or re-key) an appliance; prints its token once
  appliance list              list the registered appliances
  appliance revoke NAME       revoke an appliance; its sessions end now
  contexts rebuild            replay OMA_EVENTS into the VM-context read model
  user add NAME [--role R]    add a web GUI operator (role viewer or operator); password asked
  user list                   list the web GUI operators
  user passwd NAME            set an operator's password (asked); their sessions end now
  user remove NAME            remove an operator; their sessions end now
The password is asked on the terminal, or read from the first line of standard input.
"""
COMMAND_KEYS = ("command", "action", "name", "token", "role", "api_url")


def build_admin_parser() -> argparse.ArgumentParser:
    """Subcommands, each accepting the flags before or after it."""
    flags = build_parser("oma-admin", FLAG_HELP, only=FLAGS, add_help=False)
    parser = build_parser("oma-admin", only=(), parents=[flags], description=__doc__.splitlines()[0],
                          epilog=COMMANDS, formatter_class=argparse.RawDescriptionHelpFormatter)

    def group(parent: argparse.ArgumentParser, dest: str) -> argparse._SubParsersAction:
        return parent.add_subparsers(dest=dest, required=True, metavar=dest.upper())

    def leaf(sub: argparse._SubParsersAction, name: str, help_text: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help_text, description=help_text, parents=[flags])

    commands = group(parser, "command")
    appliance_cmd = group(commands.add_parser("appliance", help="VMA appliances that may log in"), "action")
    add = leaf(appliance_cmd, "add", "register (or re-key) an appliance; prints its token once")
    add.add_argument("name", help="appliance id, as the VMA logs in with")
    add.add_argument("token", nargs="?", help="the token to set (default: a new random one)")
    add.add_argument("--api-url", "-api-url", dest="api_url", default=None,
                     help="the VMA's API as OMA reaches it (default http://127.0.0.1:9081, the reverse tunnel)")
    leaf(appliance_cmd, "list", "list the registered appliances")
    leaf(appliance_cmd, "revoke", "revoke an appliance; its sessions end now").add_argument(
        "name", help="appliance id")
    contexts_cmd = group(commands.add_parser("contexts", help="the VM-context read model"), "action")
    leaf(contexts_cmd, "rebuild", "replay OMA_EVENTS into the VM-context read model")
    user_cmd = group(commands.add_parser("user", help="people who may sign in to the web GUI"), "action")
    user_add = leaf(user_cmd, "add", "add a web GUI operator; the password is asked")
    user_add.add_argument("name", help="username")
    user_add.add_argument("--role", choices=("viewer", "operator"), default="viewer",
                          help="viewer: looks only; operator: may also start replications (default viewer)")
    leaf(user_cmd, "list", "list the web GUI operators")
    leaf(user_cmd, "passwd", "set an operator's password; their sessions end now").add_argument("name", help="username")
    leaf(user_cmd, "remove", "remove an operator; their sessions end now").add_argument("name", help="username")
    return parser


USAGE = build_admin_parser().format_usage().strip()


async def _auth_db(settings: Settings):
    from oma.services.auth.app import AuthService
    from oma.shared.db import run_migrations, sessionmaker
    from oma.shared.plugins import get_backend, get_plugin_manager

    if settings.db_type == "memory":
        raise FlagError("oma-admin: the memory database lives inside oma-api; use -db-type mariadb "
                        "(or OMA_APPLIANCE_TOKENS for memory mode)")
    storage = get_backend(get_plugin_manager(), "storage", settings.db_type).factory(settings)
    engine = await storage.create_engine("auth")
    await run_migrations(engine, "auth", AuthService.migrations_dir())
    return engine, sessionmaker(engine)


async def appliance(settings: Settings, action: str, name: str = "", token: str | None = None,
                    api_url: str | None = None) -> int:
    from oma.services.auth import service
    from oma.shared.crypto import Keyring

    engine, sessions = await _auth_db(settings)
    try:
        keys = Keyring.from_file(settings.secret_key_path)
        async with sessions.begin() as db:
            if action == "add":
                token = token or service.new_appliance_token()
                await service.upsert_appliance(db, keys, name, token, api_url)
                print(f"appliance {name} registered; token (shown once): {token}")
            elif action == "list":
                for row in await service.list_appliances(db):
                    print(json.dumps(row))
            else:  # revoke
                await service.revoke_appliance(db, name)
                print(f"appliance {name} revoked; its sessions end now "
                      f"(gateways drop cached verifications within {settings.auth_cache_ttl:g}s)")
    finally:
        await engine.dispose()
    return 0


def read_password() -> str:
    """Never from argv (other users see it in `ps`): the terminal, asked twice, or stdin's first line."""
    import getpass

    if not sys.stdin.isatty():
        return sys.stdin.readline().rstrip("\r\n")
    first = getpass.getpass("Password: ")
    if getpass.getpass("Again: ") != first:
        raise FlagError("oma-admin: the passwords differ")
    return first


async def user(settings: Settings, action: str, name: str = "", role: str = "viewer") -> int:
    from oma.services.auth import operators

    if action in ("add", "passwd"):  # validated before asking, so a bad name fails at once
        operators.validate(name)
        password = read_password()
    engine, sessions = await _auth_db(settings)
    try:
        async with sessions.begin() as db:
            if action == "add":
                await operators.add_operator(db, name, password, role)
                print(f"operator {name} added with role {role}")
            elif action == "list":
                for row in await operators.list_operators(db):
                    print(json.dumps(row))
            elif action == "passwd":
                await operators.set_password(db, name, password)
                print(f"password of {name} set; their sessions end now")
            else:  # remove
                await operators.remove_operator(db, name)
                print(f"operator {name} removed; their sessions end now")
    finally:
        await engine.dispose()
    return 0


def admin_bus(settings: Settings) -> natsauth.AdminAccess:
    """-nats-url with the settings' user, else the running oma-api's embedded server."""
    if settings.nats_url:
        return natsauth.AdminAccess(settings.nats_url, settings.nats_user, settings.nats_password)
    found = natsauth.read_admin_file(settings.data_dir)
    if found is None:
        raise FlagError(f"oma-admin: no running oma-api found ({natsauth.admin_file(settings.data_dir)} "
                        "is missing): give its -data-dir, or -nats-url with OMA_NATS_USER/OMA_NATS_PASSWORD")
    return found


async def contexts(settings: Settings, action: str) -> int:
    from oma.shared import bus as busmod
    from oma.shared.subjects import Contexts

    url, user, password = admin_bus(settings)
    nc = await busmod.connect(url, "oma-admin", user=user, password=password, timeout=10)
    try:
        result = await busmod.Bus(nc).call(Contexts.REBUILD, {}, timeout=3600)
    finally:
        await nc.drain()
    print(json.dumps(result))
    return 0


def main(argv: list[str]) -> None:
    from oma.shared.errors import OmaError
    from oma.shared.logging import setup_logging

    try:
        args = vars(build_admin_parser().parse_args(argv))
        words = {k: args.pop(k) for k in COMMAND_KEYS if k in args}
        settings = settings_from_flags(args, "oma-admin")
    except FlagError as exc:
        print(exc.message, file=sys.stderr)
        print(USAGE, file=sys.stderr)
        sys.exit(2)
    setup_logging(settings.debug, settings.log_format)
    commands = {"appliance": appliance, "contexts": contexts, "user": user}
    try:
        sys.exit(asyncio.run(commands[words.pop("command")](settings, **words)))
    except FlagError as exc:
        print(exc.message, file=sys.stderr)
        sys.exit(2)
    except OmaError as exc:
        print(f"oma-admin: {exc.error}: {exc.details}", file=sys.stderr)
        sys.exit(1)
