"""The operator GUI's routes under /ui: thin handlers over ui.data, ui.session and the templates."""
from __future__ import annotations

import asyncio
import contextlib
import time
from urllib.parse import quote, urlencode
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Form, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import RedirectResponse
from fastapi.routing import APIRoute
from fastapi.sse import EventSourceResponse, ServerSentEvent

from oma.services.gateway.routers.health import get_health
from oma.services.gateway.routers.inventory import discover_timeout, vcenter_timeout
from oma.services.gateway.routers.ossea import config_timeout
from oma.services.gateway.routers.replications import cancel_timeout, create_timeout
from oma.services.gateway.ui import data
from oma.services.gateway.ui import session as sess
from oma.services.gateway.ui.render import (ACTIVE, FAILOVER_ACTIONS, JOB_STATES, REPLICATION_ACTIONS, STATUS,
                                            SECURITY_HEADERS, cell_html, failover_actions, failover_running,
                                            fragment, render, replication_actions, vm_view)
from oma.shared import errors
from oma.shared.service import validation_details
from oma.shared.subjects import Auth, Config, Contexts, Failover, Inventory, Replication



class PageRoute(APIRoute):
    """A browser's page view that fails gets an HTML page with the error's status; forms, htmx
    requests and API clients keep the seed's JSON error body."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def route(request: Request):
            try:
                return await handler(request)
            except (errors.OmaError, RequestValidationError) as exc:
                if (request.method != "GET" or request.headers.get("hx-request")
                        or "text/html" not in request.headers.get("accept", "")):
                    raise
                if isinstance(exc, RequestValidationError):
                    exc = errors.BadRequest("Validation failed", validation_details(exc.errors()))
                if exc.status < 400:  # the sign-in redirect
                    raise exc
                return render(request, "error.html", exc.status, error=exc)
        return route


router = APIRouter(prefix="/ui", include_in_schema=False, route_class=PageRoute)
UPDATE_INTERVAL = 1.0  # a VM's row changes at most once a second on screen
CELLS = ("status", "phase", "progress", "rate", "eta", "sync")  # the dashboard row's live cells
REVERIFY = 60.0        # an open event stream re-checks its session this often


def _bus(request: Request) -> data.Bus:
    return data.Bus(request.app.state)


def _redirect(url: str) -> RedirectResponse:
    return RedirectResponse(url, status_code=303, headers=SECURITY_HEADERS)


Page = Annotated[int, Query(ge=1, le=100_000)]
Size = Annotated[int, Query()]


def _size(size: int) -> int:
    if size not in data.PAGE_SIZES:
        raise errors.BadRequest("Validation failed", f"size: one of {', '.join(map(str, data.PAGE_SIZES))}")
    return size


def _one_of(name: str, value: str, allowed: Any) -> str:
    if value and value not in allowed:
        raise errors.BadRequest("Validation failed", f"{name}: one of {', '.join(allowed)}")
    return value


def _events_url(names: list[str], **flags: str) -> str:
    """The page's one event stream, for the VMs it shows."""
    return "/ui/events?" + urlencode([*flags.items(), *(("vm", n) for n in names)])


async def _targets(request: Request, user: dict[str, Any]) -> list[dict[str, Any]]:
    """The OSSEA configurations an operator can start replications to (none for a viewer)."""
    return await data.configurations(_bus(request)) if user["role"] == "operator" else []


def _need_target(config_id: int | None) -> None:
    if config_id is None:
        raise errors.BadRequest("No target", "add an OSSEA configuration first (POST /api/v1/ossea/config)")


# --- sign in and out -------------------------------------------------------------------------
def _login_page(request: Request, status: int = 200, error: str | None = None, username: str = "",
                headers: dict[str, str] | None = None):
    token = sess.login_csrf(request)
    response = render(request, "login.html", status, csrf=token, error=error, username=username)
    response.headers.update(headers or {})
    sess.set_cookie(request, response, sess.LOGIN_COOKIE, token, max_age=3600)
    return response


@router.get("/login")
async def login_form(request: Request):
    return _login_page(request)


