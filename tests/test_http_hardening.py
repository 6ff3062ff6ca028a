"""The gateway's HTTP server against hostile clients: big bodies, forged proxy headers, slow and
excess connections, and crowds of /health callers. `oma-api` runs as a real process where the
server itself is under test."""
from __future__ import annotations

import asyncio
import contextlib
import resource
import sys
import time
from pathlib import Path
from typing import Any, AsyncIterator, Iterator

import httpx
import orjson
import pytest

from conftest import SEED_TOKEN, assert_error_shape, login, running

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import start_oma_api  # noqa: E402

MiB = 1 << 20


@contextlib.contextmanager
def oma_api(stderr: Any = None, **env: str) -> Iterator[tuple[int, str]]:
    """`oma-api` as a process with OMA_* settings; yields its pid and base URL."""
    args = {"env": {f"OMA_{k.upper()}": v for k, v in env.items()}}
    if stderr is not None:
        args["stderr"] = stderr
    proc, base, _ = start_oma_api(**args)
    try:
        yield proc.pid, base
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def body_of(size: int) -> AsyncIterator[bytes]:
    """A streamed body (chunked, no Content-Length): the test never holds it."""
    chunk = b"x" * MiB
    for _ in range(size // MiB):
        yield chunk


async def http_login(client: httpx.AsyncClient) -> dict[str, str]:
    r = await client.post("/api/v1/auth/login", json={"appliance_id": "test-vma", "token": SEED_TOKEN,
                                                      "version": "1.0.0"})
    assert r.status_code == 200, r.text
    return {"Authorization": f"Bearer {r.json()['session_token']}"}


# --- request bodies ---------------------------------------------------------------------------
async def test_200mb_bodies_refused_while_streaming_without_growing_rss():
    with oma_api() as (pid, base):
        async with httpx.AsyncClient(base_url=base, timeout=120) as client:
            auth = await http_login(client)
            assert (await client.get("/api/v1/vm-contexts", headers=auth)).status_code == 200
            before = rss_bytes(pid)
            json_type = {"content-type": "application/json"}
            big = 200 * MiB
            cases = [  # (path, headers, declared length, expected status)
                ("/api/v1/auth/login", json_type, False, 413),
                ("/api/v1/replications", json_type, False, 401),       # refused before the body is read
                ("/api/v1/replications", {**json_type, **auth}, False, 413),
                ("/api/v1/auth/login", {**json_type, "content-length": str(big)}, True, 413),
            ]
            # In parallel, as in the report: four 200 MB logins took the process to 2 GB.
            replies = await asyncio.gather(*(client.post(path, headers=headers, content=body_of(big))
                                             for path, headers, _, _ in cases))
            grown = rss_bytes(pid) - before
            for (path, _, _, status), r in zip(cases, replies):
                body = assert_error_shape(r, status)
                if status == 413:
                    assert body["error"] == "Request too large" and str(MiB) in body["details"], body
            assert grown < 50 * MiB, f"RSS grew by {grown / MiB:.1f} MiB"
            print(f"\nfour parallel 200 MiB bodies refused; RSS {before / MiB:.0f} MiB, grew {grown / MiB:.1f} MiB")
            # The connection and the server are fine afterwards, and a body under the limit passes.
            r = await client.post("/api/v1/ossea/config", json={"action": "get", "name": "x" * (MiB // 2)},
                                  headers=auth)
            assert r.status_code in (200, 400, 404), r.text


async def test_protected_route_checks_the_token_before_the_body(make_settings):
    """Unauthenticated: 401 even for a body that is not JSON at all (it was parsed first before)."""
    async with running(make_settings(), ("auth", "replication")) as client:
        r = await client.post("/api/v1/replications", content=b"{not json", headers={"content-type":
                                                                                      "application/json"})
        assert_error_shape(r, 401)
        headers = await login(client)
        r = await client.post("/api/v1/replications", content=b"{not json",
                              headers={**headers, "content-type": "application/json"})
        assert assert_error_shape(r, 400)["error"] == "Invalid JSON"
        r = await client.post("/api/v1/auth/login", content=b"x" * (MiB + 1))
        assert assert_error_shape(r, 413)["error"] == "Request too large"


# --- proxy headers ----------------------------------------------------------------------------
async def _failed_login_log(tmp_path: Path, **env: str) -> str:
    log = tmp_path / f"oma-api-{len(env)}.log"
    with log.open("wb") as err, oma_api(stderr=err, **env) as (_, base):
        async with httpx.AsyncClient(base_url=base) as client:
            r = await client.post("/api/v1/auth/login", headers={"X-Forwarded-For": "1.2.3.4"},
                                  json={"appliance_id": "test-vma", "token": "wrong", "version": "1.0.0"})
            assert_error_shape(r, 401)
    text = log.read_text()
    lines = [orjson.loads(x) for x in text.splitlines() if x.startswith("{")]
    return next(rec for rec in lines if rec.get("msg") == "login failed")["client"], text


async def test_forwarded_for_ignored_unless_the_proxy_is_trusted(tmp_path: Path):
    client, text = await _failed_login_log(tmp_path)
    assert client == "127.0.0.1" and "1.2.3.4" not in text
    client, _ = await _failed_login_log(tmp_path, trusted_proxies="127.0.0.1")
    assert client == "1.2.3.4"  # the operator's proxy is believed


# --- slow and excess connections --------------------------------------------------------------
def _raise_own_file_limit(need: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(need, hard), hard))


async def _half_open(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, float]:
    started = time.monotonic()  # the server's deadline starts when it accepts: after this
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /health HTTP/1.1\r\nHost: oma\r\nX-Slow: ")
    await writer.drain()
    return reader, writer, started


async def _closed_after(reader: asyncio.StreamReader, started: float, limit: float) -> float:
    try:
        data = await asyncio.wait_for(reader.read(1024), limit)
    except ConnectionResetError:
        data = b""
    assert data == b"", data  # closed, no response to a half-sent head
    return time.monotonic() - started


async def test_half_open_flood_is_dropped_within_the_header_timeout():
    flood, timeout = 2000, 3.0
    _raise_own_file_limit(flood + 512)
    with oma_api(header_timeout=str(timeout)) as (_, base):
        port = int(base.rsplit(":", 1)[1])
        conns = []
        for i in range(0, flood, 200):  # the listen backlog is uvicorn's 2048
            conns += await asyncio.gather(*(_half_open(port) for _ in range(200)))
        async with httpx.AsyncClient(base_url=base, timeout=10) as client:
            t0 = time.monotonic()
            auth = await http_login(client)
            r = await client.get("/api/v1/vm-contexts", headers=auth)
            during = time.monotonic() - t0
        assert r.status_code == 200, r.text
        lifetimes = await asyncio.gather(*(_closed_after(rd, t, timeout + 10) for rd, _, t in conns))
        for _, writer, _ in conns:
            writer.close()
        # Each one closed by its own deadline, not earlier, not much later.
        assert min(lifetimes) >= timeout - 0.05 and max(lifetimes) < timeout + 1.5, (min(lifetimes), max(lifetimes))
        assert during < timeout, during  # served during the flood, not after it
        print(f"\n{flood} half-open connections closed after {min(lifetimes):.2f}-{max(lifetimes):.2f} s "
              f"(header timeout {timeout} s); login + request during the flood {during * 1000:.0f} ms")


async def test_connections_beyond_the_cap_get_a_clear_503():
    cap = 20
    with oma_api(max_connections=str(cap), header_timeout="30") as (_, base):
        port = int(base.rsplit(":", 1)[1])
        idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(cap)]
        await asyncio.sleep(0.2)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /health HTTP/1.1\r\nHost: oma\r\n\r\n")
        raw = await asyncio.wait_for(reader.read(), 5)  # the server closes after its answer
        head, _, body = raw.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503"), raw
        assert orjson.loads(body) == {"success": False, "error": "Service unavailable",
                                      "details": "too many open connections; retry shortly"}
        writer.close()
        for _, w in idle:
            w.close()
        await asyncio.sleep(0.3)
        async with httpx.AsyncClient(base_url=base) as client:
            assert (await client.get("/health")).status_code == 200


async def test_a_refused_upload_cannot_keep_streaming():
    """401 before the body is read; the rest is discarded for header_timeout at most, then cut."""
    timeout = 2.0
    with oma_api(header_timeout=str(timeout)) as (_, base):
        reader, writer = await asyncio.open_connection("127.0.0.1", int(base.rsplit(":", 1)[1]))
        writer.write(b"POST /api/v1/replications HTTP/1.1\r\nHost: oma\r\nContent-Type: application/json\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 401"), head
        answered = time.monotonic()

        async def trickle():  # a 1 KiB chunk every 0.2 s, until the server cuts the connection
            with contextlib.suppress(ConnectionError):
                while True:
                    writer.write(b"400\r\n" + b"x" * 1024 + b"\r\n")
                    await writer.drain()
                    await asyncio.sleep(0.2)
        feeder = asyncio.create_task(trickle())
        try:
            with contextlib.suppress(ConnectionError):
                while await asyncio.wait_for(reader.read(65536), timeout + 5):  # the 401's body, then EOF
                    pass
            cut_after = time.monotonic() - answered
        finally:
            feeder.cancel()
        assert timeout - 0.3 <= cut_after < timeout + 3, cut_after
        writer.close()


def test_file_limit_raised_and_cap_fits_it():
    from oma.services.gateway.server import FD_RESERVE, connection_cap, raise_file_limit
    from oma.shared.settings import Settings

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(1024, hard), hard))
        assert raise_file_limit() == hard == resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        assert connection_cap(Settings(max_connections=10**6), 2000) == 2000 - FD_RESERVE
        assert connection_cap(Settings(max_connections=100), 2000) == 100
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


