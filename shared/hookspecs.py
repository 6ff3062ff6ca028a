"""Hook specifications of the `oma` plugin system.

Hooks are synchronous and receive a `register(name, factory, description="")` callback;
the factory builds an object whose async methods do the I/O. See docs/plugins.md.
"""
from __future__ import annotations

from typing import Any, Callable

import pluggy
from pydantic import BaseModel, ConfigDict

hookspec = pluggy.HookspecMarker("oma")
hookimpl = pluggy.HookimplMarker("oma")

Register = Callable[..., None]


@hookspec
def oma_register_storage_backends(register: Register) -> None:
    """Register database backends: `register(name, factory)`; `factory(settings)` returns a
    `StorageBackend` (shared.db) that builds an AsyncEngine for a service."""


@hookspec
def oma_register_cloud_backends(register: Register) -> None:
    """Register target-cloud clients: `register(name, factory)`; `factory(credentials, settings)`
    returns a `oma.shared.contracts.CloudClient` (plugins.ossea is the reference implementation)."""


@hookspec
def oma_register_inventory_sources(register: Register) -> None:
    """Register inventory sources: `register(name, factory)`; `factory(connection, settings)` returns
    a `oma.shared.contracts.InventorySource` whose async `test()` and `discover()` read a source hypervisor."""


@hookspec
def oma_register_exporters(register: Register) -> None:
    """Register NBD export backends: `register(name, factory)`; `factory(settings)` returns a
    `oma.shared.contracts.Exporter` that serves block devices under export names."""


@hookspec
def oma_register_device_resolvers(register: Register) -> None:
    """Register device resolvers: `register(name, factory)`; `factory(settings)` returns a
    `oma.shared.contracts.DeviceResolver` whose async `resolve(volume_id, timeout)` finds an attached
    volume's device path."""


@hookspec
def oma_register_vma_clients(register: Register) -> None:
    """Register VMA clients: `register(name, factory)`; `factory(api_url, settings)` returns a
    `VmaClient` (shared.vma) that talks to the appliance next to vCenter."""


@hookspec
def oma_register_settings(register: Register) -> None:
    """Register a plugin's settings: `register(section, model)`; `model` is a `PluginSettings`
    subclass. Its field `x` is read from `OMA_<SECTION>_<X>` and is `settings.<section>.x` in the one
    `oma.shared.settings.Settings` tree (documented by `python3 -m oma.shared.settings --markdown`)."""


class PluginSettings(BaseModel):
    """Base of a plugin's typed settings (see `oma_register_settings`). Every field needs a
    `description`: it is the documentation. Here, not in shared.settings, so that a plugin module can
    import it while shared.settings, which loads the plugins, is being imported."""
    # Other OMA_<SECTION>_* variables (settings of the core that share the prefix) are not ours.
    model_config = ConfigDict(extra="ignore")


@hookspec
def oma_register_converters(register: Register) -> None:
    """Register guest converters (failover's `convert` option): `register(name, factory)`;
    `factory(settings)` returns an object with `check()` and async `convert(device_path)` (plugins/convert.py)."""


def _all() -> list[Callable[..., Any]]:
    return [v for k, v in globals().items() if k.startswith("oma_")]
