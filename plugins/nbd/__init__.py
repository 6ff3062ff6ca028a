"""NBD export backends (exporter plugins): `nbdkit` (default) and `nbd-server`.

See docs/exporters.md. The export_manager service picks one by name through the
`oma_register_exporters` hook (plugins.nbd.plugin).
"""
from .base import (Exporter, ExporterConfig, ExporterStartError, ExportCheckError,
                   validate_device_path, validate_export_name)
from .nbdkit import NbdkitExporter
from .nbdserver import NbdServerExporter

__all__ = ["Exporter", "ExporterConfig", "ExporterStartError", "ExportCheckError",
           "NbdkitExporter", "NbdServerExporter", "validate_device_path", "validate_export_name"]
