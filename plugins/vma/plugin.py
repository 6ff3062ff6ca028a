"""Registers the built-in VMA client under the name "http" (its settings: plugins/vma/settings.py)."""
from __future__ import annotations

from oma.plugins.vma.client import factory
from oma.shared.hookspecs import hookimpl

DESCRIPTION = "the VMA's HTTP API (aiohttp; timeouts, retries of transient failures)"


@hookimpl
def oma_register_vma_clients(register) -> None:
    register("http", factory, description=DESCRIPTION)


@hookimpl
def oma_register_inventory_sources(register) -> None:
    from oma.plugins.vma import inventory
    register("vma", inventory.factory, description="a vCenter reached through its VMA (POST /api/v1/discover)")
