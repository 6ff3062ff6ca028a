"""The service runtime: a `nats.micro` service in a queue group named after the service,
with thin endpoint methods, one error envelope, metrics, and a graceful drain.

A service subclasses `ServiceApp` and marks handlers with `@endpoint(subject)`; its Alembic folder is
the `migrations` folder beside its module, when there is one. `await app.start()` opens the database,
migrates, runs `setup()`, and starts answering; `await app.stop()` stops taking requests, lets every
in-flight one reply, then drains the connection.
"""
from __future__ import annotations

import asyncio
import functools
import logging
import sys
import time
from pathlib import Path
from typing import Any, Awaitable, Callable, TypeVar

import orjson
import pluggy
from nats.micro import add_service
from nats.micro.request import Request
from nats.micro.service import EndpointConfig, ServiceConfig
from pydantic import BaseModel, ValidationError

from oma.shared import bus as busmod
from oma.shared import db, errors, metrics
from oma.shared.crypto import Keyring
from oma.shared.errors import validation_details  # noqa: F401 - imported from here by services
from oma.shared.logging import correlation_id
from oma.shared.schemas import VERSION
from oma.shared.settings import Settings
from oma.shared.subjects import health

log = logging.getLogger("oma.service")
M = TypeVar("M", bound=BaseModel)


