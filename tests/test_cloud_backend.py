"""The cloud backend is chosen by `cloud_backend`, and only the contract (shared.contracts) is called:
a second, minimal backend registered in this file takes over the connection test and a whole
replication job (volumes, attach, export, release), and the CloudStack simulator hears nothing."""
from __future__ import annotations

import itertools
import uuid
from pathlib import Path
from typing import Any

import pytest

from oma.plugins.device import disk_serial
from oma.shared import plugins
from oma.shared.contracts import CloudClient, CloudParamError
from oma.shared.hookspecs import hookimpl
from tests.conftest import assert_error_shape
from tests.test_replication import replication_env, request

ZONE_ID, OFFERING_ID = "mini-zone-1", "mini-custom"
# What the mini cloud holds, across the clients the services make (one per job or test).
VOLUMES: dict[str, dict[str, Any]] = {}
CALLS: list[tuple[str, Any]] = []
_jobs = itertools.count(1)


class MiniCloud:
    """Volumes in a dict; attach makes the `virtio-<serial>` link the by-id resolver waits for."""

    def __init__(self, credentials: dict[str, Any], settings: Any):
        self.credentials = credentials
        self.devices = Path(settings.device.by_id_dir)

    async def close(self) -> None:
        pass

    async def test_connection(self, zone: str | None, oma_vm_id: str | None) -> dict[str, Any]:
        CALLS.append(("test_connection", zone))
        return {"zones_found": 1, "zone_verified": zone, "api_accessible": True, "backend": "mini"}

    async def list_zones(self) -> list[dict[str, Any]]:
        return [{"id": ZONE_ID, "name": "OSSEA-Zone"}]

    async def list_disk_offerings(self) -> list[dict[str, Any]]:
        return [{"id": OFFERING_ID, "iscustomized": True}]

    async def list_volumes(self, **filters: Any) -> list[dict[str, Any]]:
        keys = {k: v for k, v in filters.items() if k in ("id", "name", "virtualmachineid")}
        return [dict(v) for v in VOLUMES.values() if all(v.get(k) == want for k, want in keys.items())]

    async def start_create_volume(self, name: str, zone_id: str, disk_offering_id: str,
                                  size_gb: int) -> dict[str, Any]:
        assert (zone_id, disk_offering_id) == (ZONE_ID, OFFERING_ID)
        volume_id = str(uuid.uuid4())
        VOLUMES[volume_id] = {"id": volume_id, "name": name, "size": size_gb, "virtualmachineid": None}
        CALLS.append(("create", name))
        return {"id": volume_id, "jobid": f"mini-job-{next(_jobs)}"}

    async def wait_for_job(self, job_id: str, *, command: str | None = None,
                           resource_id: str | None = None) -> dict[str, Any]:
        return {}

    async def attach_volume(self, volume_id: str, virtual_machine_id: str) -> dict[str, Any]:
        volume = VOLUMES[volume_id]
        backing = self.devices / f"mini-{volume_id}.img"
        with open(backing, "wb") as f:
            f.truncate(volume["size"] << 30)
        (self.devices / f"virtio-{disk_serial(volume_id)}").symlink_to(backing)
        volume.update(virtualmachineid=virtual_machine_id, deviceid=1)
        CALLS.append(("attach", volume_id))
        return dict(volume)

    async def detach_volume(self, volume_id: str) -> dict[str, Any]:
        (self.devices / f"virtio-{disk_serial(volume_id)}").unlink(missing_ok=True)
        VOLUMES[volume_id]["virtualmachineid"] = None
        CALLS.append(("detach", volume_id))
        return dict(VOLUMES[volume_id])

    async def start_detach_volume(self, volume_id: str) -> dict[str, Any]:
        await self.detach_volume(volume_id)
        return {"jobid": f"mini-job-{next(_jobs)}"}

    async def delete_volume(self, volume_id: str) -> None:
        if VOLUMES.pop(volume_id, None) is None:
            raise CloudParamError("no such volume", errorcode=431, command="deleteVolume")
        CALLS.append(("delete", volume_id))


@hookimpl
def oma_register_cloud_backends(register) -> None:
    register("mini", MiniCloud, description="test-only cloud: volumes in a dict")


@pytest.fixture
def mini_registered(monkeypatch):
    """This module as a plugin, exactly as a third-party one would be loaded."""
    monkeypatch.setitem(plugins.DEFAULT_PLUGINS, "mini-cloud", __name__)
    VOLUMES.clear()
    CALLS.clear()


def test_mini_backend_satisfies_the_contract(tmp_path, make_settings):
    assert isinstance(MiniCloud({}, make_settings(device_by_id_dir=tmp_path)), CloudClient)


async def test_selected_backend_runs_the_connection_test_and_the_job(mini_registered, make_settings, tmp_path):
    async with replication_env(make_settings, tmp_path, cloud_backend="mini") as env:
        r = await env.client.post("/api/v1/ossea/config", headers=env.headers,
                                  json={"action": "test", "id": env.config_id})
        assert r.status_code == 200, r.text
        assert r.json()["details"]["backend"] == "mini"
        assert CALLS == [("test_connection", "OSSEA-Zone")]

        r = await env.post(request(env.config_id, "minivm", disks=2))
        assert r.status_code == 201, r.text
        reply = r.json()
        assert reply["status"] == "ready_for_sync"
        made = {v["volume_id"] for v in reply["created_volumes"]}
        assert made == set(VOLUMES) and len(made) == 2
        assert all(v["virtualmachineid"] for v in VOLUMES.values())
        assert {e["device_path"] for e in reply["nbd_exports"]} == {
            str((tmp_path / "dev" / f"mini-{v}.img").resolve()) for v in made}

        r = await env.delete(reply["job_id"])
        assert r.status_code == 200, r.text
        assert VOLUMES == {}
        # detach confirmed before delete, for every volume
        for volume_id in made:
            steps = [c for c, v in CALLS if v == volume_id]
            assert steps == ["attach", "detach", "delete"], steps
        # The CloudStack simulator the configuration points at was never called: other code ran.
        assert env.sim.calls == []


async def test_default_backend_is_still_ossea(make_settings, tmp_path):
    """Same request, backend `ossea`: the simulator answers it (and an unknown zone is its 502)."""
    async with replication_env(make_settings, tmp_path) as env:
        r = await env.client.post("/api/v1/ossea/config", headers=env.headers,
                                  json={"action": "test", "id": env.config_id, "configuration": {"zone": "nowhere"}})
        assert_error_shape(r, 502)
        assert "nowhere" in r.json()["details"]
        assert [c["command"] for c in env.sim.calls] == ["listZones"]