@router.post("/login")
async def login(request: Request, username: Annotated[str, Form(max_length=64)] = "",
                password: Annotated[str, Form(max_length=1024)] = "",
                csrf_token: Annotated[str, Form(max_length=128)] = ""):
    if not sess.same(csrf_token, request.cookies.get(sess.LOGIN_COOKIE)):
        raise errors.Forbidden("CSRF check failed", "reload the sign-in page and try again")
    client = request.client.host if request.client else ""
    try:
        result = await _bus(request).call(
            Auth.USER_LOGIN, {"username": username, "password": password, "client_addr": client})
    except (errors.Unauthorized, errors.TooManyRequests) as exc:
        text = "Wrong username or password." if exc.status == 401 else f"Too many failed attempts: {exc.details}."
        return _login_page(request, exc.status, text, username, exc.headers)
    response = _redirect("/ui/")
    sess.set_cookie(request, response, sess.COOKIE, result["session_token"])
    response.delete_cookie(sess.LOGIN_COOKIE, path="/ui")
    return response


@router.post("/logout")
async def logout(request: Request, user: sess.CheckedUser):
    await _bus(request).call(Auth.USER_LOGOUT, {"token": request.cookies.get(sess.COOKIE)})
    response = _redirect("/ui/login")
    response.delete_cookie(sess.COOKIE, path="/ui")
    return response


