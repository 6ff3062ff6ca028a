from __future__ import annotations

from shared.service import ServiceApp


class ConfigService(ServiceApp):
    name = "config"
    description = "OSSEA (CloudStack) configuration"
