"""Registers the built-in vSphere inventory source under the name "vsphere"."""
from __future__ import annotations

from typing import Any

from shared.hookspecs import hookimpl
from plugins.vsphere.source import VCenterConnection, VSphereSource

DESCRIPTION = "VMware vCenter through pyvmomi (PropertyCollector bulk reads)"


def factory(connection: VCenterConnection | dict[str, Any], settings: Any = None) -> VSphereSource:
    """Build a `VSphereSource`. `connection` is a VCenterConnection or a dict of its fields;
    `settings` may carry `vsphere_timeout` (seconds, default 60)."""
    if isinstance(connection, dict):
        connection = VCenterConnection(**connection)
    if isinstance(settings, dict):
        timeout = settings.get("vsphere_timeout")
    else:
        timeout = getattr(settings, "vsphere_timeout", None)
    return VSphereSource(connection, timeout=float(timeout) if timeout else 60.0)


@hookimpl
def oma_register_inventory_sources(register) -> None:
    register("vsphere", factory, description=DESCRIPTION)
