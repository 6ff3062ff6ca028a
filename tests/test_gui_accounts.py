"""Operator accounts of the web GUI: `oma-admin user`, sign-in with its CSRF token and throttle,
the cookie's attributes, idle expiry, sign-out, role and CSRF checks, bad input. Real auth service
and gateway over NATS (the browser tests are in test_gui.py)."""
from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import assert_error_shape, mariadb_settings, running
from oma.services.auth import operators

REPO = Path(__file__).resolve().parent.parent
GOOD = "a long enough password"


async def sign_in(client: httpx.AsyncClient, username: str, password: str) -> httpx.Response:
    page = await client.get("/ui/login")
    assert page.status_code == 200
    token = re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)
    return await client.post("/ui/login", data={"username": username, "password": password, "csrf_token": token})


def csrf_of(page: httpx.Response) -> str:
    return re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)


async def add(client: httpx.AsyncClient, username: str, role: str, password: str = GOOD) -> None:
    async with client.appliance.services["auth"].sessions.begin() as db:  # type: ignore[attr-defined]
        await operators.add_operator(db, username, password, role)


def oma_admin(settings: dict[str, Any], data_dir: Path, *args: str, stdin: str = "") -> subprocess.CompletedProcess:
    flags = [f"-{k.replace('_', '-')}={v}" for k, v in settings.items()] + [f"-data-dir={data_dir}"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", "from oma.cli import oma_admin; oma_admin()", *args, *flags],
                          input=stdin, capture_output=True, text=True, env=env, timeout=120)


async def test_password_hashes_are_scrypt_and_salted():
    a, b = operators.hash_password(GOOD), operators.hash_password(GOOD)
    assert a.startswith("scrypt$32768$8$3$") and a != b
    assert operators.check_password(GOOD, a) and not operators.check_password(GOOD + "x", a)
    assert not operators.check_password(GOOD, "not a hash")


async def test_oma_admin_user_commands_and_their_effect_on_sessions(make_settings, mariadb_name, tmp_path):
    db = mariadb_settings(mariadb_name)
    data = tmp_path / "data"
    r = oma_admin(db, data, "user", "add", "alice", "--role", "operator", stdin=GOOD + "\n")
    assert r.returncode == 0 and "alice added with role operator" in r.stdout, r.stderr
    assert GOOD not in r.stdout + r.stderr
    r = oma_admin(db, data, "user", "add", "alice", stdin=GOOD + "\n")
    assert r.returncode == 1 and "Operator exists" in r.stderr
    r = oma_admin(db, data, "user", "add", "bob", stdin="short\n")
    assert r.returncode == 1 and "password: 10 to 1024 characters" in r.stderr
    r = oma_admin(db, data, "user", "add", "<bad name>", stdin=GOOD + "\n")
    assert r.returncode == 1 and "username" in r.stderr
    r = oma_admin(db, data, "user", "add", "vera", "--role", "admin", stdin=GOOD + "\n")
    assert r.returncode == 2 and "invalid choice" in r.stderr
    r = oma_admin(db, data, "user", "list")
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [(u["username"], u["role"]) for u in rows] == [("alice", "operator")]
    assert "password" not in r.stdout and "scrypt" not in r.stdout

    async with running(make_settings(**db, data_dir=data), ("auth",)) as client:
        assert (await sign_in(client, "alice", GOOD)).status_code == 303
        assert (await client.get("/ui/health", follow_redirects=False)).status_code == 200
        r = oma_admin(db, data, "user", "passwd", "alice", stdin="a new long password\n")
        assert r.returncode == 0, r.stderr
        # A new password ends the session at once (the GUI caches no verification).
        r = await client.get("/ui/health")
        assert (r.status_code, r.headers["location"]) == (303, "/ui/login")
        assert (await sign_in(client, "alice", GOOD)).status_code == 401
        assert (await sign_in(client, "alice", "a new long password")).status_code == 303
        r = oma_admin(db, data, "user", "remove", "alice")
        assert r.returncode == 0, r.stderr
        assert (await client.get("/ui/health")).status_code == 303
    r = oma_admin(db, data, "user", "remove", "alice")
    assert r.returncode == 1 and "Operator not found" in r.stderr


