"""Registers the `ossea` cloud backend, and the connection test behind `{"action": "test"}`."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from oma.shared.contracts import CloudConfigError, CloudParamError
from oma.shared.hookspecs import Register, hookimpl

from .client import CloudCredentials, CloudStackClient


def create_client(credentials: CloudCredentials | Mapping[str, Any], settings: Any = None,
                  **kw: Any) -> OsseaCloud:
    """The backend factory: a client for one OSSEA configuration (dict or CloudCredentials)."""
    if isinstance(credentials, Mapping):
        fields = ("api_url", "api_key", "secret_key", "domain", "zone")
        credentials = CloudCredentials(**{k: credentials[k] for k in fields if k in credentials})
    if settings is not None:  # the cloud timeouts are the core's: the gateway's own waits derive from them
        kw.setdefault("timeout", settings.cloud_timeout)
        kw.setdefault("job_timeout", settings.cloud_job_timeout)
    return OsseaCloud.from_credentials(credentials, **kw)


class OsseaCloud(CloudStackClient):
    """The `ossea` backend's `oma.shared.contracts.CloudClient`: the API client plus its connection test."""

    async def test_connection(self, zone: str | None = None, oma_vm_id: str | None = None) -> dict[str, Any]:
        return await test_connection(self, zone, oma_vm_id)


@hookimpl
def oma_register_cloud_backends(register: Register) -> None:
    register("ossea", create_client,
             description="OSSEA / Apache CloudStack: volumes created and attached through its API")


async def test_connection(client: CloudStackClient, zone: str | None = None,
                          oma_vm_id: str | None = None) -> dict[str, Any]:
    """Sign a real listZones call, check the zone (by name or id) and the OMA VM exist.

    Returns the seed's `details` object; raises a CloudStackError subclass whose `details`
    tells the operator what to fix (auth, unreachable and timeout errors already do).
    """
    zones = await client.list_zones()
    names = [z.get("name", "") for z in zones]
    verified = None
    if zone:
        match = next((z for z in zones if zone in (z.get("name"), z.get("id"))), None)
        if match is None:
            known = ", ".join(repr(n) for n in names) or "none visible to this account"
            raise CloudConfigError(f"zone {zone!r} not found", command="listZones",
                                   details=f"Zone {zone!r} not found in OSSEA. Existing zones: {known}.")
        verified = match["name"]
    if oma_vm_id:
        await _check_vm(client, oma_vm_id)
    return {"zones_found": len(zones), "zone_verified": verified, "api_accessible": True}


# pytest would otherwise collect the helper above as a test when a test module imports it.
test_connection.__test__ = False  # type: ignore[attr-defined]


async def _check_vm(client: CloudStackClient, oma_vm_id: str) -> None:
    not_found = CloudConfigError(
        f"virtual machine {oma_vm_id!r} not found", command="listVirtualMachines",
        details=f"oma_vm_id {oma_vm_id!r} is not a virtual machine this OSSEA account can see: "
                "set it to the UUID of the OMA appliance's own VM.")
    try:
        vms = await client.list_virtual_machines(id=oma_vm_id)
    except CloudParamError:  # CloudStack answers an unknown or malformed UUID with 431
        raise not_found from None
    if not vms:
        raise not_found
