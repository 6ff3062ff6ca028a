"""How jobs look on the wire: the seed's create reply, the list/detail views, and the event payload
of docs/events.md. Pure functions of the rows."""
from __future__ import annotations

import uuid
from typing import Any

import orjson

from oma.services.replication.models import (
    COMPLETED,
    D_READY,
    ORIGINAL_FIELDS,
    QUEUED,
    READY,
    JobVolume,
    ReplicationJob,
)
from oma.shared.bus import event_envelope
from oma.shared.db import iso, iso_ms

VM_FIELDS = ("id", "uuid", "name", "path", "datacenter", "cpus", "memory_mb")


def source_vm(job: ReplicationJob) -> dict[str, Any]:
    return orjson.loads(job.source_vm)


def vm_view(job: ReplicationJob) -> dict[str, Any]:
    src = source_vm(job)
    return {k: src.get(k) for k in VM_FIELDS}


def disk_view(r: JobVolume) -> dict[str, Any]:
    return {"unit_number": r.unit_number, "disk_id": r.disk_id, "path": r.disk_path, "size_gb": r.size_gb,
            "capacity_bytes": r.capacity_bytes, "datastore": r.datastore, "volume_id": r.volume_id,
            "volume_name": r.volume_name, "device_id": r.device_id, "device_path": r.device_path,
            "export_name": r.export_name, "export_port": r.export_port, "reused": r.reused,
            "created_by_job": r.created_by_job, "attached": r.holds_volume and r.volume_id is not None,
            "status": r.status, "error": r.error, "previous_change_id": r.previous_change_id,
            "change_id": r.change_id, "bytes_transferred": r.bytes_transferred, "total_bytes": r.total_bytes}


def progress_percent(job: ReplicationJob, rows: list[JobVolume]) -> float:
    """While provisioning: the share of disks ready; afterwards: the VMA's transfer progress."""
    if job.status == QUEUED:
        return 0.0
    if job.ready_at is None and job.status != COMPLETED:
        return round(100.0 * sum(r.status == D_READY for r in rows) / max(len(rows), 1), 2)
    return round(job.progress_percent, 2)


def vma_sync_type(job: ReplicationJob, rows: list[JobVolume]) -> str:
    """`incremental` when every disk copies a CBT delta (it has a base change id), else `full`."""
    delta = job.replication_type == "incremental" and rows and all(r.previous_change_id for r in rows)
    return "incremental" if delta else "full"


def summary(job: ReplicationJob, rows: list[JobVolume], *, ms: bool = False) -> dict[str, Any]:
    when = iso_ms if ms else iso
    return {
        "job_id": job.job_id, "vm": vm_view(job), "vm_name": job.vm_name, "replication_type": job.replication_type,
        "ossea_config_id": job.ossea_config_id, "status": job.status,
        "progress_percent": progress_percent(job, rows), "current_operation": job.current_operation,
        "vma_throughput_mbps": round(job.vma_throughput_mbps, 2) if job.vma_throughput_mbps is not None else None,
        "vma_eta_seconds": job.vma_eta_seconds, "bytes_transferred": job.bytes_transferred,
        "total_bytes": job.total_bytes, "created_at": when(job.created_at), "started_at": when(job.started_at),
        "ready_at": when(job.ready_at), "completed_at": when(job.completed_at), "error": job.error,
        "vma_sync_type": vma_sync_type(job, rows), **{f: getattr(job, f) for f in ORIGINAL_FIELDS},
        "disks": [disk_view(r) for r in rows]}


def created_volumes(rows: list[JobVolume]) -> list[dict[str, Any]]:
    return [{"volume_id": r.volume_id, "volume_name": r.volume_name, "size_gb": r.size_gb,
             "status": "created" if r.created_by_job else "reused"} for r in rows if r.volume_id]


def mounted_volumes(rows: list[JobVolume]) -> list[dict[str, Any]]:
    """The original's `mounted_volumes`: OMA exports block devices and mounts nothing (mount_point null)."""
    return [{"ossea_volume_id": r.volume_id, "device_path": r.device_path, "mount_point": None, "status": r.status,
             "disk_unit_number": r.unit_number} for r in rows if r.volume_id]


def nbd_exports(job: ReplicationJob, rows: list[JobVolume]) -> list[dict[str, Any]]:
    return [{"export_name": r.export_name, "device_path": r.device_path, "port": r.export_port,
             "uri": r.export_uri, "reused": r.reused, "vm_id": job.vm_key, "disk_unit_number": r.unit_number}
            for r in rows if r.export_name and r.status == D_READY]


def create_reply(job: ReplicationJob, rows: list[JobVolume]) -> dict[str, Any]:
    """The seed's response to POST /api/v1/replications."""
    return {"job_id": job.job_id, "status": job.status, "progress_percent": progress_percent(job, rows),
            "source_vm": source_vm(job), "created_volumes": created_volumes(rows),
            "mounted_volumes": mounted_volumes(rows),
            "nbd_exports": nbd_exports(job, rows), "started_at": iso(job.started_at or job.created_at),
            "message": job.message}


def detail(job: ReplicationJob, rows: list[JobVolume]) -> dict[str, Any]:
    return {"success": True, **summary(job, rows), **create_reply(job, rows),
            "ready_for_sync": job.status == READY, "cleanup_pending": bool(job.cleanup_pending)}


def event(job: ReplicationJob, rows: list[JobVolume]) -> dict[str, Any]:
    """docs/events.md: the whole job summary, `seq` per job, `event_id` = the Nats-Msg-Id.
    The id is `<job_id>-<seq>-<random>`: job ids are unique only within one database, and the
    stream's duplicate window (2 min) would drop the events of another database's job with the
    same id (a memory appliance restarted, tests in the same second) as duplicates."""
    return {**event_envelope(f"{job.job_id}-{job.seq}-{uuid.uuid4().hex[:12]}"), "seq": job.seq,
            **summary(job, rows, ms=True)}
