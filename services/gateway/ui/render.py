"""Templates (autoescaped: VM names come from vCenter and are untrusted) and the view of one VM
row, shared by the page render and the live updates so both draw the same cells."""
from __future__ import annotations

import hashlib
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.templating import Jinja2Templates
from starlette.responses import HTMLResponse

HERE = Path(__file__).parent
STATIC_DIR = HERE / "static"
templates = Jinja2Templates(directory=HERE / "templates")  # autoescapes .html
templates.env.auto_reload = False  # no stat() of the file at each include: they ship with the code

# Scripts and styles from this origin only: an injected tag or inline handler cannot run.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
                               "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}

# status -> (icon, label, tone): the icon and the words carry the meaning, the colour only helps.
STATUS = {
    "discovered": ("○", "Discovered", "idle"),
    "queued": ("◷", "Queued", "busy"),
    "provisioning": ("◷", "Provisioning", "busy"),
    "ready_for_sync": ("◔", "Ready for sync", "busy"),
    "replicating": ("↻", "Replicating", "busy"),
    "stalled": ("⚠", "Stalled (VMA silent or no bytes moving)", "bad"),
    "completed": ("✓", "Completed", "ok"),
    "failed": ("✕", "Failed", "bad"),
    "cancelled": ("⊘", "Cancelled", "idle"),
    "gone": ("⌀", "Gone from vCenter", "idle"),
    # What a failover sets (services/context_aggregator/events.py FAILOVER_STATUSES).
    "failing_over": ("⇢", "Failing over", "busy"),
    "failed_over_test": ("◑", "Failed over (test)", "ok"),
    "failed_over_live": ("●", "Failed over (cutover)", "ok"),
    "cleaning_up": ("↺", "Cleaning up", "busy"),
    "ready_for_failover": ("◎", "Ready for failover", "ok"),
    "rolled_back": ("⟲", "Rolled back", "idle"),
}
ACTIVE = ("queued", "provisioning", "ready_for_sync", "replicating", "stalled")
# Replication job states are the VM statuses above without discovered/gone; failover jobs have their own.
JOB_STATES = {
    "replication": {s: STATUS[s] for s in (*ACTIVE, "completed", "failed", "cancelled")},
    "failover": {
        "running": ("↻", "Running", "busy"),
        "completed": ("✓", "Completed", "ok"),
        "failed": ("✕", "Failed", "bad"),
        "compensating": ("↺", "Undoing its steps", "busy"),
        "compensated": ("⊘", "Undone", "idle"),
        "compensation_failed": ("⚠", "Undo failed", "bad"),
        "cleaned_up": ("⊘", "Cleaned up", "idle"),
        "rolled_back": ("⊘", "Rolled back", "idle"),
    },
}


def render(request: Request, name: str, status_code: int = 200, headers: dict[str, str] | None = None,
           **context: Any) -> HTMLResponse:
    context.setdefault("user", getattr(request.state, "user", None))
    return templates.TemplateResponse(request, name, context, status_code=status_code,
                                      headers={**SECURITY_HEADERS, **(headers or {})})


def fragment(name: str, **context: Any) -> str:
    """A template rendered to a string (live updates), through the same autoescaping environment."""
    return templates.get_template(name).render(**context)


def cell_html(view: dict[str, Any], cell: str) -> str:
    """One live cell of a VM row (the _cells.html macro, as the pages draw it)."""
    return str(templates.get_template("_cells.html").module.cell(view, cell))


def vm_key(vm_name: str) -> str:
    """A safe id and event name for any VM name."""
    return "vm-" + hashlib.sha256(vm_name.encode()).hexdigest()[:16]


