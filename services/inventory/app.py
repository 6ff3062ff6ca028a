from __future__ import annotations

from shared.service import ServiceApp


class InventoryService(ServiceApp):
    name = "inventory"
    description = "vCenter connections and the source VM inventory"
