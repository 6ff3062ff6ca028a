"""`update` follows `test`'s rule: moving where a stored secret goes (OSSEA api_url, vCenter host /
port, TLS verification off) needs the secret in the same request, so update-then-test can never
send the stored API key, signature or password to another endpoint. A real TCP listener stands
for the attacker's endpoint and must receive nothing."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from oma.plugins.ossea.simulator import DEFAULT_VM_ID, CloudStackSimulator
from tests.conftest import assert_error_shape, login, running
from tests.vcsim import running_vcsim


class Listener:
    """A TCP server on a free loopback port that records every connection and byte."""

    def __init__(self) -> None:
        self.connections, self.received = 0, b""

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            self.received += await asyncio.wait_for(reader.read(65536), 2)
        except (TimeoutError, ConnectionError):
            pass
        writer.close()


@asynccontextmanager
async def listening() -> AsyncIterator[tuple[Listener, int]]:
    listener = Listener()
    server = await asyncio.start_server(listener._serve, "127.0.0.1", 0)
    try:
        yield listener, server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


async def test_ossea_update_cannot_redirect_the_stored_secret(make_settings):
    sim = CloudStackSimulator("the-api-key", "the-secret")
    url = await sim.start()
    try:
        async with listening() as (listener, port), \
                running(make_settings(cloud_timeout=3), ("auth", "config")) as client:
            h = await login(client)

            async def post(body: dict):
                return await client.post("/api/v1/ossea/config", headers=h, json=body)

            r = await post({"action": "create", "configuration": {
                "name": "sim", "api_url": url, "api_key": "the-api-key", "secret_key": "the-secret",
                "zone": "OSSEA-Zone", "oma_vm_id": DEFAULT_VM_ID}})
            cid = r.json()["configuration"]["id"]
            elsewhere = f"http://127.0.0.1:{port}/client/api"
            for moved in ({"api_url": elsewhere}, {"api_url": elsewhere, "api_key": "other-key"}):
                body = assert_error_shape(await post({"action": "update", "id": cid, "configuration": moved}), 400)
                assert "secret_key" in body["details"] and "api_url" in body["details"], body
                r = await post({"action": "test", "id": cid})  # still the stored endpoint
                assert r.status_code == 200 and r.json()["details"]["api_accessible"] is True, r.text
            r = await post({"action": "get", "id": cid})
            assert r.json()["configuration"]["api_url"] == url
            assert listener.connections == 0 and listener.received == b""
            # Other fields need no secret; with the secret the endpoint may move.
            r = await post({"action": "update", "id": cid, "configuration": {"zone": "OSSEA-Zone", "api_url": url}})
            assert r.status_code == 200, r.text
            r = await post({"action": "update", "id": cid, "configuration": {"api_url": elsewhere,
                                                                          "secret_key": "a-new-secret"}})
            assert r.status_code == 200 and r.json()["configuration"]["api_url"] == elsewhere, r.text
    finally:
        await sim.stop()


async def test_vcenter_update_cannot_redirect_the_stored_password(make_settings):
    password = "Vc-stored-password"
    with running_vcsim() as vc:
        async with listening() as (listener, port), running(make_settings(), ("auth", "inventory")) as client:
            h = await login(client)

            async def post(body: dict):
                return await client.post("/api/v1/vcenter/config", headers=h, json=body)

            r = await post({"action": "create", "configuration": {
                "host": vc.host, "port": vc.port, "username": vc.username, "password": vc.password,
                "verify_tls": False}})
            assert r.status_code == 201, r.text
            vid = r.json()["configuration"]["id"]
            for moved in ({"port": port}, {"host": "localhost", "port": port}):
                body = assert_error_shape(await post({"action": "update", "id": vid, "configuration": moved}), 400)
                assert "password" in body["details"] and "port" in body["details"], body
                r = await post({"action": "test", "id": vid})  # still vcsim
                assert r.status_code == 200 and r.json()["details"]["vm_count"] >= 1, r.text
            assert listener.connections == 0 and listener.received == b""

            # Turning TLS verification off is a move too; turning it on is not.
            r = await post({"action": "create", "configuration": {
                "host": "vcenter.example.com", "username": "administrator@vsphere.local", "password": password}})
            other = r.json()["configuration"]["id"]
            body = assert_error_shape(await post({"action": "update", "id": other,
                                                  "configuration": {"verify_tls": False}}), 400)
            assert "password" in body["details"] and "verify_tls" in body["details"]
            r = await post({"action": "update", "id": other, "configuration": {"verify_tls": False,
                                                                               "password": password}})
            assert r.status_code == 200 and r.json()["configuration"]["verify_tls"] is False, r.text
            r = await post({"action": "update", "id": other, "configuration": {"verify_tls": True, "name": "vc-2"}})
            assert r.status_code == 200 and r.json()["configuration"]["verify_tls"] is True, r.text

            r = await post({"action": "update", "id": vid, "configuration": {"port": port, "password": "new"}})
            assert r.status_code == 200 and r.json()["configuration"]["port"] == port, r.text
