"""Console scripts: `oma-api`, `oma-service NAME`, `oma-admin ...`."""
from __future__ import annotations

import sys

from oma.loop import run as run_loop
from oma.shared.logging import setup_logging
from oma.shared.plugins import BackendNotFound
from oma.shared.settings import SERVICES, FlagError, load_settings


def _fail(message: str, code: int = 2) -> None:
    print(message.splitlines()[0] if message else "failed", file=sys.stderr)
    sys.exit(code)


EPHEMERAL_WITH_EXTERNAL_NATS = (
    "-db-type memory with -nats-url: the memory database is lost at exit while the external NATS keeps "
    "the event stream, so after a restart the read model would show jobs the services no longer have; "
    "use -db-type mariadb, or no -nats-url (an embedded NATS that is as ephemeral), or set "
    "OMA_ALLOW_EPHEMERAL_WITH_EXTERNAL_NATS=true for a throwaway test")


def _run(coro_factory, prog: str, argv: list[str] | None, positional: tuple[str, ...] = ()) -> None:
    try:
        settings, pos = load_settings(argv, prog=prog, positional=positional)
    except FlagError as exc:
        _fail(exc.message)
        return
    if (settings.db_type == "memory" and settings.nats_url and pos.get("name") != "gateway"  # no database
            and not settings.allow_ephemeral_with_external_nats):
        _fail(f"{prog}: {EPHEMERAL_WITH_EXTERNAL_NATS}")
    setup_logging(settings.debug, settings.log_format)
    try:
        run_loop(coro_factory(settings, **pos))
    except FlagError as exc:
        _fail(exc.message)
    except BackendNotFound as exc:
        _fail(f"{prog}: {exc.message}")
    except SystemExit:
        raise
    except Exception as exc:  # noqa: BLE001 - start-up failures: one clear line, non-zero exit
        from oma.shared.errors import OmaError
        if isinstance(exc, OmaError):
            _fail(f"{prog}: {exc.error}: {exc.details}", 1)
        raise


def oma_api(argv: list[str] | None = None) -> None:
    """The whole appliance in one process; with -demo, beside simulators and ready to migrate."""
    from oma.runner import run_all

    def start(settings):
        if settings.demo:
            from oma.demo import run_demo
            return run_demo(settings)
        return run_all(settings)
    _run(start, "oma-api", argv)


def oma_service(argv: list[str] | None = None) -> None:
    """One service alone (as compose.yaml runs them): oma-service NAME [flags]."""
    from oma.runner import run_one
    argv = sys.argv[1:] if argv is None else argv
    names = (*SERVICES, "gateway")
    if not argv or argv[0] not in names:
        _fail(f"oma-service: first argument must be one of: {', '.join(names)}")
    _run(lambda s, name: run_one(s, name), "oma-service", argv, positional=("name",))


def oma_admin(argv: list[str] | None = None) -> None:
    from oma.admin import main
    main(sys.argv[1:] if argv is None else argv)
