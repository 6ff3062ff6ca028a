"""Who is using the GUI: the session cookie, CSRF checks and roles.

The cookie holds an opaque token the auth service verifies (and whose idle clock it restarts) on
every request; nothing is cached here, so a logout, a removed operator or a new password takes
effect at once. Every state-changing request must carry the session's synchronizer token, as a form
field or the `X-CSRF-Token` header htmx sends (hx-headers on <body>).
"""
from __future__ import annotations

import hmac
import secrets
import time
from typing import Annotated, Any

from fastapi import Depends, Request, Response

from oma.shared import errors
from oma.shared.subjects import Auth

COOKIE = "oma_ui_session"
LOGIN_COOKIE = "oma_ui_login"  # double-submit token of the login form (there is no session yet)
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "x-csrf-token"


def sign_in_required(request: Request) -> errors.OmaError:
    """No valid session: a page redirects to the login form; htmx is told to go there (it would
    follow a redirect inside its request and swap the login page into a fragment)."""
    if request.headers.get("hx-request"):
        return errors.Unauthorized("Not signed in", "sign in again", headers={"HX-Redirect": "/ui/login"})
    return errors.OmaError("Sign in required", "see /ui/login", status=303, headers={"Location": "/ui/login"})


def set_cookie(request: Request, response: Response, name: str, value: str, max_age: int | None = None) -> None:
    response.set_cookie(name, value, max_age=max_age, path="/ui", httponly=True, samesite="strict",
                        secure=request.url.scheme == "https")


def login_csrf(request: Request) -> str:
    return request.cookies.get(LOGIN_COOKIE) or secrets.token_urlsafe(32)


def same(a: str | None, b: str | None) -> bool:
    return bool(a) and bool(b) and hmac.compare_digest(str(a).encode(), str(b).encode())


async def _verify(request: Request, touch: bool) -> dict[str, Any]:
    token = request.cookies.get(COOKIE)
    if not token or len(token) > 512:
        raise sign_in_required(request)
    try:
        return await request.app.state.bus.call(Auth.USER_VERIFY, {"token": token, "touch": touch})
    except errors.Unauthorized:
        raise sign_in_required(request) from None


async def current_user(request: Request) -> dict[str, Any]:
    started = time.perf_counter()
    user = await _verify(request, touch=True)
    request.state.user, request.state.auth_ms = user, (time.perf_counter() - started) * 1000
    return user


async def stream_user(request: Request) -> dict[str, Any]:
    """For event streams: checks the session without counting as activity."""
    return await _verify(request, touch=False)


async def csrf_checked(request: Request, user: Annotated[dict[str, Any], Depends(current_user)]) -> dict[str, Any]:
    sent = request.headers.get(CSRF_HEADER)
    if sent is None and request.headers.get("content-type", "").startswith(
            ("application/x-www-form-urlencoded", "multipart/form-data")):
        sent = (await request.form()).get(CSRF_FIELD)
    if not same(sent if isinstance(sent, str) else None, user["csrf_token"]):
        raise errors.Forbidden("CSRF check failed", "the request lacks this session's CSRF token; reload the page")
    return user


def _operator(user: dict[str, Any]) -> dict[str, Any]:
    if user["role"] != "operator":
        raise errors.Forbidden("Not allowed", "viewers cannot change anything; ask for the operator role")
    return user


async def operator_only(user: Annotated[dict[str, Any], Depends(csrf_checked)]) -> dict[str, Any]:
    return _operator(user)


async def operator_page(user: Annotated[dict[str, Any], Depends(current_user)]) -> dict[str, Any]:
    """A page only operators get (a confirmation): a GET, so no CSRF token."""
    return _operator(user)


User = Annotated[dict[str, Any], Depends(current_user)]
StreamUser = Annotated[dict[str, Any], Depends(stream_user)]
CheckedUser = Annotated[dict[str, Any], Depends(csrf_checked)]
Operator = Annotated[dict[str, Any], Depends(operator_only)]
OperatorPage = Annotated[dict[str, Any], Depends(operator_page)]
