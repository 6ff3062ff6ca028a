"""The cloud steps of a replication job, for one OSSEA configuration.

Transient cloud errors (530, HTTP timeouts, unreachable) are retried with shared.retry's backoff,
bounded by `cloud_job_timeout` per step; permanent ones (431, 532-535, no free disk slot) are raised at
once. Before a retry, what the failed attempt may have done is checked in the cloud (a volume created but
not answered, an attach that went through), so a retry never creates or attaches twice: that check is
why this loop is not shared.retry.retry. Only the contract (shared.contracts) is used, whatever the backend.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from prometheus_client import Counter

from oma.shared import errors
from oma.shared.contracts import CloudClient, CloudError, CloudParamError, CloudTimeout, CloudUnreachable
from oma.shared.errors import error_text  # noqa: F401  (the replication modules and failover import it from here)
from oma.shared.retry import backoff_delay

log = logging.getLogger("oma.replication.cloud")
T = TypeVar("T")

CLOUD_CALLS = Counter("oma_replication_cloud_calls_total", "CloudStack operations of replication jobs",
                      ["command", "result"])


def result_label(exc: BaseException | None) -> str:
    """Bounded: ok, timeout, unreachable, or CloudStack's errorcode (a small fixed set)."""
    if exc is None:
        return "ok"
    if isinstance(exc, CloudTimeout):
        return "timeout"
    if isinstance(exc, CloudUnreachable):
        return "unreachable"
    code = getattr(exc, "errorcode", None)
    return str(code) if code else "error"


