"""Registers the built-in VMA client under the name "http" (its settings: plugins/vma/settings.py)."""
from __future__ import annotations

from shared.hookspecs import hookimpl
from shared.settings import Settings
from plugins.vma.client import DEFAULT_URL, HttpVmaClient
from plugins.vma.settings import VmaSettings

DESCRIPTION = "the VMA's HTTP API (aiohttp; timeouts, retries of transient failures)"


def factory(api_url: str | None = None, settings: Settings | None = None) -> HttpVmaClient:
    """Build a client of the VMA at `api_url` (default the reverse tunnel, http://127.0.0.1:9081),
    with the timeout and retries of `settings.vma` (OMA_VMA_TIMEOUT, OMA_VMA_RETRIES)."""
    vma: VmaSettings = (settings or Settings()).vma
    return HttpVmaClient(api_url or DEFAULT_URL, timeout=vma.timeout, retries=vma.retries)


@hookimpl
def oma_register_vma_clients(register) -> None:
    register("http", factory, description=DESCRIPTION)


@hookimpl
def oma_register_inventory_sources(register) -> None:
    from plugins.vma import inventory
    register("vma", inventory.factory, description="a vCenter reached through its VMA (POST /api/v1/discover)")
