"""Wire contracts shared by the gateway (OpenAPI, first validation) and the services.

Field names are the seed's. Strings are bounded by their database columns, so oversized input is a
400 that names the field, never a database error.
"""
from __future__ import annotations

from typing import Any, Literal
from urllib.parse import urlparse

from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator

Name = Field(min_length=1, max_length=255)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)


class ErrorBody(BaseModel):
    success: Literal[False] = False
    error: str
    details: Any = None


# --- auth ------------------------------------------------------------------------------------
class LoginRequest(Strict):
    model_config = ConfigDict(extra="ignore", str_strip_whitespace=True, json_schema_extra={"examples": [
        {"appliance_id": "test-vma", "token": "vma_test_token_abc123def456789012345678", "version": "1.0.0"}]})
    appliance_id: str = Field(min_length=1, max_length=255)
    token: str = Field(min_length=1, max_length=512)
    version: str | None = Field(None, max_length=64)


class LoginResponse(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "success": True, "message": "Authentication successful",
        "session_token": "oma_session_xyz789abc456def123", "expires_at": "2025-08-06T12:00:00Z"}]})
    success: bool = True
    message: str
    session_token: str
    expires_at: str


# --- OSSEA configuration (the unified endpoint) ---------------------------------------------
def _check_url(v: str | None) -> str | None:
    if v is None:
        return v
    u = urlparse(v)
    if u.scheme not in ("http", "https") or not u.hostname:
        raise ValueError("must be an http(s) URL such as http://host:8080/client/api")
    try:
        u.port
    except ValueError:
        raise ValueError("has an invalid port") from None
    return v


class OsseaConfigFields(Strict):
    """Every field optional here; `create` and `test` check the required ones."""
    name: str | None = Field(None, min_length=1, max_length=255)
    api_url: str | None = Field(None, min_length=1, max_length=500)
    api_key: str | None = Field(None, min_length=1, max_length=500)
    secret_key: str | None = Field(None, min_length=1, max_length=500)
    domain: str | None = Field(None, max_length=255)
    zone: str | None = Field(None, min_length=1, max_length=255)
    oma_vm_id: str | None = Field(None, max_length=255)
    is_active: bool | None = None

    _url = field_validator("api_url")(classmethod(lambda cls, v: _check_url(v)))


OSSEA_EXAMPLE = {
    "name": "production-ossea", "api_url": "http://10.245.241.101:8080/client/api",
    "api_key": "GdsWBVHco0OOW4vBlgfnyzjru65FV-U1l1kKJ7n2WwH0gn3soTaZQZZyXfgUsxX7PyP06WrOOOcNRKmhRWDSlA",
    "secret_key": "uTCroKUkHZaNybhBXkcQsCb_eKDvZKbhHaZK4I1nHrGJYLKN-j0O-t9EGUx9yBdHH3F8dN5wVelitvdpQjwdcQ",
    "domain": "/", "zone": "OSSEA-Zone", "oma_vm_id": "f47ac10b-58cc-4372-a567-0e02b2c3d479"}


class OsseaConfigRequest(Strict):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"action": "get"}, {"action": "get", "id": 1},
        {"action": "create", "configuration": OSSEA_EXAMPLE},
        {"action": "update", "id": 1, "configuration": {"name": "production-ossea-updated",
                                                          "zone": "OSSEA-Zone-Updated"}},
        {"action": "delete", "id": 1},
        {"action": "test", "configuration": {k: OSSEA_EXAMPLE[k] for k in
                                             ("api_url", "api_key", "secret_key", "domain", "zone")}}]})
    action: Literal["get", "create", "update", "delete", "test"]
    id: StrictInt | None = Field(None, ge=1)
    configuration: OsseaConfigFields | None = None


# --- vCenter connections (same anti-sprawl pattern) ------------------------------------------
class VCenterFields(Strict):
    name: str | None = Field(None, min_length=1, max_length=255)
    host: str | None = Field(None, min_length=1, max_length=255)
    port: int | None = Field(None, ge=1, le=65535)
    username: str | None = Field(None, min_length=1, max_length=255)
    password: str | None = Field(None, min_length=1, max_length=500)
    datacenter: str | None = Field(None, max_length=255)
    verify_tls: bool | None = None


class VCenterRequest(Strict):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"action": "create", "configuration": {"host": "vcenter.example.com", "username": "administrator@vsphere.local",
                                               "password": "secret", "datacenter": "DatabanxDC"}},
        {"action": "get"}, {"action": "test", "id": 1}]})
    action: Literal["get", "create", "update", "delete", "test"]
    id: StrictInt | None = Field(None, ge=1)
    configuration: VCenterFields | None = None


