from __future__ import annotations

from shared.service import ServiceApp


class ContextAggregatorService(ServiceApp):
    name = "context_aggregator"
    description = "Per-VM read model built from events"
