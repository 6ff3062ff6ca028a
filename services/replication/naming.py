"""Names a job gives what it makes: job ids and volume names (how the orphan sweep recognises OMA's)."""
from __future__ import annotations

import math
import re
from datetime import datetime
from typing import Any

from oma.shared.schemas import GIB


def job_id_base(now: datetime) -> str:
    """The seed's `job-YYYYMMDD-HHMMSS`; `create` adds `-2`, `-3`... only when that second is taken."""
    return f"job-{now:%Y%m%d-%H%M%S}"


def rounded_gb(disk: Any) -> int:
    """Whole GiB, rounded up: from capacity_bytes when given (exact), else size_gb."""
    if disk.capacity_bytes:
        return max(1, math.ceil(disk.capacity_bytes / GIB))
    return max(1, math.ceil(disk.size_gb))


def volume_name(vm_name: str, unit: int, job_id: str) -> str:
    """Unique per job and disk: how a volume whose id was never recorded is found again, and how
    the orphan sweep proves a volume is OMA's (`parse_volume_name`)."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "-", vm_name)[:120]
    return f"migration-{safe}-disk-{unit}-{job_id}"


VOLUME_NAME_RE = re.compile(r"^migration-.+-disk-(?P<unit>\d+)-(?P<job_id>job-\d{8}-\d{6}(?:-\d+)?)$")


def parse_volume_name(name: str) -> tuple[str, int] | None:
    """(job_id, unit) of a name `volume_name` made, else None."""
    m = VOLUME_NAME_RE.match(name or "")
    return (m["job_id"], int(m["unit"])) if m else None