# --- /health ----------------------------------------------------------------------------------
async def test_health_callers_share_one_check_per_ttl(make_settings):
    async with running(make_settings(health_cache_ttl=1.0)) as client:
        nc = client.app.state.bus.nc
        pings = []

        async def count(msg):
            pings.append(msg)
        sub = await nc.subscribe("$SRV.PING.auth", cb=count)  # a copy of each ping the gateway sends
        await nc.flush()
        replies = await asyncio.gather(*(client.get("/health") for _ in range(100)))
        assert {r.status_code for r in replies} == {200}
        assert len({r.content for r in replies}) == 1  # the same answer for everyone
        await asyncio.sleep(0.1)
        assert len(pings) == 1, len(pings)
        await asyncio.sleep(1.0)
        assert (await client.get("/health")).status_code == 200
        await asyncio.sleep(0.1)
        assert len(pings) == 2, len(pings)
        await sub.unsubscribe()


async def test_health_degraded_service_gives_503_with_its_reason(make_settings):
    """A service that answers its health check with a status other than "up" (the export manager
    when its NBD server is not serving) makes /health 503 with the reason; only public fields pass."""
    from oma.shared.subjects import health

    async with running(make_settings(health_cache_ttl=0)) as client:
        await client.appliance.services["config"].stop()
        nc = client.app.state.bus.nc
        reply = {"service": "config", "status": "degraded", "reason": "NBD exporter not serving: port in use",
                 "database": "connected", "pid": 4242, "state_dir": "/var/lib/oma/x", "password": "hunter2"}

        async def degraded(msg):
            await msg.respond(orjson.dumps(reply))
        sub = await nc.subscribe(health("config"), cb=degraded)
        r = await client.get("/health")
        await sub.unsubscribe()
        body = r.json()
        assert r.status_code == 503 and body["status"] == "degraded", body
        assert body["reasons"] == ["config: NBD exporter not serving: port in use"]
        assert body["down"] == ["config"] and body["version"] == "1.0.0" and body["database"] == "connected"
        assert body["services"]["config"] == {"status": "degraded", "database": "connected",
                                              "reason": "NBD exporter not serving: port in use", "instances": 0}
        assert "hunter2" not in r.text and "4242" not in r.text


@pytest.mark.parametrize("path", ["/api/v1/auth/logout", "/api/v1/vms", "/api/v1/nope"])
async def test_every_api_path_but_login_needs_a_session(make_settings, path):
    async with running(make_settings(), ("auth",)) as client:
        assert_error_shape(await client.post(path, json={}), 401)


async def test_health_answers_are_paced(make_settings):
    """Beyond health_max_rate a second, /health callers wait their turn (lower bound only)."""
    async with running(make_settings(health_max_rate=20), ("auth",)) as client:
        t0 = time.monotonic()
        replies = await asyncio.gather(*(client.get("/health") for _ in range(11)))
        assert {r.status_code for r in replies} == {503}  # only auth runs: degraded, and still paced
        assert time.monotonic() - t0 >= 0.5 - 0.01
