"""What every part of the CloudStack simulator shares: its fixed ids, the API error, a call's
parameters with CloudStack's validation errors, and the list envelope (paging, filters)."""
from __future__ import annotations

import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

DEFAULT_ZONE_NAME = "OSSEA-Zone"
DEFAULT_ZONE_ID = "a1b2c3d4-0000-4000-8000-000000000001"
DEFAULT_VM_ID = "f47ac10b-58cc-4372-a567-0e02b2c3d479"
CUSTOM_OFFERING_ID = "d0000000-0000-4000-8000-00000000000c"
FIXED_OFFERING_ID = "d0000000-0000-4000-8000-000000000014"
DOMAIN_ID = "d1000000-0000-4000-8000-000000000001"
ACCOUNT_ID = "ac000000-0000-4000-8000-000000000001"
MAX_PAGE_SIZE = 500
# CSExceptionErrorCode of the Java exception that usually carries each API errorcode.
_CS_ERROR_CODES = {431: 4350, 530: 4250, 531: 4365, 535: 4370}


class ApiError(Exception):
    """A CloudStack error reply: sync (HTTP status = errorcode) or the failure of a job."""

    def __init__(self, errorcode: int, errortext: str, cserrorcode: int | None = None):
        super().__init__(errortext)
        self.errorcode = errorcode
        self.errortext = errortext
        self.cserrorcode = cserrorcode or _CS_ERROR_CODES.get(errorcode, 9999)

    def body(self) -> dict[str, Any]:
        return {"uuidList": [], "errorcode": self.errorcode, "cserrorcode": self.cserrorcode,
                "errortext": self.errortext}


def _now() -> datetime:
    return datetime.now(UTC)


def _uuid() -> str:
    return str(uuid.uuid4())


class _Args:
    """The parameters of one call, looked up case-insensitively, with CloudStack's validation errors."""

    def __init__(self, command: str, params: Mapping[str, str]):
        self.command = command.lower()
        self.values = {k.lower(): v for k, v in params.items()}

    def get(self, name: str) -> str | None:
        return self.values.get(name)

    def required(self, name: str) -> str:
        value = self.values.get(name)
        if value is None:
            raise ApiError(431, f"Unable to execute API command {self.command} due to missing "
                                f"parameter {name}", 9999)
        return value

    def invalid(self, name: str) -> ApiError:
        return ApiError(431, f"Unable to execute API command {self.command} due to invalid value. "
                             f"Invalid parameter {name} value={self.values.get(name)} due to incorrect "
                             "long value format, or entity does not exist or due to incorrect "
                             "parameter annotation for the field in api cmd class.", 9999)

    def integer(self, name: str) -> int | None:
        value = self.values.get(name)
        if value is None:
            return None
        try:
            return int(value)
        except ValueError:
            raise self.invalid(name) from None

    def entity(self, table: Mapping[str, Any], name: str, *, required: bool = True) -> Any:
        """Resolve a UUID parameter; an unknown or malformed UUID is 431 with cserrorcode 9999."""
        value = self.required(name) if required else self.values.get(name)
        if value is None:
            return None
        if value not in table:
            raise self.invalid(name)
        return table[value]


def page(args: _Args, key: str, items: list[dict[str, Any]]) -> dict[str, Any]:
    """A list command's answer: `page`/`pagesize` applied, CloudStack's empty list as {}."""
    number, size = args.integer("page"), args.integer("pagesize")
    if number is not None and size is None:
        raise ApiError(431, '"pagesize" parameter is required when "page" is specified')
    if size is not None and not 0 < size <= MAX_PAGE_SIZE:
        raise ApiError(431, f"Page size can't exceed max allowed page size value: {MAX_PAGE_SIZE}")
    total = len(items)
    if size is not None:
        start = (max(number or 1, 1) - 1) * size
        items = items[start:start + size]
    return {"count": total, key: items} if items else {}  # CloudStack: an empty list is {}


def listing(args: _Args, key: str, table: Mapping[str, Any], *names: str,
            rows: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """A list command: an unknown `id` refused (431), then the rows (default: the table's own)
    filtered by the parameters `names` and paged under `key`."""
    args.entity(table, "id", required=False)
    return page(args, key, filtered(args, list(table.values()) if rows is None else rows, *names))


def filtered(args: _Args, rows: list[dict[str, Any]], *names: str) -> list[dict[str, Any]]:
    """The rows whose fields `names` equal the call's parameters of those names (when given)."""
    wanted = {n: args.get(n) for n in names if args.get(n) is not None}
    return [r for r in rows if all(str(r.get(n)) == v for n, v in wanted.items())]
