"""An OSSEA configuration that a job still needs (in flight, holding volumes and exports, or with a
cleanup left) cannot be deleted: 409 naming the jobs (failover's are in tests/test_failover.py). Deleting the job releases its volume and
export with that configuration; then the configuration may go. Real nbdkit, NATS and SQLite; the
cloud is the project's simulator."""
from __future__ import annotations

from oma.services.replication import service as replication_service
from oma.shared.subjects import Replication
from tests.conftest import assert_error_shape, login, running, wait_for
from tests.test_replication import SERVICES, replication_env, request


async def test_a_configuration_in_use_cannot_be_deleted(make_settings, tmp_path, monkeypatch):
    async with replication_env(make_settings, tmp_path, services=(*SERVICES, "failover")) as env:
        async def delete_config():
            return await env.client.post("/api/v1/ossea/config", headers=env.headers,
                                         json={"action": "delete", "id": env.config_id})

        # Both jobs start in the same second (the clock held still): ids job-...-S and job-...-S-2.
        frozen = replication_service.utcnow()
        monkeypatch.setattr(replication_service, "utcnow", lambda: frozen)
        r = await env.post(request(env.config_id, "inuse-1"))
        assert r.status_code == 201, r.text
        ready = r.json()["job_id"]
        r = await env.post(request(env.config_id, "inuse-2"))
        assert r.status_code == 201, r.text
        completed = r.json()["job_id"]
        assert completed == f"{ready}-2", (ready, completed)
        await env.progress(completed, {"status": "completed"})  # finished, but still holds its volume

        body = assert_error_shape(await delete_config(), 409)
        assert body["error"] == "Configuration in use", body
        assert ready in body["details"] and completed in body["details"], body
        assert f"OSSEA configuration {env.config_id}" in body["details"]

        exporter = env.client.appliance.services["export_manager"].exporter
        for job_id in (ready, completed):
            disk = (await env.job(job_id))["disks"][0]
            assert disk["export_name"] in exporter.list_exports()
            r = await env.delete(job_id)
            assert r.status_code == 200 and r.json()["released_volumes"] == [disk["volume_id"]], r.text
            assert disk["volume_id"] not in env.sim.volumes
            assert disk["export_name"] not in exporter.list_exports()
        assert env.data_volumes() == {}

        bus = env.client.appliance.services["config"].bus  # the one service that asks this

        async def unused():  # answered at once since the DELETEs; the wait only guards a slow machine
            return (await bus.call(Replication.USING_CONFIG, {"ossea_config_id": env.config_id}))["job_ids"] == []
        await wait_for(unused, 15)
        r = await delete_config()
        assert r.status_code == 200, r.text
        assert_error_shape(await env.post(request(env.config_id, "inuse-3")), 404)


async def test_delete_refused_while_replication_cannot_answer(make_settings):
    """Without replication nobody can tell whether jobs use it: nothing is deleted (503)."""
    async with running(make_settings(), ("auth", "config")) as client:
        h = await login(client)
        r = await client.post("/api/v1/ossea/config", headers=h, json={"action": "create", "configuration": {
            "name": "c", "api_url": "http://127.0.0.1:9/client/api", "api_key": "k", "secret_key": "s",
            "zone": "Z"}})
        cid = r.json()["configuration"]["id"]
        body = assert_error_shape(await client.post("/api/v1/ossea/config", headers=h,
                                                    json={"action": "delete", "id": cid}), 503)
        assert "replication" in body["details"], body
        r = await client.post("/api/v1/ossea/config", headers=h, json={"action": "get", "id": cid})
        assert r.status_code == 200