class CloudOps:
    def __init__(self, client: CloudClient, settings: Any):
        self.client = client
        self.step_timeout = settings.cloud_job_timeout
        self.attempts = settings.cloud_retries
        self.backoff = settings.cloud_retry_backoff

    async def close(self) -> None:
        await self.client.close()

    async def _metered(self, command: str, fn: Callable[[], Awaitable[T]]) -> T:
        try:
            result = await fn()
        except CloudError as exc:
            CLOUD_CALLS.labels(command=command, result=result_label(exc)).inc()
            raise
        CLOUD_CALLS.labels(command=command, result="ok").inc()
        return result

    async def _retry_checking_cloud(self, command: str, fn: Callable[[], Awaitable[T]],
                                    before_retry: Callable[[CloudError], Awaitable[T | None]] | None = None) -> T:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.step_timeout
        attempt = 0
        while True:
            try:
                return await self._metered(command, fn)
            except CloudError as exc:
                attempt += 1
                delay = backoff_delay(attempt, self.backoff)
                if not exc.retryable or attempt >= self.attempts or loop.time() + delay > deadline:
                    raise
                log.info("cloudstack %s failed, retrying", command,
                         extra={"attempt": attempt, "delay": delay, "reason": exc.error})
                await asyncio.sleep(delay)
                if before_retry is not None:
                    done = await before_retry(exc)
                    if done is not None:
                        return done

    # -- lookups --------------------------------------------------------------------------------

    async def placement(self, zone: str) -> tuple[str, str]:
        """The zone's id (the configuration names it or gives its id) and the customized offering."""
        zones, offerings = await asyncio.gather(self._metered("listZones", self.client.list_zones),
                                                self._metered("listDiskOfferings", self.client.list_disk_offerings))
        match = next((z for z in zones if zone in (z.get("name"), z.get("id"))), None)
        if match is None:
            raise errors.BadGateway("Zone not found", f"zone {zone!r} is not visible to this OSSEA account")
        custom = next((o for o in offerings if o.get("iscustomized")), None)
        if custom is None:
            raise errors.BadGateway("No custom disk offering",
                                    "OSSEA offers no disk offering with iscustomized=true (needed for exact sizes)")
        return match["id"], custom["id"]

    async def volume(self, volume_id: str) -> dict[str, Any] | None:
        try:
            found = await self._metered("listVolumes", lambda: self.client.list_volumes(id=volume_id))
        except CloudParamError:  # CloudStack answers an unknown id with 431
            return None
        return found[0] if found else None

    async def attached_to(self, vm_id: str) -> list[dict[str, Any]]:
        """The data volumes attached to a VM (the appliance's: ours and anyone else's)."""
        found = await self._metered("listVolumes", lambda: self.client.list_volumes(virtualmachineid=vm_id,
                                                                                    type="DATADISK"))
        return [v for v in found if v.get("virtualmachineid") == vm_id]

    async def by_name(self, name: str) -> list[dict[str, Any]]:
        found = await self._metered("listVolumes", lambda: self.client.list_volumes(name=name))
        return [v for v in found if v.get("name") == name]  # some servers match names partially

    # -- steps ----------------------------------------------------------------------------------

    async def data_volumes(self) -> list[dict[str, Any]]:
        """Every data volume the account sees (paged): what the orphan sweep inspects."""
        return await self._metered("listVolumes", lambda: self.client.list_volumes(type="DATADISK"))

    async def create_volume(self, name: str, zone_id: str, offering_id: str, size_gb: int,
                            record: Callable[[str], Awaitable[None]],
                            sending: Callable[[], Awaitable[None]] | None = None) -> str:
        """createVolume and wait for its job; `record(id)` runs as soon as the cloud names the volume,
        `sending()` before each attempt (a restart then knows when the last one may still land)."""
        async def attempt() -> str:
            if sending is not None:
                await sending()
            submitted = await self.client.start_create_volume(name, zone_id, offering_id, size_gb)
            volume_id = submitted.get("id")
            if volume_id:
                await record(volume_id)
            await self.client.wait_for_job(submitted["jobid"], command="createVolume", resource_id=volume_id)
            return volume_id

        retried = False

        async def before_retry(exc: CloudError) -> str | None:
            nonlocal retried
            retried = True
            if exc.resource_id:  # the job failed: its volume stays allocated; drop it and try again
                await self._quietly(self.release(exc.resource_id))
                return None
            # No answer: the volume may exist all the same. Adopt it rather than create a second one.
            found = await self.by_name(name)
            if found:
                await record(found[0]["id"])
                return found[0]["id"]
            return None

        volume_id = await self._retry_checking_cloud("createVolume", attempt, before_retry)
        if retried:  # a failed attempt whose delete failed, or a second unanswered one
            await self._quietly(self.sweep(name, keep=volume_id))
        return volume_id

    async def attach(self, volume_id: str, vm_id: str) -> dict[str, Any]:
        async def before_retry(exc: CloudError) -> dict[str, Any] | None:
            current = await self.volume(volume_id)
            return current if current and current.get("virtualmachineid") == vm_id else None
        try:
            return await self._retry_checking_cloud(
                "attachVolume", lambda: self.client.attach_volume(volume_id, vm_id), before_retry)
        except CloudParamError:  # "not attached to any VM": an attach sent before a restart went through
            current = await self.volume(volume_id)
            if current and current.get("virtualmachineid") == vm_id:
                return current
            raise

    async def release(self, volume_id: str, *, detach_job: str | None = None,
                      submitted: Callable[[str], Awaitable[None]] | None = None) -> None:
        """Detach (if attached) and delete; a volume already gone is fine. Each detach's async job is
        handed to `submitted` before it is waited for; `detach_job` is one an earlier attempt submitted
        (its wait timed out): it is polled, never submitted again while the cloud still runs it (a
        second detach queued behind the first is the straggler of apache/cloudstack#14214)."""
        current = await self.volume(volume_id)
        if current is None:
            return
        if current.get("virtualmachineid") and detach_job:
            current = await self._earlier_detach(volume_id, detach_job)
            if current is None:
                return
        if current.get("virtualmachineid"):
            async def detached(exc: CloudError) -> dict[str, Any] | None:
                now = await self.volume(volume_id)
                return now if not now or not now.get("virtualmachineid") else None

            async def detach() -> dict[str, Any]:
                job_id = (await self.client.start_detach_volume(volume_id))["jobid"]
                if submitted is not None:
                    await submitted(job_id)
                return await self.client.wait_for_job(job_id, command="detachVolume", resource_id=volume_id)
            await self._retry_checking_cloud("detachVolume", detach, detached)

        async def gone(exc: CloudError) -> bool | None:
            return True if await self.volume(volume_id) is None else None
        await self._retry_checking_cloud("deleteVolume", lambda: self.client.delete_volume(volume_id), gone)

    async def _earlier_detach(self, volume_id: str, job_id: str) -> dict[str, Any] | None:
        """Wait for a detach submitted before; then the volume as it is now (None: gone). Still
        running after `cloud_job_timeout`: CloudTimeout, and the next retry polls it again."""
        try:
            await self._metered("queryAsyncJobResult", lambda: self.client.wait_for_job(
                job_id, command="detachVolume", resource_id=volume_id))
        except CloudTimeout:
            raise
        except CloudError as exc:  # it failed, or the cloud forgot it: the volume says what is left
            log.info("an earlier detach did not succeed", extra={"volume_id": volume_id, "job_id": job_id,
                                                                  "reason": exc.error})
        return await self.volume(volume_id)

    async def sweep(self, name: str, keep: str | None = None) -> list[str]:
        """Release every volume called `name` except `keep`: what failed or unanswered attempts left."""
        removed = []
        for vol in await self.by_name(name):
            if vol["id"] != keep:
                await self.release(vol["id"])
                removed.append(vol["id"])
        return removed

    @staticmethod
    async def _quietly(coro: Awaitable[Any]) -> None:
        try:
            await coro
        except Exception as exc:  # noqa: BLE001 - best effort; the name sweep at cleanup catches it
            log.warning("cloud cleanup step failed", extra={"reason": error_text(exc)})
