"""Registers the built-in VMA client under the name "http"."""
from __future__ import annotations

from typing import Any

from shared.hookspecs import hookimpl
from plugins.vma.client import DEFAULT_URL, HttpVmaClient

DESCRIPTION = "the VMA's HTTP API (aiohttp; timeouts, retries of transient failures)"


def factory(api_url: str | None = None, settings: Any = None) -> HttpVmaClient:
    """Build a client of the VMA at `api_url` (default the reverse tunnel, http://127.0.0.1:9081).
    `settings` (object or dict) may carry `vma_timeout` (seconds, default 30) and `vma_retries` (3)."""
    def get(name: str) -> Any:
        return settings.get(name) if isinstance(settings, dict) else getattr(settings, name, None)

    timeout, retries = get("vma_timeout"), get("vma_retries")
    return HttpVmaClient(api_url or DEFAULT_URL, timeout=float(timeout) if timeout else 30.0,
                         retries=int(retries) if retries is not None else 3)


@hookimpl
def oma_register_vma_clients(register) -> None:
    register("http", factory, description=DESCRIPTION)