# --- dashboard -------------------------------------------------------------------------------
@router.get("/")
async def dashboard(request: Request, user: sess.User,
                    q: Annotated[str, Query(max_length=255)] = "",
                    status: Annotated[str, Query(max_length=32)] = "",
                    sort: Annotated[str, Query(pattern="^-?(name|status|progress)$")] = "name",
                    page: Page = 1, size: Size = data.PAGE_SIZES[0]):
    query = data.Query(q=q.strip(), status=_one_of("status", status, STATUS), sort=sort.lstrip("-"),
                       desc=sort.startswith("-"), page=page, size=_size(size))
    bus, started = _bus(request), time.perf_counter()
    (rows, total), counts, configs = await asyncio.gather(
        data.vm_page(bus, query), data.counters(bus), _targets(request, user))
    read = time.perf_counter()
    pages = max(1, -(-total // query.size))
    events_url = _events_url([r["name"] for r in rows], counters="true")
    response = render(request, "dashboard.html", rows=rows, total=total, counts=counts, query=query, pages=pages,
                      statuses=STATUS, configs=configs, all_vms=sum(counts.values()), events_url=events_url,
                      cells=CELLS)
    # Where a page's time goes (bench/bench_gui.py reads it): the session check, the bus reads, the template.
    response.headers["Server-Timing"] = (f"auth;dur={request.state.auth_ms:.1f}, "
                                         f"reads;dur={(read - started) * 1000:.1f}, "
                                         f"render;dur={(time.perf_counter() - read) * 1000:.1f}")
    return response


@router.post("/replications")
async def start_replications(request: Request, user: sess.Operator,
                             vm: Annotated[list[str], Form(max_length=255)] = [],  # noqa: B006 (FastAPI copies it)
                             config_id: Annotated[int | None, Form()] = None):
    """Start an initial replication of each selected VM; the answer goes to the status region."""
    if not vm or len(vm) > 100:
        raise errors.BadRequest("Nothing selected" if not vm else "Too many VMs", "select 1 to 100 VMs")
    _need_target(config_id)
    bus = _bus(request)
    timeout = create_timeout(request.app.state.settings)
    results = await asyncio.gather(*(data.start_replication(bus, name, config_id, timeout) for name in vm),
                                   return_exceptions=True)
    failed = [(name, r) for name, r in zip(vm, results) if isinstance(r, BaseException)]
    for _, exc in failed:
        if not isinstance(exc, errors.OmaError):
            raise exc
    return render(request, "_started.html", started=len(results) - len(failed), failed=failed)


# --- one VM ----------------------------------------------------------------------------------
@router.get("/vms/{vm_name:path}")
async def vm_detail(request: Request, vm_name: str, user: sess.User):
    bus = _bus(request)
    body = await bus.call(Contexts.GET, {"vm_name": vm_name})
    failovers = await data.failovers(bus, vm_name)
    vm = vm_view(body)
    actions = [("/ui/replication", replication_actions(vm)), ("/ui/failover", failover_actions(body, failovers))]
    return render(request, "vm.html", vm=vm, body=body, failovers=failovers,
                  failover_states=JOB_STATES["failover"], actions=actions,
                  failover_running=failover_running(failovers),
                  events_url=_events_url([vm_name], detail="true"))


# --- failover: a confirmation page, then the action ---------------------------------------------
FailoverAction = Annotated[str, Query(pattern="^(test|cleanup|live|rollback)$")]


@router.get("/failover")
async def confirm_failover(request: Request, user: sess.OperatorPage, vm: Annotated[str, Query(min_length=1, max_length=255)],
                           action: FailoverAction):
    label, effect = FAILOVER_ACTIONS[action]
    return render(request, "confirm.html", vm_name=vm, post="/ui/failover", fields={"action": action},
                  label=label, effect=effect)


@router.post("/failover")
async def start_failover(request: Request, user: sess.Operator, vm: Annotated[str, Form(min_length=1, max_length=255)],
                         action: Annotated[str, Form(pattern="^(test|cleanup|live|rollback)$")]):
    """As POST /api/v1/failover; the browser then shows the VM page with the job in its history."""
    result = await _bus(request).call(Failover.ACTION, {"action": action, "vm_name": vm})
    return render(request, "_announce_text.html", text=f"{FAILOVER_ACTIONS[action][0]} of {vm} started "
                  f"({result['failover_id']}).", headers={"HX-Redirect": "/ui/vms/" + quote(vm, safe="")})


# --- replication of one VM: sync now, cancel; a confirmation page, then the action ---------------
ReplicationAction = Annotated[str, Query(pattern="^(sync|cancel)$")]


@router.get("/replication")
async def confirm_replication(request: Request, user: sess.OperatorPage,
                              vm: Annotated[str, Query(min_length=1, max_length=255)], action: ReplicationAction):
    """Sync now asks for the target cloud; cancel names the job in flight it will cancel."""
    bus = _bus(request)
    label, effect = REPLICATION_ACTIONS[action]
    fields, extra = {"action": action}, {}
    if action == "sync":
        extra["configs"] = await data.configurations(bus)
    else:
        job = (await bus.call(Contexts.GET, {"vm_name": vm})).get("current_job")
        if not job or job["status"] not in ACTIVE:
            raise errors.Conflict("No replication in flight", f"{vm!r} has no job to cancel")
        fields["job"], label = job["id"], f"{label} {job['id']}"
    return render(request, "confirm.html", vm_name=vm, post="/ui/replication", fields=fields, label=label,
                  effect=effect, **extra)


@router.post("/replication")
async def replication_action(request: Request, user: sess.Operator,
                             vm: Annotated[str, Form(min_length=1, max_length=255)],
                             action: Annotated[str, Form(pattern="^(sync|cancel)$")],
                             config_id: Annotated[int | None, Form()] = None,
                             job: Annotated[str, Form(max_length=64)] = ""):
    """Sync now as POST /api/v1/replications (incremental once a replication completed), cancel as
    DELETE /api/v1/replication/jobs/{id}. The outcome stays on the confirmation page, in its status
    region (a redirect would lose the announcement); its links lead back to the VM."""
    bus, settings = _bus(request), request.app.state.settings
    if action == "cancel":
        if not job:
            raise errors.BadRequest("Validation failed", "job: the job to cancel is required")
        result = await bus.call(Replication.CANCEL, {"job_id": job}, timeout=cancel_timeout(settings))
        text = f"Replication {result['job_id']} of {vm} cancelled."
    else:
        _need_target(config_id)
        ctx = (await bus.call(Contexts.GET, {"vm_name": vm}))["context"]
        kind = "incremental" if ctx["successful_jobs"] else "initial"
        result = await data.start_replication(bus, vm, config_id, create_timeout(settings), kind=kind)
        text = f"Sync now of {vm} started ({result['job_id']}, {kind})."
    return render(request, "_announce_text.html", text=text)


# --- discovery -------------------------------------------------------------------------------
@router.get("/discovery")
async def discovery(request: Request, user: sess.User, vcenter: Annotated[str, Query(max_length=255)] = "",
                    q: Annotated[str, Query(max_length=255)] = "", page: Page = 1, size: Size = data.PAGE_SIZES[0],
                    found: int | None = None, new: int = 0, changed: int = 0, gone: int = 0):
    """The vCenters with "Discover now", and one vCenter's stored VMs to select and replicate.
    `found`..`gone`: the summary of the run that redirected here."""
    bus = _bus(request)
    vcs, configs = await asyncio.gather(data.vcenters(bus), _targets(request, user))
    chosen = next((v for v in vcs if vcenter in (v["host"], v["name"])), None) if vcenter else (vcs or [None])[0]
    if vcenter and chosen is None:
        raise errors.NotFound("vCenter not configured", f"{vcenter!r}: add it in Settings")
    listed = await data.inventory_page(bus, chosen["host"], q.strip(), page, _size(size)) if chosen else None
    names = [vm["name"] for vm in listed["vms"]] if listed else []
    summary = {"found": found, "new": new, "changed": changed, "gone": gone} if found is not None else None
    last_run = max((vm["last_seen"] or "" for vm in listed["vms"]), default="") if listed else ""
    return render(request, "discovery.html", vcenters=vcs, chosen=chosen, listed=listed, q=q.strip(), page=page,
                  size=size, pages=max(1, -(-listed["total"] // size)) if listed else 1, summary=summary,
                  last_run=last_run, configs=configs, events_url=_events_url(names) if names else None)


@router.post("/discovery")
async def run_discovery(request: Request, user: sess.Operator,
                        vcenter: Annotated[str, Form(min_length=1, max_length=255)]):
    """Read the vCenter now; the browser then loads its VMs with the run's summary (htmx follows
    HX-Redirect with a full page load, so the page's event stream covers the new rows)."""
    bus = _bus(request)
    result = await bus.call(Inventory.DISCOVER, {"vcenter": vcenter},
                            timeout=discover_timeout(bus.timeout, request.app.state.settings))
    s = result["summary"]
    url = "/ui/discovery?" + urlencode({"vcenter": result["vcenter"], "found": s["found"], "new": s["new"],
                                        "changed": s["changed"], "gone": s["gone"]})
    return render(request, "_announce_text.html", text=f"Discovery finished: {s['found']} VMs found.",
                  headers={"HX-Redirect": url})


# --- jobs ------------------------------------------------------------------------------------
@router.get("/jobs")
async def jobs(request: Request, user: sess.User, kind: Annotated[str, Query(pattern="^(replication|failover)$")]
               = "replication", status: Annotated[str, Query(max_length=32)] = "",
               vm: Annotated[str, Query(max_length=255)] = "", page: Page = 1, size: Size = data.PAGE_SIZES[0]):
    states = JOB_STATES[kind]
    listed = await data.jobs_page(_bus(request), kind, _one_of("status", status, states), vm.strip(),
                                  page, _size(size))
    filters = {"kind": kind, "status": status, "vm": vm.strip(), "size": size}
    return render(request, "jobs.html", listed=listed, kind=kind, status=status, vm=vm.strip(), states=states,
                  page=page, size=size, pages=max(1, -(-listed["total"] // size)),
                  filters={k: v for k, v in filters.items() if v})


# --- settings --------------------------------------------------------------------------------
@router.get("/settings")
async def settings_page(request: Request, user: sess.User):
    return render(request, "settings.html", **await data.settings_page(_bus(request)))


@router.post("/settings/test")
async def test_connection(request: Request, user: sess.Operator,
                          kind: Annotated[str, Form(pattern="^(ossea|vcenter)$")],
                          config_id: Annotated[int, Form(ge=1)]):
    """The stored configuration's connection test, as the API's `{"action": "test", "id": …}`."""
    bus, settings = _bus(request), request.app.state.settings
    subject, timeout = ((Config.ACTION, config_timeout(bus.timeout, settings)) if kind == "ossea"
                        else (Inventory.VCENTER_ACTION, vcenter_timeout(bus.timeout, settings)))
    result = await bus.call(subject, {"action": "test", "id": config_id}, timeout=timeout)
    return render(request, "_announce_text.html", text=f"Configuration {config_id}: {result['message']}.")


# --- health ----------------------------------------------------------------------------------
async def _health(request: Request) -> dict[str, Any]:
    return orjson.loads((await get_health(request)).body)


@router.get("/health")
async def health_page(request: Request, user: sess.User):
    return render(request, "health.html", health=await _health(request))


@router.get("/health/badge")
async def health_badge(request: Request, user: sess.User):
    return render(request, "_health_badge.html", health=await _health(request))


# --- live updates: one stream per page -------------------------------------------------------
@router.get("/events", response_class=EventSourceResponse)
async def events(request: Request, user: sess.StreamUser,
                 vm: Annotated[list[str], Query(max_length=255)] = [],  # noqa: B006
                 detail: bool = False, counters: bool = False):
    """Fragments for the VMs the page shows (`vm`), named `<key>-<cell>` for the sse-swap cells;
    `counters` for the dashboard's totals, `announce` for the polite status region."""
    bus, watched = _bus(request), set(vm[:100])
    # Coalesced as they arrive: the latest context per VM waits for its turn (at most one a second),
    # so a burst of updates costs no backlog and the last state always gets out.
    pending: dict[str, dict[str, Any]] = {}
    wake = asyncio.Event()
    changed = False  # anything changed since the counters were last sent

    async def on_update(msg: Any) -> None:
        nonlocal changed
        update = orjson.loads(msg.data)
        changed = True
        name = update.get("vm_name")
        if name in watched:
            if name not in pending:  # one already pending has its turn counted
                wake.set()
            pending[name] = update["context"]

    sub = await request.app.state.bus.nc.subscribe(Contexts.EVT_UPDATED, cb=on_update)
    try:
        sent: dict[str, float] = {}                # when each VM was last sent
        last_status: dict[str, str] = {}
        loop = asyncio.get_running_loop()
        checked = counted = loop.time()
        while not await request.is_disconnected():
            now = loop.time()
            next_due = min((sent.get(n, 0.0) + UPDATE_INTERVAL - now for n in pending), default=UPDATE_INTERVAL)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(wake.wait(), timeout=min(max(next_due, 0.0), UPDATE_INTERVAL / 2))
            wake.clear()
            now = loop.time()
            for name in [n for n in pending if now - sent.get(n, 0.0) >= UPDATE_INTERVAL]:
                # Stamped as it goes out, not when the round began: a slow round must not let the
                # next one send this VM again sooner than a second later.
                view, sent[name] = vm_view(pending.pop(name)), loop.time()
                for cell in CELLS:
                    yield ServerSentEvent(event=f"{view['key']}-{cell}", raw_data=cell_html(view, cell))
                if detail:
                    yield ServerSentEvent(event=f"{view['key']}-job", raw_data=fragment("_job.html", vm=view))
                if last_status.get(name) != view["status"] and view["status"] in ("completed", "failed"):
                    yield ServerSentEvent(event="announce", raw_data=fragment("_announce.html", view=view))
                last_status[name] = view["status"]
            if counters and changed and now - counted >= 2 * UPDATE_INTERVAL:
                changed, counted = False, now
                yield ServerSentEvent(event="counters", raw_data=fragment(
                    "_counters.html", counts=await data.counters(bus), statuses=STATUS))
            if now - checked > REVERIFY:  # idle expiry and logout end the stream too
                checked = now
                try:
                    await sess.stream_user(request)
                except errors.OmaError:
                    return
    finally:
        await sub.unsubscribe()
