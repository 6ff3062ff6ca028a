"""OSSEA configurations: stored with the secret encrypted, answered redacted, tested against the cloud.

Functions take the session (or the client factory) they work with; the app owns sessions and the bus.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from prometheus_client import Counter, Histogram
from pydantic import BaseModel, ConfigDict, Field, StrictInt
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from oma.services.config.models import OsseaConfig
from oma.shared import actions, errors
from oma.shared.actions import require
from oma.shared.bus import event_envelope
from oma.shared.contracts import CloudAuthError, CloudClient, CloudConfigError, CloudTimeout, CloudUnreachable
from oma.shared.crypto import Keyring
from oma.shared.db import iso, utcnow
from oma.shared.schemas import REDACTED

CREATE_REQUIRED = ("name", "api_url", "api_key", "secret_key", "zone")
TEST_REQUIRED = ("api_url", "api_key", "secret_key")
CONNECTION_FIELDS = ("api_url", "api_key", "secret_key", "domain", "zone", "oma_vm_id")

TESTS = Counter("oma_ossea_config_tests_total", "OSSEA connection tests by result", ["result"])
TEST_DURATION = Histogram("oma_ossea_config_test_duration_seconds", "OSSEA connection test time",
                          buckets=(.05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60))
CHANGES = Counter("oma_ossea_config_changes_total", "OSSEA configuration changes", ["action"])

# Metric label of a failed test, by the cloud client's error class (bounded, never a message).
_RESULTS: tuple[tuple[type[Exception], str], ...] = (
    (CloudAuthError, "auth_failed"), (CloudTimeout, "timeout"), (CloudUnreachable, "unreachable"),
    (CloudConfigError, "config_invalid"))


class CredentialsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: StrictInt = Field(ge=1)


def credentials(row: OsseaConfig, keys: Keyring) -> dict[str, Any]:
    """The decrypted configuration, for internal callers only (replication)."""
    secret = keys.decrypt(row.secret_key, f"secret_key of OSSEA configuration {row.id}")
    return {"id": row.id, "name": row.name, "api_url": row.api_url, "api_key": row.api_key,
            "secret_key": secret, "domain": row.domain, "zone": row.zone,
            "oma_vm_id": row.oma_vm_id, "is_active": row.is_active}


def event(row: OsseaConfig, action: str) -> dict[str, Any]:
    """`oma.evt.config.ossea.changed`: what changed, never a secret."""
    return {**event_envelope(), "id": row.id, "name": row.name, "action": action}


# -- storage -----------------------------------------------------------------------------------

async def _name_free(db: AsyncSession, name: str, config_id: int | None = None) -> None:
    other = await db.scalar(select(OsseaConfig.id).where(OsseaConfig.name == name))
    if other is not None and other != config_id:
        raise duplicate(name)


def duplicate(name: str) -> errors.Conflict:
    return errors.Conflict("Configuration already exists",
                           f"An OSSEA configuration named {name!r} already exists; choose another name "
                           "or update that one")


async def _flush(db: AsyncSession, name: str) -> None:
    # The unique index decides when two requests race past _name_free (and, on MariaDB, when
    # names differ only in case).
    try:
        await db.flush()
    except IntegrityError:
        raise duplicate(name) from None


class Configs(actions.Store[OsseaConfig]):
    """OSSEA configurations for shared.actions.run_action: the secret encrypted with `keys`."""
    model = OsseaConfig
    label = "Configuration"
    kind = "OSSEA configuration"
    endpoint_fields = ("api_url",)
    secret_field = "secret_key"

    def public(self, row: OsseaConfig) -> dict[str, Any]:
        """A configuration as every response shows it: the secret redacted."""
        return {"id": row.id, "name": row.name, "api_url": row.api_url, "api_key": row.api_key,
                "secret_key": REDACTED, "domain": row.domain, "zone": row.zone, "oma_vm_id": row.oma_vm_id,
                "is_active": row.is_active, "created_at": iso(row.created_at), "updated_at": iso(row.updated_at)}

    async def create(self, db: AsyncSession, values: dict[str, Any]) -> OsseaConfig:
        require(values, CREATE_REQUIRED, "create")
        await _name_free(db, values["name"])
        now = utcnow()
        row = OsseaConfig(name=values["name"], api_url=values["api_url"], api_key=values["api_key"],
                          secret_key=self.keys.encrypt(values["secret_key"]), domain=values.get("domain") or "/",
                          zone=values["zone"], oma_vm_id=values.get("oma_vm_id") or None,
                          is_active=values.get("is_active", True), created_at=now, updated_at=now)
        db.add(row)
        await _flush(db, row.name)
        return row

    async def update(self, db: AsyncSession, config_id: int, values: dict[str, Any]) -> OsseaConfig:
        """Partial: only the given fields (at least one) change, and updated_at."""
        row = await self.load(db, config_id)
        if "name" in values:
            await _name_free(db, values["name"], config_id)
        for field, value in values.items():
            if field == "secret_key":
                value = self.keys.encrypt(value)
            elif field == "domain":
                value = value or "/"
            elif field == "oma_vm_id":
                value = value or None
            setattr(row, field, value)
        row.updated_at = utcnow()
        await _flush(db, row.name)
        return row


# -- connection test ---------------------------------------------------------------------------

def _where(api_url: str) -> str:
    parts = urlsplit(api_url)
    return f"{parts.scheme}://{parts.hostname}{f':{parts.port}' if parts.port else ''}{parts.path}"


async def test_connection(make_client: Callable[[dict[str, Any]], CloudClient], values: dict[str, Any],
                          timeout: float) -> dict[str, Any]:
    """The configured cloud backend's connection test (for ossea: a signed listZones, then zone and
    OMA VM) within `timeout` seconds overall.

    Returns the seed's success body; raises 502 (refused, unreachable, TLS, zone or VM not found)
    or 504 (no answer in time) with details a person can act on.
    """
    require(values, TEST_REQUIRED, "test")
    started = time.perf_counter()
    result = "error"
    client = make_client({k: values[k] for k in CONNECTION_FIELDS if values.get(k) is not None})
    try:
        async with asyncio.timeout(timeout):  # one deadline for the whole test, retries included
            details = await client.test_connection(values.get("zone"), values.get("oma_vm_id"))
        result = "success"
        return {"success": True, "message": "OSSEA connection test successful", "details": details}
    except TimeoutError:
        result = "timeout"
        raise errors.UpstreamTimeout(
            "OSSEA request timed out",
            f"OSSEA at {_where(values['api_url'])} did not answer within {timeout:g}s; check api_url, "
            "the network path to the management server, and that it is running") from None
    except errors.OmaError as exc:
        result = next((label for cls, label in _RESULTS if isinstance(exc, cls)), "error")
        if exc.status == errors.UpstreamTimeout.status:
            raise errors.UpstreamTimeout(exc.error, exc.details) from None
        # A zone or VM the cloud does not have is still the cloud's answer: 502, as for the others.
        raise errors.BadGateway(exc.error, exc.details) from None
    finally:
        TESTS.labels(result=result).inc()
        TEST_DURATION.observe(time.perf_counter() - started)
        await client.close()