def endpoint(subject: str) -> Callable[[Callable[..., Awaitable[Any]]], Callable[..., Awaitable[Any]]]:
    def mark(fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        fn._oma_subject = subject  # type: ignore[attr-defined]
        return fn
    return mark


class BusRequest:
    def __init__(self, req: Request):
        self.raw = req
        self.headers = req.headers or {}

    def json(self) -> Any:
        if not self.raw.data:
            return {}
        try:
            return orjson.loads(self.raw.data)
        except orjson.JSONDecodeError as exc:
            raise errors.BadRequest("Invalid JSON", str(exc)) from None

    def model(self, cls: type[M], data: Any = None) -> M:
        try:
            return cls.model_validate(self.json() if data is None else data)
        except ValidationError as exc:
            raise errors.BadRequest("Validation failed", validation_details(exc.errors())) from None


class ServiceApp:
    name: str = ""
    description: str = ""
    migrations: Path | None = None  # default: the `migrations` folder beside the subclass's module

    def __init__(self, settings: Settings, nc: Any, pm: pluggy.PluginManager):
        self.settings = settings
        self.bus = busmod.Bus(nc, timeout=settings.request_timeout)
        self.pm = pm
        self.engine = None
        self.sessions = None
        self._micro = None
        self._tasks: set[asyncio.Task] = set()
        self._set_up = False
        self._pinger: asyncio.Task | None = None
        self.log = logging.getLogger(f"oma.{self.name}")
        self.migrations = self.migrations_dir()

    @classmethod
    def migrations_dir(cls) -> Path | None:
        """The class's `migrations`, else the `migrations` folder beside its module (oma-admin runs
        auth's without an instance)."""
        if cls.migrations is not None:
            return cls.migrations
        beside = Path(sys.modules[cls.__module__].__file__ or ".").parent / "migrations"
        return beside if beside.is_dir() else None

    @functools.cached_property
    def keys(self) -> Keyring:
        """The appliance's secret key (OMA_SECRET_KEY_FILE), for the secrets a service stores."""
        return Keyring.from_file(self.settings.secret_key_path)

    # Hooks for subclasses.
    async def setup(self) -> None:
        """After the database is migrated, before requests are taken."""

    async def teardown(self) -> None:
        """After the last request has replied."""

    # Life cycle.
    async def start(self) -> None:
        if self.migrations is not None:
            from oma.shared.plugins import get_backend
            storage = get_backend(self.pm, "storage", self.settings.db_type).factory(self.settings)
            self.engine = await storage.create_engine(self.name)
            await db.run_migrations(self.engine, self.name, self.migrations)
            self.sessions = db.sessionmaker(self.engine)
            metrics.DB_UP.labels(service=self.name).set(1)
        await self.bus.ensure_stream()
        await self.setup()
        self._set_up = True
        self._micro = await add_service(self.bus.nc, ServiceConfig(
            name=self.name, version=VERSION, description=self.description, queue_group=self.name))
        handlers = {fn._oma_subject: fn for fn in (getattr(self, a) for a in dir(type(self)))
                    if callable(fn) and hasattr(fn, "_oma_subject")}
        handlers[health(self.name)] = self.health
        for subject, fn in handlers.items():
            await self._micro.add_endpoint(EndpointConfig(
                name=subject.replace(".", "_"), subject=subject, handler=self._dispatcher(subject, fn),
                queue_group=self.name))
        metrics.SERVICE_UP.labels(service=self.name).set(1)
        if self.engine is not None:
            # oma_db_up must move when the database goes away, not only when /health is asked.
            self._pinger = asyncio.create_task(self._ping_database(self.settings.db_ping_interval))
        self.log.info("service started", extra={"service": self.name, "endpoints": len(handlers)})

    async def _ping_database(self, every: float) -> None:
        up = True
        while True:
            await asyncio.sleep(every)
            now_up = await db.ping(self.engine, self.name)
            if now_up != up:
                (self.log.info if now_up else self.log.error)(
                    "database connection " + ("restored" if now_up else "lost"), extra={"service": self.name})
            up = now_up

    async def stop(self) -> None:
        if self._pinger is not None:
            self._pinger.cancel()
        if self._micro is not None:
            await self._micro.stop()  # no new requests; pending ones are handed over
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        if self._set_up:  # a start that failed before setup() has nothing of its own to tear down
            await self.teardown()
        if self.engine is not None:
            await self.engine.dispose()
        metrics.SERVICE_UP.labels(service=self.name).set(0)

    async def health(self, req: BusRequest) -> dict[str, Any]:
        if self.engine is None:
            return {"service": self.name, "status": "up", "database": "n/a"}
        ok = await db.ping(self.engine, self.name)
        return {"service": self.name, "status": "up", "database": "connected" if ok else "disconnected"}

    def spawn(self, coro: Awaitable[Any]) -> asyncio.Task:
        """Background work that shutdown waits for."""
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # Request handling.
    def _dispatcher(self, subject: str, fn: Callable[[BusRequest], Awaitable[Any]]):
        async def handle(req: Request) -> None:
            # nats-py runs one subscription's callbacks one at a time: a task per message.
            self.spawn(self._handle(subject, fn, req))
        return handle

    async def _handle(self, subject: str, fn: Callable[[BusRequest], Awaitable[Any]], req: Request) -> None:
        started = time.perf_counter()
        hdrs = req.headers or {}
        correlation_id.set(hdrs.get(busmod.CORRELATION_HEADER))
        metrics.BUS_IN_FLIGHT.labels(service=self.name).inc()
        status = 200
        try:
            result = await fn(BusRequest(req))
            reply = result if isinstance(result, busmod.Reply) else busmod.Reply(result)
            status = reply.status
            headers = dict(reply.headers)
            if status != 200:
                headers[busmod.STATUS_HEADER] = str(status)
            body = reply.body if isinstance(reply.body, bytes) else busmod.dumps(reply.body)
            await req.respond(body, headers=headers or None)
        except errors.OmaError as exc:
            status = exc.status
            if status >= 500:
                self.log.warning("request failed", extra={"subject": subject, "status": status, "error": str(exc)})
            await req.respond_error(str(status), exc.error, busmod.dumps(exc.body()),
                                    headers={busmod.HEADER_PREFIX + k: v for k, v in exc.headers.items()} or None)
        except Exception as exc:  # noqa: BLE001 - every request gets a reply, even on a bug
            status = 500
            self.log.exception("unhandled error", extra={"subject": subject})
            body = errors.OmaError("Internal server error", type(exc).__name__).body()
            await req.respond_error("500", "Internal server error", busmod.dumps(body))
        finally:
            metrics.BUS_IN_FLIGHT.labels(service=self.name).dec()
            metrics.BUS_REQUESTS.labels(service=self.name, subject=subject, status=str(status)).inc()
            metrics.BUS_DURATION.labels(service=self.name, subject=subject).observe(time.perf_counter() - started)
