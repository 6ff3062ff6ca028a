"""The seed's anti-sprawl `action` endpoint: one request body ({action, id, configuration}) that
gets, creates, updates, deletes or tests a stored configuration. OSSEA configurations (config)
and vCenter connections (inventory) share it; each service keeps `test`, which calls outside.
"""
from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Generic, TypeVar

from pydantic import BaseModel
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from oma.shared import errors
from oma.shared.bus import Reply
from oma.shared.crypto import Keyring

Row = TypeVar("Row")
OnChanged = Callable[[Any, str], Awaitable[None]]  # (row, "create" | "update" | "delete")


def given(fields: BaseModel | None) -> dict[str, Any]:
    """The fields a request set (the gateway drops nulls, so a null means "not given" here too)."""
    return fields.model_dump(exclude_none=True) if fields is not None else {}


def require(values: dict[str, Any], names: Sequence[str], action: str) -> None:
    missing = [n for n in names if not values.get(n)]
    if missing:
        raise errors.BadRequest("Missing required fields", f"{action} needs configuration fields: {', '.join(missing)}")


def require_id(config_id: int | None, action: str) -> int:
    if config_id is None:
        raise errors.BadRequest("Missing required fields", f"{action} needs id")
    return config_id


class Store(Generic[Row]):
    """One kind of stored configuration (an ORM class with an integer `id`). Subclasses set the
    class attributes and implement `public`, `create` and `update` (given at least one field);
    list, load and delete are the same for every kind."""
    model: type[Row]
    label: str  # starts every message: "Configuration created successfully"
    kind: str  # names it in a 404's details: "No OSSEA configuration found with ID: 9"
    # Where the stored secret is sent (a boolean one: TLS verification), and the secret's field.
    endpoint_fields: tuple[str, ...]
    secret_field: str

    def __init__(self, keys: Keyring) -> None:
        self.keys = keys  # for the secret each kind stores encrypted

    def public(self, row: Row) -> dict[str, Any]:
        """The row as every response shows it (secrets redacted)."""
        raise NotImplementedError

    async def create(self, db: AsyncSession, values: dict[str, Any]) -> Row:
        raise NotImplementedError

    async def update(self, db: AsyncSession, config_id: int, values: dict[str, Any]) -> Row:
        raise NotImplementedError

    def not_found(self, config_id: int) -> errors.NotFound:
        return errors.NotFound(f"{self.label} not found", f"No {self.kind} found with ID: {config_id}")

    async def list_all(self, db: AsyncSession) -> list[dict[str, Any]]:
        return [self.public(r) for r in (await db.scalars(select(self.model).order_by(self.model.id))).all()]

    async def load(self, db: AsyncSession, config_id: int) -> Row:
        row = await db.get(self.model, config_id)
        if row is None:
            raise self.not_found(config_id)
        return row

    async def delete(self, db: AsyncSession, config_id: int) -> Row:
        row = await self.load(db, config_id)
        await db.delete(row)
        return row

    def keep_secret_home(self, stored: Row | dict[str, Any], values: dict[str, Any]) -> None:
        """A stored secret is only ever sent to its own endpoint: a request (`update` or `test`)
        that points it elsewhere, or turns TLS verification off, must give the secret too."""
        old = stored if isinstance(stored, dict) else {f: getattr(stored, f) for f in self.endpoint_fields}
        moved = [f for f in self.endpoint_fields
                 if f in values and values[f] != old.get(f) and values[f] is not True]
        if moved and self.secret_field not in values:
            raise errors.BadRequest(
                "Validation failed",
                f"configuration.{self.secret_field}: required when {', '.join(moved)} differs from the stored "
                "configuration (a stored secret is only sent to its own endpoint)")

    def merge_for_test(self, stored: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
        """A stored configuration overridden by the fields a `test` gives."""
        self.keep_secret_home(stored, values)
        return {**stored, **values}


async def run_action(sessions: async_sessionmaker[AsyncSession], store: Store[Any], action: str,
                     config_id: int | None, values: dict[str, Any], on_changed: OnChanged) -> dict[str, Any] | Reply:
    """get, create, update or delete; `on_changed` runs once a change is committed."""
    if action == "get":
        async with sessions() as db:
            if config_id is None:
                return {"success": True, "configurations": await store.list_all(db)}
            return {"success": True, "configuration": store.public(await store.load(db, config_id))}
    if action == "create":
        if config_id is not None:
            raise errors.BadRequest("Validation failed", "id: not allowed with create (ids are assigned)")
        async with sessions.begin() as db:
            row = await store.create(db, values)
        await on_changed(row, "create")
        return Reply({"success": True, "message": f"{store.label} created successfully",
                      "configuration": store.public(row)}, status=201)
    if action == "update":
        config_id = require_id(config_id, "update")
        if not values:
            raise errors.BadRequest("Missing required fields", "update needs a configuration with at least one field")
        async with sessions.begin() as db:
            store.keep_secret_home(await store.load(db, config_id), values)
            row = await store.update(db, config_id, values)
        await on_changed(row, "update")
        return {"success": True, "message": f"{store.label} updated successfully", "configuration": store.public(row)}
    if action == "delete":
        async with sessions.begin() as db:
            row = await store.delete(db, require_id(config_id, "delete"))
        await on_changed(row, "delete")
        return {"success": True, "message": f"{store.label} {row.name!r} (ID {row.id}) deleted", "id": row.id}
    raise ValueError(f"run_action does not handle {action!r}")  # `test` is the service's own

