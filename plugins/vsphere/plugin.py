"""Registers the built-in vSphere inventory source under the name "vsphere"."""
from __future__ import annotations

from typing import Any

from oma.shared.hookspecs import hookimpl
from oma.shared.settings import Settings
from oma.plugins.vsphere.source import VCenterConnection, VSphereSource

DESCRIPTION = "VMware vCenter through pyvmomi (PropertyCollector bulk reads)"


def factory(connection: VCenterConnection | dict[str, Any], settings: Settings | None = None) -> VSphereSource:
    """Build a `VSphereSource`. `connection` is a VCenterConnection or a dict of its fields; the
    timeout is `settings.vsphere_timeout` (a core setting: the gateway's wait derives from it)."""
    if isinstance(connection, dict):
        connection = VCenterConnection(**connection)
    return VSphereSource(connection, timeout=(settings or Settings()).vsphere_timeout)


@hookimpl
def oma_register_inventory_sources(register) -> None:
    register("vsphere", factory, description=DESCRIPTION)