def eta_text(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    seconds = int(seconds)
    if seconds < 90:
        return f"{seconds} s"
    if seconds < 5400:
        return f"{round(seconds / 60)} min"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


def bytes_text(n: int | None) -> str:
    if n is None:
        return "—"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def when_text(stamp: str | None) -> str:
    """An RFC 3339 time as UTC, to the minute."""
    if not stamp:
        return "—"
    try:
        at = datetime.fromisoformat(stamp.replace("Z", "+00:00")).astimezone(timezone.utc)
    except ValueError:
        return stamp
    return at.strftime("%Y-%m-%d %H:%M UTC")


def _parse(stamp: str | None) -> datetime | None:
    try:
        return datetime.fromisoformat(stamp.replace("Z", "+00:00")) if stamp else None
    except ValueError:
        return None


def duration_text(start: str | None, end: str | None) -> str:
    """From start to end (or to now, when still running): "4 min"."""
    began = _parse(start)
    if began is None:
        return "—"
    ended = _parse(end) or datetime.now(timezone.utc)
    return eta_text(max(0.0, (ended - began).total_seconds()))


def badge(states: dict[str, tuple[str, str, str]], state: str) -> dict[str, str]:
    icon, label, tone = states.get(state, ("?", state.replace("_", " ").capitalize(), "idle"))
    return {"icon": icon, "label": label, "tone": tone}


def vm_view(body: dict[str, Any]) -> dict[str, Any]:
    """A VM's row from its context (the GET /vm-contexts/{name} body)."""
    ctx, job = body["context"], body.get("current_job") or {}
    status = ctx["current_status"]
    b = badge(STATUS, status)
    icon, label, tone = b["icon"], b["label"], b["tone"]
    pct = job.get("progress_percent")
    rate, eta = job.get("vma_throughput_mbps"), job.get("vma_eta_seconds")
    active = status in ACTIVE
    rate_text = f"{rate:.1f} MB/s" if rate is not None and active else "—"
    eta_str = eta_text(eta) if active else "—"
    pct_text = f"{pct:.0f}%" if pct is not None else "no progress yet"
    last_sync = next((j.get("completed_at") for j in body.get("job_history", []) if j.get("status") == "completed"),
                     None)
    return {
        "name": ctx["vm_name"], "key": vm_key(ctx["vm_name"]), "status": status, "icon": icon, "label": label,
        "tone": tone, "phase": job.get("current_operation") or "—", "percent": pct, "active": active,
        "rate": rate_text, "eta": eta_str,
        "valuetext": ", ".join(x for x in (pct_text, rate_text if rate_text != "—" else "",
                                           f"ETA {eta_str}" if eta_str != "—" else "") if x),
        "last_sync": when_text(last_sync), "job": job or None, "error": job.get("error"),
        "bytes": f"{bytes_text(job.get('bytes_transferred'))} of {bytes_text(job.get('total_bytes'))}" if job else "—",
    }


templates.env.filters.update(when=when_text, bytes=bytes_text)
templates.env.globals.update(duration=duration_text, badge=badge)


FAILOVER_ACTIONS = {  # action -> (button, what the confirmation says it does)
    "test": ("Test failover", "boots a copy of the replica in the cloud on the test networks; the source VM keeps running"),
    "cleanup": ("Clean up the test", "deletes the test failover's VM and volumes from the cloud"),
    "live": ("Cut over", "powers the source VM off and boots the replica in the cloud on the production networks"),
    "rollback": ("Roll back the cutover", "removes the cut-over VM from the cloud and powers the source VM on again"),
}


def failover_running(failovers: list[dict[str, Any]] | None) -> bool:
    return any(f["status"] in ("running", "compensating") for f in failovers or ())


UNDO = {"cleanup": "test", "rollback": "live"}  # an undo action -> the action it undoes


def failover_held(failovers: list[dict[str, Any]]) -> str | None:
    """The action ("test" or "live") whose failover still holds the VM, as the failover service's
    lock does: one that completed, or whose undo of its own steps failed, until its cleanup or
    rollback completes (a failed one may be tried again). The newest job tells, since a VM has one
    failover at a time."""
    if not failovers:
        return None
    newest = failovers[0]
    if newest["action"] in UNDO.values() and newest["status"] in ("completed", "compensation_failed"):
        return newest["action"]
    return UNDO[newest["action"]] if newest["action"] in UNDO and newest["status"] == "failed" else None


def failover_actions(body: dict[str, Any], failovers: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """The VM page's failover buttons, each enabled only in the state it is allowed in (the
    failover service checks again): test and cutover need a completed replication, no failover
    running and none holding the VM; cleanup and rollback undo the test or cutover that holds it."""
    if failovers is None:  # the failover service does not answer
        return [{"action": a, "label": label, "why": "the failover service does not answer"}
                for a, (label, _) in FAILOVER_ACTIONS.items()]
    held = failover_held(failovers)
    start = ("needs a completed replication" if not body["context"]["successful_jobs"] else
             "clean up the test failover first" if held == "test" else
             "roll back the cutover first" if held == "live" else None)
    why = {"test": start, "live": start,
           "cleanup": None if held == "test" else "no completed test failover to clean up",
           "rollback": None if held == "live" else "no completed cutover to roll back"}
    busy = failover_running(failovers)
    return [{"action": a, "label": label, "why": "a failover is running" if busy else why[a]}
            for a, (label, _) in FAILOVER_ACTIONS.items()]


REPLICATION_ACTIONS = {  # action -> (button, what the confirmation says it does)
    "sync": ("Sync now", "starts a replication now: incremental after a completed one, else the initial copy"),
    "cancel": ("Cancel the replication", "stops the job in flight and deletes the volumes it created"),
}


def replication_actions(vm: dict[str, Any]) -> list[dict[str, Any]]:
    """The VM page's replication buttons (`vm` from vm_view()): sync now needs no job in flight,
    cancel needs one (the replication service checks again)."""
    why = {"sync": "a replication is in flight" if vm["active"] else None,
           "cancel": None if vm["active"] and vm["job"] else "no replication in flight"}
    return [{"action": a, "label": label, "why": why[a]} for a, (label, _) in REPLICATION_ACTIONS.items()]
