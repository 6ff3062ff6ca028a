"""Auth: login, bearer sessions on every protected route, hashes at rest, revocation, rate limits."""
from __future__ import annotations

import asyncio
import base64
import logging
import re

import httpx
import pytest
from sqlalchemy import text

from conftest import SEED_TOKEN, assert_error_shape, login, mariadb_settings, running

OPEN = {"/health", "/openapi.json", "/api/v1/auth/login", "/metrics", "/swagger/"}


def protected_routes(spec: dict) -> list[tuple[str, str]]:
    routes = []
    for path, ops in spec["paths"].items():
        if path in OPEN:
            continue
        for method in ops:
            routes.append((method.upper(), re.sub(r"\{[^}]+\}", "x-1", path)))
    return routes


async def _all_refused(client: httpx.AsyncClient, headers: dict[str, str], why: str) -> None:
    spec = (await client.get("/openapi.json")).json()
    routes = protected_routes(spec)
    assert len(routes) >= 12, routes
    for method, path in routes:
        r = await client.request(method, path, headers=headers, json={})
        assert r.status_code == 401, (why, method, path, r.status_code, r.text)
        assert r.headers["www-authenticate"] == "Bearer"
        assert_error_shape(r, 401)


async def test_every_protected_route_refuses(make_settings):
    async with running(make_settings(session_ttl=1.0)) as client:
        await _all_refused(client, {}, "no token")
        await _all_refused(client, {"Authorization": "Bearer garbage"}, "garbage")
        await _all_refused(client, {"Authorization": "Basic dXNlcjpwYXNz"}, "wrong scheme")
        await _all_refused(client, {"Authorization": "Bearer oma_session_" + "A" * 43}, "unknown")
        expired = await login(client)
        await asyncio.sleep(1.2)
        await _all_refused(client, expired, "expired")
        headers = await login(client)
        r = await client.get("/api/v1/vm-contexts", headers=headers)
        assert r.status_code == 200, r.text  # the session works...
        assert (await client.post("/api/v1/auth/logout", headers=headers)).status_code == 200
        await _all_refused(client, headers, "after logout")  # ...and is dead at once after logout


async def test_seed_login_shape(make_settings):
    async with running(make_settings(), ("auth",)) as client:
        r = await client.post("/api/v1/auth/login", json={"appliance_id": "test-vma", "token": SEED_TOKEN,
                                                          "version": "1.0.0"})
        body = r.json()
        assert r.status_code == 200
        assert set(body) == {"success", "message", "session_token", "expires_at"}
        assert body["success"] is True and body["message"] == "Authentication successful"
        assert body["session_token"].startswith("oma_session_") and len(body["session_token"]) >= 12 + 22
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", body["expires_at"])
        wrong = await client.post("/api/v1/auth/login", json={"appliance_id": "test-vma", "token": "nope"})
        assert assert_error_shape(wrong, 401)["error"] == "Authentication failed"


@pytest.mark.parametrize("body", [
    {}, {"appliance_id": "test-vma"}, {"token": SEED_TOKEN}, {"appliance_id": "", "token": SEED_TOKEN},
    {"appliance_id": 7, "token": SEED_TOKEN}, {"appliance_id": "test-vma", "token": ["x"]},
    {"appliance_id": "x" * 1_000_000, "token": SEED_TOKEN}, {"appliance_id": "test-vma", "token": "t" * 1_000_000},
    "not an object", [1, 2]])
async def test_bad_login_bodies_are_400(make_settings, body):
    async with running(make_settings(), ("auth",)) as client:
        assert_error_shape(await client.post("/api/v1/auth/login", json=body), 400)


async def test_non_json_login_is_400(make_settings):
    async with running(make_settings(), ("auth",)) as client:
        r = await client.post("/api/v1/auth/login", content=b"appliance_id=x",
                              headers={"content-type": "application/x-www-form-urlencoded"})
        assert_error_shape(r, 400)


async def test_no_plaintext_tokens_in_database(make_settings, mariadb_name):
    settings = make_settings(**mariadb_settings(mariadb_name))
    async with running(settings, ("auth",)) as client:
        headers = await login(client)
        session_token = headers["Authorization"].split()[1]
        engine = client.appliance.services["auth"].engine
        async with engine.connect() as conn:
            rows = [tuple(map(str, r)) for t in ("appliances", "sessions")
                    for r in (await conn.execute(text(f"SELECT * FROM {t}"))).all()]
    dump = " ".join(" ".join(r) for r in rows)
    assert rows and SEED_TOKEN not in dump and session_token not in dump
    assert session_token.removeprefix("oma_session_") not in dump


