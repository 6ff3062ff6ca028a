"""Issue 14's inputs through the real gateway and services: numbers beyond what the database or the
JSON encoder hold, oversized or unsafe `source_vm` fields (refused before any CloudStack call), the
ETA on MariaDB, the seed's job ids, `size_gb` as an integer, bodies without a JSON Content-Type,
VM names with `/`, and a vCenter that answers like something else."""
from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import ssl
import subprocess
import uuid
from pathlib import Path
from typing import Any

import httpx
import orjson
import uvicorn

from oma.services.replication import service as replication_service
from oma.shared.schemas import INT32_MAX, SOURCE_VM_EXTRA_MAX
from tests.conftest import SEED_TOKEN, assert_error_shape, login, mariadb_settings, running, wait_for
from tests.test_replication import SERVICES, replication_env, request

BIG = (2 ** 63, 2 ** 64, 2 ** 70)
WITH_CONTEXTS = SERVICES + ("context_aggregator",)


def consumer() -> str:
    return f"context_aggregator-test-{uuid.uuid4().hex[:8]}"


async def test_numbers_beyond_int64_are_400_naming_the_field(make_settings, tmp_path):
    async with replication_env(make_settings, tmp_path, services=WITH_CONTEXTS,
                               contexts_consumer=consumer()) as env:
        c, h = env.client, env.headers
        calls_before = len(env.sim.calls)
        for n in BIG:
            for path in ("/api/v1/replication/jobs", "/api/v1/vm-contexts", "/api/v1/vms"):
                body = assert_error_shape(await c.get(path, params={"offset": n}, headers=h), 400)
                assert "offset" in body["details"], (path, body)
            body = assert_error_shape(await c.post("/api/v1/ossea/config", json={"action": "get", "id": n},
                                                   headers=h), 400)
            assert "id" in body["details"]
            body = assert_error_shape(await c.post("/api/v1/vcenter/config", json={"action": "delete", "id": n},
                                                   headers=h), 400)
            assert "id" in body["details"]
            req = request(env.config_id, "bigvm")
            assert "ossea_config_id" in assert_error_shape(await env.post({**req, "ossea_config_id": n}),
                                                           400)["details"]
            req["source_vm"]["disks"][0]["capacity_bytes"] = n
            assert "capacity_bytes" in assert_error_shape(await env.post(req), 400)["details"]
        # Bytes of a progress report: within int64, else 400 (the job is real and ready).
        r = await env.post(request(env.config_id, "progvm"))
        assert r.status_code == 201, r.text
        job_id = r.json()["job_id"]
        calls_before = len(env.sim.calls)
        for field in ("bytes_transferred", "total_bytes"):
            for n in BIG:
                body = assert_error_shape(await env.progress(job_id, {"status": "replicating", field: n}), 400)
                assert field in body["details"]
                body = assert_error_shape(await env.progress(job_id, {
                    "status": "replicating", "disks": [{"unit_number": 0, field: n}]}), 400)
                assert f"disks.0.{field}" in body["details"]
        assert "unit_number" in assert_error_shape(await env.progress(job_id, {
            "status": "replicating", "disks": [{"unit_number": 5000}]}), 400)["details"]
        ok = await env.progress(job_id, {"status": "replicating", "bytes_transferred": 2 ** 63 - 1,
                                         "total_bytes": 2 ** 63 - 1})
        assert ok.status_code == 200, ok.text
        assert len(env.sim.calls) == calls_before


async def test_bad_source_vm_is_refused_before_any_cloud_call(make_settings, tmp_path):
    async with replication_env(make_settings, tmp_path) as env:
        before = len(env.sim.calls)
        cases: list[tuple[str, dict[str, Any]]] = [
            ("source_vm.uuid", {"uuid": "../../etc"}),
            ("source_vm.uuid", {"uuid": "4205784a-098a-40f1-1f1e-a5cd2597fd59" * 3}),
            ("source_vm: id", {"id": "vm/../../x"}),              # no uuid: the id names the exports
            ("source_vm.name", {"name": "evil\nname"}),
            ("source_vm.path", {"path": "/DC/vm/\x00x"}),
            ("source_vm.cpus", {"cpus": 2 ** 70}),
            ("source_vm.memory_mb", {"memory_mb": 2 ** 40}),
            ("source_vm: unknown keys take", {"annotations": "x" * (SOURCE_VM_EXTRA_MAX + 1)}),
            ("source_vm: unknown keys must hold JSON", {"custom": {"n": 2 ** 70}}),
        ]
        for field, change in cases:
            body = request(env.config_id, "badvm")
            body["source_vm"].update(change)
            details = assert_error_shape(await env.post(body), 400)["details"]
            assert field in details, (field, details)
        disk_cases = [("disks.0.path", {"path": "[ds] a\nb.vmdk"}), ("disks.0.id", {"id": "d\x7f"}),
                      ("disks.0.size_gb", {"size_gb": 1e300}),
                      ("disks.0.controller_type", {"controller_type": "usb", "unit_number": 0}),
                      ("disks.0: unit_number", {"controller_type": "sata", "unit_number": 64}),
                      ("disks.0.unit_number", {"unit_number": 99999})]
        for field, change in disk_cases:
            body = request(env.config_id, "badvm")
            body["source_vm"]["disks"][0].update(change)
            details = assert_error_shape(await env.post(body), 400)["details"]
            assert field in details, (field, details)
        assert env.sim.calls[before:] == [], "a request refused with 400 reached the cloud"

        # Unknown keys under the limit are kept, and echoed as sent.
        body = request(env.config_id, "extravm")
        body["source_vm"]["annotations"] = {"owner": "dba", "n": 2 ** 62}
        r = await env.post(body)
        assert r.status_code == 201, r.text
        assert r.json()["source_vm"]["annotations"] == {"owner": "dba", "n": 2 ** 62}


