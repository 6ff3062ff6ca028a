from __future__ import annotations

from shared.service import ServiceApp


class ExportManagerService(ServiceApp):
    name = "export_manager"
    description = "NBD exports with VM-based reuse"