# --- replication -----------------------------------------------------------------------------
class SourceDisk(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: str = Field(min_length=1, max_length=255)
    path: str | None = Field(None, max_length=1024)
    size_gb: float = Field(gt=0, le=65536)
    datastore: str | None = Field(None, max_length=255)
    capacity_bytes: int | None = Field(None, gt=0)
    unit_number: int | None = Field(None, ge=0, le=64)


class SourceVM(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: str = Field(min_length=1, max_length=255)
    name: str = Field(min_length=1, max_length=255)
    uuid: str | None = Field(None, max_length=64)
    path: str | None = Field(None, max_length=1024)
    datacenter: str | None = Field(None, max_length=255)
    cpus: int | None = Field(None, ge=0)
    memory_mb: int | None = Field(None, ge=0)
    disks: list[SourceDisk] = Field(min_length=1, max_length=64)


REPLICATION_EXAMPLE = {
    "source_vm": {"id": "vm-143233", "name": "PGWINTESTBIOS", "path": "/DatabanxDC/vm/PGWINTESTBIOS",
                  "datacenter": "DatabanxDC", "cpus": 2, "memory_mb": 4096,
                  "disks": [{"id": "disk-001", "path": "[datastore1] PGWINTESTBIOS/PGWINTESTBIOS.vmdk",
                             "size_gb": 40, "datastore": "datastore1", "capacity_bytes": 42949672960}]},
    "ossea_config_id": 1, "replication_type": "initial"}


class ReplicationRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [REPLICATION_EXAMPLE]})
    source_vm: SourceVM
    ossea_config_id: StrictInt = Field(ge=1)
    replication_type: Literal["initial", "incremental"] = "initial"


# --- failover -------------------------------------------------------------------------------
class FailoverOptions(Strict):
    service_offering: str | None = Field(None, min_length=1, max_length=255, description="name or id")
    template: str | None = Field(None, min_length=1, max_length=255, description="stub template, name or id")
    boot_type: Literal["BIOS", "UEFI"] | None = None
    network_profile: Literal["test", "production"] | None = None
    power_off_source: bool | None = None
    final_sync: bool | None = None
    convert: str | None = Field(None, max_length=64, description="converter plugin; only `none` for now")
    keep_snapshots: bool | None = None


class FailoverRequest(Strict):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True, json_schema_extra={"examples": [
        {"action": "test", "vm_name": "pgtest1", "options": {"service_offering": "Medium Instance"}},
        {"action": "cleanup", "vm_name": "pgtest1"}]})
    action: Literal["test", "live", "cleanup", "rollback"]
    vm_name: str = Name
    options: FailoverOptions = Field(default_factory=FailoverOptions)


class NetworkMappingFields(Strict):
    vcenter: str | None = Field(None, max_length=255, description="empty: any vCenter")
    source_network: str | None = Field(None, min_length=1, max_length=255)
    production_network_id: str | None = Field(None, min_length=1, max_length=64)
    test_network_id: str | None = Field(None, min_length=1, max_length=64)


class NetworkMappingRequest(Strict):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"action": "create", "mapping": {"source_network": "VM Network", "production_network_id": "0e00...01",
                                         "test_network_id": "0e00...11"}},
        {"action": "get"}, {"action": "delete", "id": 1}]})
    action: Literal["get", "create", "update", "delete"]
    id: StrictInt | None = Field(None, ge=1)
    mapping: NetworkMappingFields | None = None


class DiskProgress(BaseModel):
    model_config = ConfigDict(extra="forbid")
    unit_number: int = Field(ge=0, le=999)  # 0-64, or a multi-controller slot (replication)
    bytes_transferred: int | None = Field(None, ge=0)
    total_bytes: int | None = Field(None, ge=0)
    change_id: str | None = Field(None, max_length=255)


class ProgressReport(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"status": "replicating", "current_operation": "Transferring Data",
         "bytes_transferred": 21181880320, "total_bytes": 42949672960},
        {"status": "completed", "bytes_transferred": 42949672960, "total_bytes": 42949672960,
         "disks": [{"unit_number": 0, "change_id": "52 3c ec 1b 3a 0e 4b 8e-1e 7d 0c 5a 6d 2a 4f 10/42"}]}]})
    status: Literal["replicating", "completed", "failed"]
    current_operation: str | None = Field(None, max_length=255)
    bytes_transferred: int | None = Field(None, ge=0)
    total_bytes: int | None = Field(None, ge=0)
    disks: list[DiskProgress] | None = Field(None, max_length=64)
    error: str | None = Field(None, max_length=2000)
