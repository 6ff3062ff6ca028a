from __future__ import annotations

from shared.service import ServiceApp


class ReplicationService(ServiceApp):
    name = "replication"
    description = "Replication jobs: volumes, attachments, exports, progress"
