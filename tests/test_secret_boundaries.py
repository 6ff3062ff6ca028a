"""A stored secret is only ever sent to its own endpoint: `test` with an id may not point the stored
secret (OSSEA secret_key, vCenter password) at another host."""
from __future__ import annotations

from oma.plugins.ossea.simulator import DEFAULT_VM_ID, CloudStackSimulator
from tests.conftest import assert_error_shape, login, running


async def test_ossea_test_cannot_redirect_the_stored_secret(make_settings):
    sim = CloudStackSimulator("k", "s")
    url = await sim.start()
    try:
        async with running(make_settings(cloud_timeout=3), ("auth", "config")) as client:
            h = await login(client)
            r = await client.post("/api/v1/ossea/config", headers=h, json={"action": "create", "configuration": {
                "name": "sim", "api_url": url, "api_key": "k", "secret_key": "s", "zone": "OSSEA-Zone",
                "oma_vm_id": DEFAULT_VM_ID}})
            cid = r.json()["configuration"]["id"]
            elsewhere = "http://127.0.0.1:9/client/api"
            body = assert_error_shape(await client.post("/api/v1/ossea/config", headers=h, json={
                "action": "test", "id": cid, "configuration": {"api_url": elsewhere}}), 400)
            assert "secret_key" in body["details"] and "api_url" in body["details"]
            # The stored endpoint itself, or another endpoint with its own secret, are fine.
            r = await client.post("/api/v1/ossea/config", headers=h, json={"action": "test", "id": cid})
            assert r.status_code == 200 and r.json()["details"]["api_accessible"] is True
            r = await client.post("/api/v1/ossea/config", headers=h, json={
                "action": "test", "id": cid, "configuration": {"api_url": url, "zone": "OSSEA-Zone"}})
            assert r.status_code == 200, r.text
            assert_error_shape(await client.post("/api/v1/ossea/config", headers=h, json={
                "action": "test", "id": cid, "configuration": {"api_url": elsewhere, "secret_key": "x"}}), 502)
    finally:
        await sim.stop()


async def test_vcenter_test_cannot_redirect_the_stored_password(make_settings):
    async with running(make_settings(), ("auth", "inventory")) as client:
        h = await login(client)
        r = await client.post("/api/v1/vcenter/config", headers=h, json={"action": "create", "configuration": {
            "host": "vcenter.example.com", "username": "administrator@vsphere.local", "password": "p4ss"}})
        assert r.status_code == 201, r.text
        vid = r.json()["configuration"]["id"]
        for moved in ({"host": "attacker.example.com"}, {"port": 8443}, {"verify_tls": False}):
            body = assert_error_shape(await client.post("/api/v1/vcenter/config", headers=h, json={
                "action": "test", "id": vid, "configuration": moved}), 400)
            assert "password" in body["details"] and next(iter(moved)) in body["details"]
