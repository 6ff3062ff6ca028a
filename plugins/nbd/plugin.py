"""Registers the built-in NBD exporters (entry point `nbd = "oma.plugins.nbd.plugin"`)."""
from __future__ import annotations

from typing import Any

from oma.shared.hookspecs import Register, hookimpl

from .base import ExporterConfig
from .nbdkit import NbdkitExporter
from .nbdserver import NbdServerExporter


def nbdkit_exporter(settings: Any = None) -> NbdkitExporter:
    return NbdkitExporter(ExporterConfig.from_settings(settings))


def nbd_server_exporter(settings: Any = None) -> NbdServerExporter:
    return NbdServerExporter(ExporterConfig.from_settings(settings))


@hookimpl
def oma_register_exporters(register: Register) -> None:
    register("nbdkit", nbdkit_exporter,
             description="nbdkit file plugin in directory mode: an export is a symlink; "
                         "adding or removing one needs no reload (default)")
    register("nbd-server", nbd_server_exporter,
             description="nbd-server with one conf.d file per export; coalesced reloads "
                         "(SIGHUP on >= 3.25, restart of the main process before)")
