"""Registers the built-in VMA client under the name "http", and its settings section `vma`."""
from __future__ import annotations

from typing import Any

from pydantic import Field

from shared.hookspecs import PluginSettings, hookimpl
from plugins.vma.client import DEFAULT_URL, HttpVmaClient

DESCRIPTION = "the VMA's HTTP API (aiohttp; timeouts, retries of transient failures)"


class VmaSettings(PluginSettings):
    timeout: float = Field(30.0, gt=0, description="VMA API request timeout (seconds)")
    retries: int = Field(3, ge=0, description="retries of a transient VMA failure (refused, 502/503/504)")


def factory(api_url: str | None = None, settings: Any = None) -> HttpVmaClient:
    """Build a client of the VMA at `api_url` (default the reverse tunnel, http://127.0.0.1:9081),
    with the timeout and retries of `settings.vma` (OMA_VMA_TIMEOUT, OMA_VMA_RETRIES)."""
    if settings is None:
        from shared.settings import Settings  # not at the top: shared.settings loads the plugins
        settings = Settings()
    vma: VmaSettings = settings.vma
    return HttpVmaClient(api_url or DEFAULT_URL, timeout=vma.timeout, retries=vma.retries)


@hookimpl
def oma_register_settings(register) -> None:
    register("vma", VmaSettings)


@hookimpl
def oma_register_vma_clients(register) -> None:
    register("http", factory, description=DESCRIPTION)


@hookimpl
def oma_register_inventory_sources(register) -> None:
    from plugins.vma import inventory
    register("vma", inventory.factory, description="a vCenter reached through its VMA (POST /api/v1/discover)")
