"""The plugin manager (pluggy project `oma`) and backend selection by name."""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

import pluggy

from oma.shared import hookspecs

# Built-in plugins, registered under their entry-point names exactly like third-party ones.
DEFAULT_PLUGINS: dict[str, str] = {
    "storage": "oma.plugins.storage",
    "ossea": "oma.plugins.ossea.plugin",
    "nbd": "oma.plugins.nbd.plugin",
    "vsphere": "oma.plugins.vsphere.plugin",
    "device": "oma.plugins.device",
    "vma": "oma.plugins.vma.plugin",
    "convert": "oma.plugins.convert",
}

# The plugins' settings sections (`oma_register_settings`), entry-point group `oma.settings`. They are
# loaded while shared.settings builds the Settings tree, so these modules import pydantic and
# shared.hookspecs only, never their plugin's code (which may import shared.settings).
SETTINGS_PLUGINS: dict[str, str] = {
    "nbd": "oma.plugins.nbd.settings",
    "vma": "oma.plugins.vma.settings",
    "device": "oma.plugins.device",
    "convert": "oma.plugins.convert",
}

KINDS = {
    "storage": "oma_register_storage_backends",
    "cloud": "oma_register_cloud_backends",
    "inventory": "oma_register_inventory_sources",
    "exporter": "oma_register_exporters",
    "device-resolver": "oma_register_device_resolvers",
    "vma": "oma_register_vma_clients",
    "converter": "oma_register_converters",
}


class BackendNotFound(Exception):
    """A configured backend name that no plugin provides: fatal at start-up.
    (Not SystemExit: asyncio lets that escape the event loop instead of the task.)"""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True)
class Backend:
    name: str
    factory: Callable[..., Any]
    description: str
    plugin: str


def get_plugin_manager(load_entrypoints: bool = True, *, settings: bool = False) -> pluggy.PluginManager:
    """The backends' plugins, or with `settings` the settings sections' (SETTINGS_PLUGINS)."""
    builtin, group = (SETTINGS_PLUGINS, "oma.settings") if settings else (DEFAULT_PLUGINS, "oma")
    pm = pluggy.PluginManager("oma")
    pm.add_hookspecs(hookspecs)
    for name, module in builtin.items():
        pm.register(importlib.import_module(module), name=name)
    if load_entrypoints:
        pm.load_setuptools_entrypoints(group)  # skips names registered above
    pm.check_pending()
    return pm


def _registered(pm: pluggy.PluginManager, hook_name: str) -> dict[str, Backend]:
    found: dict[str, Backend] = {}
    for impl in reversed(getattr(pm.hook, hook_name).get_hookimpls()):  # later ones override earlier
        def register(name: str, factory: Callable[..., Any], description: str = "",
                     _plugin: str = impl.plugin_name) -> None:
            found[name] = Backend(name, factory, description, _plugin)
        impl.function(register=register)
    return found


def backends(pm: pluggy.PluginManager, kind: str) -> dict[str, Backend]:
    return _registered(pm, KINDS[kind])


def settings_sections(pm: pluggy.PluginManager) -> dict[str, type[hookspecs.PluginSettings]]:
    """section -> the plugin's settings model (`oma_register_settings`)."""
    sections = {name: b.factory for name, b in _registered(pm, "oma_register_settings").items()}
    for name, model in sections.items():
        if not (name.isidentifier() and name.islower() and isinstance(model, type)
                and issubclass(model, hookspecs.PluginSettings)):
            raise TypeError(f"settings section {name!r}: a lower-case identifier and a PluginSettings subclass")
    return sections


def get_backend(pm: pluggy.PluginManager, kind: str, name: str) -> Backend:
    available = backends(pm, kind)
    if name not in available:
        installed = ", ".join(sorted(available)) or "none"
        raise BackendNotFound(f"{kind} backend {name!r} can't be found, is the plugin not installed? "
                              f"Installed: {installed}")
    return available[name]