async def test_sign_in_throttle_cookie_idle_expiry_and_sign_out(make_settings):
    settings = make_settings(login_rate_limit=2, ui_idle_timeout=1.5)
    async with running(settings, ("auth", "context_aggregator", "config")) as client:
        await add(client, "olivia", "operator")
        await add(client, "victor", "viewer")

        # The sign-in form's own CSRF token (double submit: there is no session yet).
        r = await client.post("/ui/login", data={"username": "olivia", "password": GOOD, "csrf_token": "forged"})
        assert_error_shape(r, 403)

        # Wrong passwords: 401 until the limit, then 429, and then even the right password waits.
        for _ in range(2):
            r = await sign_in(client, "olivia", "wrong password")
            assert r.status_code == 401 and "Wrong username or password" in r.text
        r = await sign_in(client, "olivia", "wrong password")
        assert r.status_code == 429 and int(r.headers["retry-after"]) > 0
        r = await sign_in(client, "olivia", GOOD)
        assert r.status_code == 429 and "Too many failed attempts" in r.text
        r = await sign_in(client, "nobody", GOOD)  # unknown users are answered like wrong passwords
        assert r.status_code == 401

        # Victor from the same address is not locked out by olivia's guesser.
        r = await sign_in(client, "victor", GOOD)
        assert (r.status_code, r.headers["location"]) == (303, "/ui/")
        cookie = next(h for h in r.headers.get_list("set-cookie") if h.startswith("oma_ui_session="))
        attrs = {a.strip().split("=")[0].lower() for a in cookie.split(";")[1:]}
        assert {"httponly", "path", "samesite"} <= attrs and "secure" not in attrs
        assert "samesite=strict" in cookie.lower() and "path=/ui" in cookie.lower()

        page = await client.get("/ui/")
        assert page.status_code == 200 and "victor" in page.text
        assert "Content-Security-Policy" in page.headers and "'unsafe-inline'" not in page.headers["content-security-policy"]
        # A viewer with a valid token is still refused; and bad input is a clear 400/404.
        r = await client.post("/ui/replications", data={"vm": "x", "csrf_token": csrf_of(page)})
        assert assert_error_shape(r, 403)["error"] == "Not allowed"
        assert_error_shape(await client.get("/ui/?size=7"), 400)
        assert_error_shape(await client.get("/ui/?status=bogus"), 400)
        assert_error_shape(await client.get("/ui/vms/no-such-vm"), 404)
        for action in ("/ui/discovery", "/ui/failover", "/ui/replication", "/ui/settings/test"):
            r = await client.post(action, data={"csrf_token": csrf_of(page)})
            assert assert_error_shape(r, 403)["error"] == "Not allowed", action
        for path, action in (("/ui/failover", "test"), ("/ui/replication", "sync")):  # the confirmation pages
            r = await client.get(path, params={"vm": "x", "action": action})
            assert assert_error_shape(r, 403)["error"] == "Not allowed", path
        assert_error_shape(await client.get("/ui/jobs?kind=bogus"), 400)
        assert_error_shape(await client.get("/ui/jobs?size=7"), 400)

        # Idle expiry: a page view restarts the clock; 1.5 s without one ends the session.
        await asyncio.sleep(1.0)
        assert (await client.get("/ui/")).status_code == 200
        await asyncio.sleep(1.0)
        assert (await client.get("/ui/")).status_code == 200
        await asyncio.sleep(1.7)
        r = await client.get("/ui/")
        assert (r.status_code, r.headers["location"]) == (303, "/ui/login")
        r = await client.get("/ui/health/badge", headers={"HX-Request": "true"})
        assert r.status_code == 401 and r.headers["hx-redirect"] == "/ui/login"

        # Sign-out needs the token too, and ends the session for good.
        await sign_in(client, "victor", GOOD)
        page = await client.get("/ui/")
        assert_error_shape(await client.post("/ui/logout"), 403)
        r = await client.post("/ui/logout", data={"csrf_token": csrf_of(page)})
        assert (r.status_code, r.headers["location"]) == (303, "/ui/login")
        old = r.request.headers["cookie"]
        r = await client.get("/ui/", headers={"cookie": old})
        assert (r.status_code, r.headers["location"]) == (303, "/ui/login")

        # An operator with the token but nothing selected gets a clear 400.
        await add(client, "omar", "operator")
        await sign_in(client, "omar", GOOD)
        page = await client.get("/ui/")
        r = await client.post("/ui/replications", data={"csrf_token": csrf_of(page)})
        assert assert_error_shape(r, 400)["error"] == "Nothing selected"


async def test_cookie_is_secure_over_https(make_settings):
    async with running(make_settings(), ("auth",)) as client:
        await add(client, "olivia", "operator")
        https = httpx.AsyncClient(transport=httpx.ASGITransport(app=client.app), base_url="https://oma")
        async with https:
            r = await sign_in(https, "olivia", GOOD)
        cookie = next(h for h in r.headers.get_list("set-cookie") if h.startswith("oma_ui_session="))
        assert "secure" in cookie.lower()


@pytest.mark.nats_forbidden  # inventory's user asks on purpose: the secured server refuses it
async def test_gateway_may_call_the_operator_subjects_on_the_secured_bus(tmp_path):
    """The embedded NATS with shared/natsauth.py's permissions: the gateway is answered, another
    service's user may not even ask."""
    from conftest import SEED_TOKEN, free_port
    from oma.shared import bus as busmod
    from oma.shared import errors
    from oma.runner import Appliance
    from oma.shared.settings import Settings
    from oma.shared.subjects import Auth

    settings = Settings(nats_url="", data_dir=tmp_path / "data", nbd_port=free_port(),
                        appliance_tokens=f"test-vma={SEED_TOKEN}", startup_timeout=20)
    async with Appliance(settings, ("auth",)) as appliance:
        for user, answered in (("gateway", True), ("inventory", False)):
            name, password = appliance.nats_credentials(user)
            nc = await busmod.connect(appliance.nats_url, user, user=name, password=password, timeout=10)
            try:
                with pytest.raises(errors.OmaError) as caught:
                    await busmod.Bus(nc, timeout=2.0).call(Auth.USER_VERIFY, {"token": "oma_ui_nope"})
                assert (caught.value.status == 401) is answered, caught.value
            finally:
                await nc.close()


async def test_every_gui_route_but_sign_in_needs_a_session(make_settings):
    from oma.services.gateway.ui import router

    async with running(make_settings(), ("auth",)) as client:
        routes = [(m, r.path.replace("{vm_name:path}", "x")) for r in router.routes
                  if r.path != "/ui/login" for m in r.methods]
        assert len(routes) >= 7, routes
        for method, path in routes:
            r = await client.request(method, path)
            assert (r.status_code, r.headers.get("location")) == (303, "/ui/login"), (method, path)
            r = await client.request(method, path, headers={"HX-Request": "true",
                                                            "cookie": "oma_ui_session=oma_ui_forged"})
            assert_error_shape(r, 401)
            assert r.headers["hx-redirect"] == "/ui/login"
        r = await client.get("/ui/static/vendor/htmx-2.0.11.min.js")  # assets need none
        assert r.status_code == 200 and "javascript" in r.headers["content-type"]
