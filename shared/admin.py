"""`oma-admin`: operator commands against the configured database (and bus, where needed).

    oma-admin [db flags] appliance add NAME [TOKEN]   register (or re-key) an appliance; prints the token once
    oma-admin [db flags] appliance list
    oma-admin [db flags] appliance revoke NAME
    oma-admin -nats-url URL contexts rebuild           replay OMA_EVENTS into the VM-context read model
"""
from __future__ import annotations

import asyncio
import json
import sys

from shared.settings import FlagError, Settings, load_settings

USAGE = __doc__.strip()


async def _auth_db(settings: Settings):
    from services.auth.app import AuthService
    from shared.db import run_migrations, sessionmaker
    from shared.plugins import get_backend, get_plugin_manager

    if settings.db_type == "memory":
        raise FlagError("oma-admin: the memory database lives inside oma-api; use -db-type mariadb "
                        "(or OMA_APPLIANCE_TOKENS for memory mode)")
    storage = get_backend(get_plugin_manager(), "storage", settings.db_type).factory(settings)
    engine = await storage.create_engine("auth")
    await run_migrations(engine, "auth", AuthService.migrations)
    return engine, sessionmaker(engine)


async def appliance(settings: Settings, words: list[str]) -> int:
    from services.auth import service
    from shared.crypto import Keyring

    action, args = words[0] if words else "", words[1:]
    engine, sessions = await _auth_db(settings)
    try:
        keys = Keyring.from_file(settings.secret_key_path)
        async with sessions.begin() as db:
            if action == "add" and len(args) in (1, 2):
                token = args[1] if len(args) == 2 else service.new_appliance_token()
                await service.upsert_appliance(db, keys, args[0], token)
                print(f"appliance {args[0]} registered; token (shown once): {token}")
            elif action == "list" and not args:
                for row in await service.list_appliances(db):
                    print(json.dumps(row))
            elif action == "revoke" and len(args) == 1:
                await service.revoke_appliance(db, args[0])
                print(f"appliance {args[0]} revoked; its sessions end now "
                      f"(gateways drop cached verifications within {settings.auth_cache_ttl:g}s)")
            else:
                print(USAGE, file=sys.stderr)
                return 2
    finally:
        await engine.dispose()
    return 0


async def contexts(settings: Settings, words: list[str]) -> int:
    from shared import bus as busmod
    from shared.subjects import Contexts

    if words != ["rebuild"]:
        print(USAGE, file=sys.stderr)
        return 2
    if not settings.nats_url:
        raise FlagError("oma-admin: contexts rebuild needs -nats-url (the running appliance's bus)")
    nc = await busmod.connect(settings.nats_url, "oma-admin", user=settings.nats_user,
                              password=settings.nats_password, timeout=10)
    try:
        result = await busmod.Bus(nc).call(Contexts.REBUILD, {}, timeout=3600)
    finally:
        await nc.drain()
    print(json.dumps(result))
    return 0


def main(argv: list[str]) -> None:
    from shared.errors import OmaError
    from shared.logging import setup_logging

    try:
        settings, pos = load_settings(argv, prog="oma-admin", positional=("words",))
    except FlagError as exc:
        print(exc.message, file=sys.stderr)
        print(USAGE, file=sys.stderr)
        sys.exit(2)
    setup_logging(settings.debug, settings.log_format)
    words = pos["words"]
    commands = {"appliance": appliance, "contexts": contexts}
    if words[0] not in commands:
        print(USAGE, file=sys.stderr)
        sys.exit(2)
    try:
        sys.exit(asyncio.run(commands[words[0]](settings, words[1:])))
    except FlagError as exc:
        print(exc.message, file=sys.stderr)
        sys.exit(2)
    except OmaError as exc:
        print(f"oma-admin: {exc.error}: {exc.details}", file=sys.stderr)
        sys.exit(1)