async def test_eta_of_a_trickle_is_clamped_on_mariadb(make_settings, tmp_path, mariadb_name):
    """1 B then 3 B of 10 GB, 1.2 s apart: an ETA of ~190 million years must not overflow the column."""
    async with replication_env(make_settings, tmp_path, **mariadb_settings(mariadb_name)) as env:
        r = await env.post(request(env.config_id, "slowvm"))
        assert r.status_code == 201, r.text
        job_id = r.json()["job_id"]
        first = await env.progress(job_id, {"status": "replicating", "bytes_transferred": 1,
                                            "total_bytes": 10 * 10 ** 9})
        assert first.status_code == 200, first.text
        await asyncio.sleep(1.2)
        second = await env.progress(job_id, {"status": "replicating", "bytes_transferred": 3})
        assert second.status_code == 200, second.text
        assert second.json()["vma_eta_seconds"] == INT32_MAX
        detail = await env.job(job_id)
        assert detail["vma_eta_seconds"] == INT32_MAX and detail["bytes_transferred"] == 3


async def test_job_ids_in_the_seed_format_and_unique_within_a_second(make_settings, tmp_path, monkeypatch):
    async with replication_env(make_settings, tmp_path) as env:
        r = await env.post(request(env.config_id, "solo"))
        assert r.status_code == 201 and re.fullmatch(r"job-\d{8}-\d{6}", r.json()["job_id"]), r.text
        # Two jobs started in the same second (the clock held still): the later one gets a suffix.
        frozen = replication_service.utcnow()
        monkeypatch.setattr(replication_service, "utcnow", lambda: frozen)
        a, b = await env.post(request(env.config_id, "twin-a")), await env.post(request(env.config_id, "twin-b"))
        assert a.status_code == 201 and b.status_code == 201, (a.text, b.text)
        base = f"job-{frozen:%Y%m%d-%H%M%S}"
        ids = [a.json()["job_id"], b.json()["job_id"]]
        # `base` itself may be the first job's, when it started in that second too
        assert ids[0] in (base, base + "-2") and re.fullmatch(rf"{base}-\d", ids[1]), ids
        assert len(set(ids + [r.json()["job_id"]])) == 3
        for job_id in ids:
            assert (await env.job(job_id))["job_id"] == job_id


async def test_size_gb_is_an_integer_everywhere(make_settings, tmp_path):
    async with replication_env(make_settings, tmp_path, services=WITH_CONTEXTS,
                               contexts_consumer=consumer()) as env:
        body = request(env.config_id, "sizevm", size_gb=40)
        r = await env.post(body)
        assert r.status_code == 201, r.text
        raw = orjson.loads(r.content)
        assert raw["source_vm"]["disks"][0]["size_gb"] == 40 and b'"size_gb":40.0' not in r.content
        assert [v["size_gb"] for v in raw["created_volumes"]] == [40]
        detail = await env.client.get(f"/api/v1/replication/jobs/{raw['job_id']}", headers=env.headers)
        assert b'"size_gb":40.0' not in detail.content and detail.json()["disks"][0]["size_gb"] == 40

        async def context():
            c = await env.client.get("/api/v1/vm-contexts/sizevm", headers=env.headers)
            return c if c.status_code == 200 and c.json()["disks"] else None
        ctx = await wait_for(context, 30)
        assert b'"size_gb":40.0' not in ctx.content and ctx.json()["disks"][0]["size_gb"] == 40


