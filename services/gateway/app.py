"""The gateway: every HTTP route of the seed, forwarded over NATS. It owns no tables."""
from __future__ import annotations

import logging
import time
import uuid
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from oma.services.gateway import errors as error_handlers
from oma.services.gateway import openapi, parent_metrics, ui
from oma.services.gateway.ui import demo_views as ui_demo
from oma.services.gateway.content_type import JsonBodies
from oma.services.gateway.deps import SessionCache
from oma.services.gateway.fastpath import ContextReplies, FastReads
from oma.services.gateway.guard import RequestGuard
from oma.services.gateway.routers import (
    appliances,
    auth,
    contexts,
    demo,
    failover,
    health,
    inventory,
    ossea,
    replications,
    scheduler,
)
from oma.shared import bus as busmod
from oma.shared import metrics
from oma.shared.logging import correlation_id
from oma.shared.schemas import VERSION
from oma.shared.settings import Settings
from oma.shared.subjects import Auth

log = logging.getLogger("oma.gateway")

DESCRIPTION = """The OMA (OSSEA Migration Appliance) API: unified OSSEA configuration, VM inventory,
replication jobs with VM-based NBD export reuse, and per-VM contexts.

Every `/api/v1` route except login needs `Authorization: Bearer <session_token>` from
`POST /api/v1/auth/login`. Errors always come as `{"success": false, "error": ..., "details": ...}`."""


class TimingMiddleware:
    """Request timing for every route: metrics labelled by route template, a log line for
    mutations, errors and slow requests (every request at debug)."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = [500]
        # The correlation id follows the request over the bus (a header) and into every log line.
        rid = next((v.decode("latin-1")[:64] for k, v in scope["headers"] if k == b"x-request-id"), None)
        rid = rid or uuid.uuid4().hex
        correlation_id.set(rid)

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message.setdefault("headers", []).append((b"x-request-id", rid.encode("latin-1")))
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            elapsed = time.perf_counter() - started
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            method = scope["method"]
            metrics.HTTP_REQUESTS.labels(method=method, route=route, status=str(status[0])).inc()
            metrics.HTTP_DURATION.labels(method=method, route=route).observe(elapsed)
            level = (logging.WARNING if status[0] >= 500 else logging.INFO
                     if method != "GET" or status[0] >= 400 or elapsed > 1.0 else logging.DEBUG)
            if log.isEnabledFor(level):
                log.log(level, "request", extra={"method": method, "route": route, "status": status[0],
                                                 "duration_ms": round(elapsed * 1000, 2)})


def create_app(settings: Settings, nats_url: str, services_metrics: str | None = None) -> FastAPI:
    """`services_metrics`: the URL of the services' /metrics when they run in another process of
    the same oma-api (OMA_PROCESSES > 1); /metrics then shows theirs with ours, as one process would."""
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        nc = await busmod.connect(nats_url, "gateway", user=settings.nats_user, password=settings.nats_password,
                                  timeout=settings.startup_timeout)
        app.state.bus = busmod.Bus(nc, timeout=settings.request_timeout)
        await nc.subscribe(Auth.EVT_SESSION_REVOKED, cb=app.state.session_cache.on_event)
        await nc.subscribe(Auth.EVT_APPLIANCE_REVOKED, cb=app.state.session_cache.on_event)
        await app.state.context_replies.subscribe(nc)
        if not settings.auth_enabled:
            log.warning("AUTHENTICATION IS DISABLED (-auth-enabled=false): every /api/v1 route is open. "
                        "Use this for development only.")
        yield
        await nc.drain()

    app = FastAPI(title="OMA API", version=VERSION, description=DESCRIPTION, lifespan=lifespan,
                  docs_url=None, redoc_url=None, openapi_url="/openapi.json")
    openapi.install(app)  # 3.0, bearer scheme, 400 not 422: services/gateway/openapi.py
    app.state.settings = settings
    app.state.session_cache = SessionCache(settings.auth_cache_ttl)
    app.state.context_replies = ContextReplies(settings.contexts_cache_mib << 20)
    app.state.health = health.HealthCache(settings.health_cache_ttl, settings.health_max_rate)
    error_handlers.install(app)
    # The last added is the outermost: the timing sees the guard's 401/413 too; FastReads (the two
    # hottest reads past FastAPI's routing) sees only requests with a valid session; JsonBodies
    # (headers only) runs for the POSTs the guard let in.
    app.add_middleware(JsonBodies)
    app.add_middleware(FastReads)
    app.add_middleware(RequestGuard, max_body=settings.max_body_bytes)
    app.add_middleware(TimingMiddleware)

    app.include_router(health.router)
    app.include_router(auth.router)
    # Every /api/v1 route but login is checked by RequestGuard, before its body is read.
    for router in (ossea.router, inventory.router, replications.router, contexts.router, failover.router,
                   appliances.router, demo.router, scheduler.router):
        app.include_router(router, responses={401: {"description": "Unauthorized"}})

    _mount_swagger(app)
    app.include_router(ui.router)  # the operator GUI (its own cookie sessions)
    app.include_router(ui_demo.router)  # its demo panel (oma-api -demo)
    app.mount("/ui/static", StaticFiles(directory=ui.STATIC_DIR), name="ui-static")

    @app.get("/metrics", include_in_schema=False)
    async def prometheus_metrics():
        if services_metrics is None:
            return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
        return Response(await parent_metrics.with_other_process(services_metrics), media_type=CONTENT_TYPE_LATEST)

    return app


def _mount_swagger(app: FastAPI) -> None:
    """Swagger UI served from the installed swagger-ui-bundle: the appliance works offline."""
    import swagger_ui_bundle

    app.mount("/swagger/static", StaticFiles(directory=swagger_ui_bundle.swagger_ui_path), name="swagger-static")

    @app.get("/swagger/", include_in_schema=False)
    async def swagger_ui():
        return get_swagger_ui_html(openapi_url="/openapi.json", title="OMA API - Swagger UI",
                                   swagger_js_url="/swagger/static/swagger-ui-bundle.js",
                                   swagger_css_url="/swagger/static/swagger-ui.css",
                                   swagger_favicon_url="/swagger/static/favicon-32x32.png")