async def test_failed_logins_are_throttled_but_never_lock_out_a_correct_token(make_settings):
    """Failures are answered 429 after `login_rate_limit` a minute per (appliance, address), or ten
    times that per address; a correct token logs in regardless, from any address."""
    async with running(make_settings(login_rate_limit=5), ("auth",)) as client:
        bus = client.app.state.bus
        from oma.shared.subjects import Auth
        tokens = {"test-vma": SEED_TOKEN}
        for name in ("vma-2", "vma-3"):
            tokens[name] = (await bus.call(Auth.APPLIANCE_ADD, {"name": name}))["token"]
        ids = [*tokens, "guess-1", "guess-2"]

        async def attempt(appliance_id: str, token: str, via: httpx.AsyncClient = client) -> httpx.Response:
            return await via.post("/api/v1/auth/login", json={"appliance_id": appliance_id, "token": token})

        # Five wrong tokens for one appliance: answered 401; the sixth is throttled.
        for _ in range(5):
            assert (await attempt("test-vma", "wrong")).status_code == 401
        r = await attempt("test-vma", "wrong")
        assert_error_shape(r, 429)
        assert 1 <= int(r.headers["retry-after"]) <= 60
        # 50 failures in all from 127.0.0.1 (the tunnel's address) across several ids.
        statuses = [(await attempt(ids[i % len(ids)], f"wrong-{i}")).status_code for i in range(44)]
        assert set(statuses) <= {401, 429} and statuses[-1] == 429
        assert_error_shape(await attempt("never-tried", "wrong"), 429)  # the address is throttled now
        transport = httpx.ASGITransport(app=client.app, client=("127.0.0.2", 1234))
        async with httpx.AsyncClient(transport=transport, base_url="http://oma") as other:
            assert_error_shape(await attempt("vma-2", "wrong", other), 401)  # another address is not
            for name, token in tokens.items():
                await login(client, name, token)
                await login(other, name, token)


async def test_logout_seen_by_every_gateway(make_settings):
    """Two gateways with verification caches: a logout through one is refused at once by the other."""
    from oma.services.gateway.app import create_app

    settings = make_settings(auth_cache_ttl=60)
    async with running(settings, ("auth", "config")) as gw1:
        app2 = create_app(settings, gw1.appliance.nats_url)
        async with app2.router.lifespan_context(app2):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app2), base_url="http://oma2") as gw2:
                headers = await login(gw1)
                # Both gateways have verified (and cached) the session.
                for gw in (gw1, gw2):
                    assert (await gw.post("/api/v1/ossea/config", json={"action": "get"},
                                          headers=headers)).status_code == 200
                assert (await gw1.post("/api/v1/auth/logout", headers=headers)).status_code == 200
                await asyncio.sleep(0.05)
                r = await gw2.post("/api/v1/ossea/config", json={"action": "get"}, headers=headers)
                assert_error_shape(r, 401)


async def test_auth_disabled_opens_routes_and_warns(make_settings, caplog):
    caplog.set_level(logging.WARNING)
    async with running(make_settings(auth_enabled=False), ("auth", "replication")) as client:
        r = await client.get("/api/v1/replication/jobs")
        assert r.status_code == 200, r.text
    assert any("AUTHENTICATION IS DISABLED" in rec.getMessage() for rec in caplog.records)


async def test_open_routes_and_no_tokens_in_logs(make_settings, caplog):
    caplog.set_level(logging.DEBUG)
    async with running(make_settings(debug=True), ("auth",)) as client:
        for path in ("/health", "/openapi.json", "/metrics", "/swagger/"):
            assert (await client.get(path)).status_code in (200, 503), path
        headers = await login(client)
        await client.post("/api/v1/auth/logout", headers=headers)
        metrics = (await client.get("/metrics")).text
    token = headers["Authorization"].split()[1]
    text_logs = "\n".join(f"{r.getMessage()} {r.__dict__}" for r in caplog.records)
    assert "login ok" in text_logs and "logout" in text_logs
    assert SEED_TOKEN not in text_logs and token not in text_logs
    assert 'oma_auth_events_total{event="login_ok"}' in metrics


async def test_appliance_admin_subjects(make_settings):
    async with running(make_settings(), ("auth",)) as client:
        bus = client.app.state.bus
        from oma.shared.subjects import Auth
        added = await bus.call(Auth.APPLIANCE_ADD, {"name": "vma-2"})
        assert added["token"].startswith("vma_")
        assert len(base64.urlsafe_b64decode(added["token"].removeprefix("vma_") + "=")) == 32  # 256 random bits
        listed = await bus.call(Auth.APPLIANCE_LIST)
        assert {a["appliance_id"] for a in listed["appliances"]} == {"test-vma", "vma-2"}
        headers = await login(client, "vma-2", added["token"])
        await bus.call(Auth.APPLIANCE_REVOKE, {"name": "vma-2"})
        await asyncio.sleep(0.05)
        assert_error_shape(await client.get("/api/v1/vm-contexts", headers=headers), 401)
        assert_error_shape(await client.post("/api/v1/auth/login", json={"appliance_id": "vma-2",
                                                                         "token": added["token"]}), 401)