async def test_a_job_id_seen_by_an_earlier_database_still_reaches_its_context(make_settings, tmp_path, monkeypatch):
    """Job ids are unique within one database: two fresh (memory) appliances on one stream, their
    jobs started in the same second, both get the id `job-...`. The second one's events must not be
    dropped as duplicates of the first's (the stream's 2-minute window keyed by event_id)."""
    monkeypatch.setattr(replication_service, "job_id_base", lambda now: "job-20260101-000000")
    for i, name in enumerate(("same-second-a", "same-second-b")):
        (tmp_path / str(i)).mkdir()
        async with replication_env(make_settings, tmp_path / str(i), services=WITH_CONTEXTS,
                                   contexts_consumer=consumer()) as env:
            r = await env.post(request(env.config_id, name))
            assert r.status_code == 201 and r.json()["job_id"] == "job-20260101-000000", r.text

            async def context(env=env, name=name):
                c = await env.client.get(f"/api/v1/vm-contexts/{name}", headers=env.headers)
                return c if c.status_code == 200 and c.json()["context"]["current_status"] == "ready_for_sync" \
                    else None
            ctx = await wait_for(context, 15)
            assert ctx.json()["context"]["vm_name"] == name


async def test_json_without_a_json_content_type(make_settings):
    async with running(make_settings(), ("auth",)) as client:
        login_body = orjson.dumps({"appliance_id": "test-vma", "token": SEED_TOKEN})
        # What `curl -d` sends, and no Content-Type at all: read as JSON.
        for headers in ({"Content-Type": "application/x-www-form-urlencoded"}, {}):
            r = await client.post("/api/v1/auth/login", content=login_body, headers=headers)
            assert r.status_code == 200, (headers, r.text)
        bad = await client.post("/api/v1/auth/login", content=b"appliance_id=x&token=y",
                                headers={"Content-Type": "application/x-www-form-urlencoded"})
        assert assert_error_shape(bad, 400)["error"] == "Invalid JSON"
        other = assert_error_shape(await client.post("/api/v1/auth/login", content=login_body,
                                                     headers={"Content-Type": "text/plain"}), 415)
        assert "Content-Type" in other["details"] and "application/json" in other["details"]
        h = await login(client)
        out = await client.post("/api/v1/auth/logout", headers={**h, "Content-Type": "text/plain"})  # no body
        assert out.status_code == 200, out.text


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_vm_names_with_a_slash_reach_their_context(make_settings, tmp_path):
    async with replication_env(make_settings, tmp_path, services=WITH_CONTEXTS,
                               contexts_consumer=consumer()) as env:
        c, h = env.client, env.headers
        r = await env.post(request(env.config_id, "a/b"))
        assert r.status_code == 201, r.text

        async def context():
            got = await c.get("/api/v1/vm-contexts/a%2Fb", headers=h)
            return got if got.status_code == 200 else None
        ctx = await wait_for(context, 15)
        assert ctx.json()["context"]["vm_name"] == "a/b"
        assert (await c.get("/api/v1/vm-contexts/a/b", headers=h)).json() == ctx.json()
        missing = assert_error_shape(await c.get("/api/v1/vm-contexts/no%2Fsuch/events", headers=h), 404)
        assert "no/such" in missing["details"]
        too_long = assert_error_shape(await c.get("/api/v1/vm-contexts/" + "x" * 300, headers=h), 400)
        assert "vm_name" in too_long["details"]

        # The stream of `a/b` (a real server: the in-process transport buffers whole responses).
        port = _free_port()
        server = uvicorn.Server(uvicorn.Config(c.app, host="127.0.0.1", port=port, lifespan="off", log_config=None))
        serving = asyncio.create_task(server.serve())
        try:
            await wait_for(lambda: asyncio.sleep(0, server.started), timeout=10)
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=15) as http:
                async with http.stream("GET", "/api/v1/vm-contexts/a%2Fb/events", headers=h) as s:
                    assert s.status_code == 200
                    buf = ""
                    async for chunk in s.aiter_text():
                        buf += chunk
                        if "\n\n" in buf:
                            break
                    frame = dict(line.split(": ", 1) for line in buf.split("\n\n")[0].splitlines())
                    assert frame["event"] == "context"
                    assert orjson.loads(frame["data"])["context"]["vm_name"] == "a/b"
        finally:
            server.should_exit = True
            await serving


@contextlib.asynccontextmanager
async def not_a_vcenter(tmp_path: Path):
    """An HTTPS web server (self-signed) that answers every request with an HTML page."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cert, key)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            page = b"<html><body>It works!</body></html>"
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: "
                         + str(len(page)).encode() + b"\r\nConnection: close\r\n\r\n" + page)
            await writer.drain()
        writer.close()
    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=tls)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


async def test_a_server_that_is_not_a_vcenter_is_a_502(make_settings, tmp_path):
    settings = make_settings(vsphere_timeout=5)
    async with not_a_vcenter(tmp_path) as port, running(settings, ("auth", "inventory")) as client:
        h = await login(client)
        r = await client.post("/api/v1/vcenter/config", headers=h, json={"action": "test", "configuration": {
            "host": "127.0.0.1", "port": port, "username": "u", "password": "p", "verify_tls": False}})
        body = assert_error_shape(r, 502)
        assert body["error"] == "vCenter error" and f"127.0.0.1:{port}" in body["details"], body
