"""Replication while the NBD exporter does not serve (its port squatted by another process), against
the real nbdkit, the gateway and the CloudStack simulator: 503 in the seed's shape, no job and no
cloud call, so no volume is left behind; once the port is free the same request provisions."""
from __future__ import annotations

import socket

from tests.conftest import assert_error_shape, wait_for
from tests.nbdutil import free_port
from tests.test_replication import replication_env, request


async def test_replication_answers_503_and_creates_no_volume_while_exporter_down(make_settings, tmp_path):
    squat = socket.socket()
    squat.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    squat.bind(("127.0.0.1", free_port()))
    squat.listen()
    port = squat.getsockname()[1]
    try:
        async with replication_env(make_settings, tmp_path, nbd_port=port) as env:
            health = await env.client.get("/health")
            assert health.status_code == 503, health.text
            em = health.json()["services"]["export_manager"]
            assert em["status"] == "degraded" and em["reason"].startswith("NBD exporter not serving: ")
            assert "already in use" in em["reason"]

            r = await env.post(request(env.config_id, "squatted", disks=2))
            body = assert_error_shape(r, 503)
            assert body["error"] == "NBD exporter not serving" and "already in use" in body["details"]
            assert env.data_volumes() == {}
            assert env.commands("createVolume") == [] and env.commands("attachVolume") == []
            jobs = await env.client.get("/api/v1/replication/jobs", headers=env.headers)
            assert jobs.status_code == 200 and jobs.json()["jobs"] == [], jobs.text

            # the port comes free: export_manager's start retry brings nbdkit up, and the same request works
            squat.close()
            svc = env.client.appliance.services["export_manager"]

            async def serving() -> bool:
                return await svc.exporter_problem() is None
            await wait_for(serving, timeout=20, interval=0.2)
            r = await env.post(request(env.config_id, "squatted", disks=2))
            assert r.status_code == 201, r.text
            assert len(env.data_volumes()) == 2 and len(r.json()["nbd_exports"]) == 2
    finally:
        squat.close()
