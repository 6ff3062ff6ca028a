"""Every NATS subject of the appliance, in one place.

Request/reply: `oma.<service>.<entity>.<verb>`; events: `oma.evt.<service>.<entity>.<past_tense>`.
The OMA_EVENTS stream captures `oma.evt.>` only, never request/reply subjects.
"""
from __future__ import annotations

EVENTS_STREAM = "OMA_EVENTS"
EVENTS_WILDCARD = "oma.evt.>"


def health(service: str) -> str:
    return f"oma.{service}.health.check"


class Auth:
    LOGIN = "oma.auth.session.login"
    LOGOUT = "oma.auth.session.logout"
    VERIFY = "oma.auth.session.verify"
    APPLIANCE_ADD = "oma.auth.appliance.add"
    APPLIANCE_LIST = "oma.auth.appliance.list"
    APPLIANCE_REVOKE = "oma.auth.appliance.revoke"
    # VMAs as appliances OMA drives (issue 16): the gateway's action endpoint, one appliance's API
    # URL (inventory, replication), and what replication found when it last called a VMA.
    APPLIANCE_ACTION = "oma.auth.appliance.action"
    APPLIANCE_GET = "oma.auth.appliance.get"
    APPLIANCE_SEEN = "oma.auth.appliance.seen"
    # Operators (people, web GUI): the gateway logs in, verifies and logs out; oma-admin manages them.
    USER_LOGIN = "oma.auth.user.login"
    USER_VERIFY = "oma.auth.user.verify"
    USER_LOGOUT = "oma.auth.user.logout"
    EVT_SESSION_REVOKED = "oma.evt.auth.session.revoked"
    EVT_APPLIANCE_REVOKED = "oma.evt.auth.appliance.revoked"


class Config:
    ACTION = "oma.config.ossea.action"          # the seed's unified endpoint
    CREDENTIALS = "oma.config.credentials.get"  # decrypted, for replication only
    EVT_CHANGED = "oma.evt.config.ossea.changed"


class Inventory:
    VCENTER_ACTION = "oma.inventory.vcenter.action"
    DISCOVER = "oma.inventory.vm.discover"
    POWER = "oma.inventory.vm.power"  # failover: source power-off / power-on
    LIST = "oma.inventory.vm.list"
    GET = "oma.inventory.vm.get"
    EVT_DISCOVERED = "oma.evt.inventory.vm.discovered"
    # The decrypted connection of a vCenter and its VMA (replication only; denied to the gateway).
    CONNECTION = "oma.inventory.vcenter.connection"


class Replication:
    CREATE = "oma.replication.job.create"
    LIST = "oma.replication.job.list"
    GET = "oma.replication.job.get"
    PROGRESS = "oma.replication.job.progress"
    CANCEL = "oma.replication.job.cancel"
    USING_CONFIG = "oma.replication.job.using_config"
    PREFLIGHT = "oma.replication.preflight.check"  # shared/preflight.py: a VM's checks, as create runs them  # config asks before deleting a configuration
    # The copier's change-id calls (services/replication/changeids.py).
    CHANGEID_GET = "oma.replication.changeid.get"
    CHANGEID_RECORD = "oma.replication.changeid.record"
    # Failover (services/replication/handover.py): a live cutover takes the VM's replica volumes, a
    # rollback gives them back.
    HANDOVER = "oma.replication.vm.handover"
    RECLAIM = "oma.replication.vm.reclaim"
    QUIESCE = "oma.replication.vm.quiesce"  # test failover: no new sync of the VM while it snapshots
    RESUME = "oma.replication.vm.resume"
    EVT_PREFIX = "oma.evt.replication.job"
    EVT_CREATED = "oma.evt.replication.job.created"
    EVT_STATUS = "oma.evt.replication.job.status_changed"
    EVT_PROGRESS = "oma.evt.replication.job.progressed"
    EVT_COMPLETED = "oma.evt.replication.job.completed"
    EVT_FAILED = "oma.evt.replication.job.failed"


class Failover:
    ACTION = "oma.failover.job.action"          # test | live | cleanup | rollback
    LIST = "oma.failover.job.list"
    GET = "oma.failover.job.get"
    MAPPINGS = "oma.failover.network.mappings"  # get | create | update | delete
    USING_CONFIG = "oma.failover.job.using_config"  # config asks before deleting a configuration
    EVT_STATUS = "oma.evt.failover.job.status_changed"


class Scheduler:
    GROUPS = "oma.scheduler.group.action"          # get | create | update | delete | add_vms | remove_vms
    SCHEDULES = "oma.scheduler.schedule.action"    # get | create | update | delete
    EXECUTIONS = "oma.scheduler.execution.list"
    PREFLIGHT = "oma.scheduler.preflight.run"      # {vm_names | group_id}: replication's checks per VM


class Exports:
    ENSURE = "oma.export_manager.export.ensure"
    LIST = "oma.export_manager.export.list"
    GET = "oma.export_manager.export.get"
    DEACTIVATE = "oma.export_manager.export.deactivate"
    REMOVE = "oma.export_manager.export.remove"
    RECONCILE = "oma.export_manager.export.reconcile"
    READY = "oma.export_manager.export.ready"   # 503 unless the NBD server serves (replication's pre-flight)
    EVT_CHANGED = "oma.evt.export_manager.export.changed"


class Contexts:
    LIST = "oma.context_aggregator.context.list"
    GET = "oma.context_aggregator.context.get"
    REBUILD = "oma.context_aggregator.context.rebuild"
    # Live notifications for SSE: core NATS, outside the stream (a full context per change).
    EVT_UPDATED = "oma.live.context_aggregator.context.updated"
    # `{"vm_names": [...]}` (null: every VM) as soon as a change is committed: caches drop replies.
    EVT_CHANGED = "oma.live.context_aggregator.context.changed"
