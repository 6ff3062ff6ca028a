"""An asyncio CloudStack (OSSEA) API client: Java-exact signing, async jobs, paging, typed errors.

Deliberately thin and self-contained: the `cs` package signs `~` wrongly and apache-libcloud
loses attachVolume's `deviceid` (see shared/reference/cloudstack.md).
"""
from __future__ import annotations

import asyncio
import logging
import re
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Self
from urllib.parse import quote, urlencode, urlsplit

import aiohttp
import orjson
from yarl import URL

from oma.shared.contracts import (
    CloudAuthError,
    CloudCapacityError,
    CloudConfigError,
    CloudError,
    CloudParamError,
    CloudTimeout,
    CloudUnreachable,
)
from oma.shared.retry import retry

from .signing import signed_query

log = logging.getLogger(__name__)

MAX_PAGE_SIZE = 500  # CloudStack's default.page.size
# Well inside the 15 minutes a server with enforce.post.requests.and.timestamps accepts,
# long enough to absorb modest clock skew.
SIGNATURE_LIFETIME = timedelta(minutes=10)
READ_PREFIXES = ("list", "query", "get")
POLL_MIN, POLL_FRACTION = 0.004, 0.2  # async-job polling (CloudStackClient._poll_pause)
POLL_EARLY = 0.5  # a job found done at its first poll after a pause is recorded as this share of it
# Recent durations of successful async jobs, per API endpoint and command: when to poll first
# (job_duration's lower bounds), and when they were found done (upper bounds: where to poll densely).
_JOB_TIMES: dict[tuple[str, str | None], deque[float]] = {}
_JOB_DONE: dict[tuple[str, str | None], deque[float]] = {}


# -- errors -------------------------------------------------------------------------------------

# The contract's errors (shared.contracts), under this client's historical names where they differ.
CloudStackError = CloudError


class CloudUnknownCommand(CloudStackError):
    error = "OSSEA does not offer this command"


class CloudInternalError(CloudStackError):
    error = "OSSEA internal error"
    retryable = True


class CloudPermissionError(CloudStackError):
    error = "OSSEA permission denied"


class CloudLimitError(CloudStackError):
    """Account resource limit, capacity or allocation failure: permanent until someone acts."""
    error = "OSSEA resource limit reached"


_BY_CODE: dict[int, type[CloudStackError]] = {
    401: CloudAuthError, 430: CloudParamError, 431: CloudParamError, 432: CloudUnknownCommand,
    530: CloudInternalError, 531: CloudPermissionError,
    532: CloudLimitError, 533: CloudLimitError, 534: CloudLimitError, 535: CloudLimitError,
}
_RETRYABLE_CODES = {429, 530}
# A VM with no free disk slot: CloudStack's data-volume limit (431 at submit, naming the limit), its
# device-id allocator (530 in the job) or the guest's PCI bus (530 from libvirt).
_DATA_DISK_LIMIT = re.compile(r"maximum number of data disks \((\d+)\) attached")
_NO_SLOT = ("All device Ids are used by vm", "No more available PCI slots")


def error_for(errorcode: int, errortext: str, command: str | None = None, *,
              cserrorcode: int | None = None, **kw: Any) -> CloudStackError:
    """Map a CloudStack errorcode (sync response or failed job) to our exception class."""
    limit = _DATA_DISK_LIMIT.search(errortext or "")
    if limit or any(t in (errortext or "") for t in _NO_SLOT):
        return CloudCapacityError(errortext, limit=int(limit[1]) if limit else None, errorcode=errorcode,
                                  command=command, cserrorcode=cserrorcode, retryable=False, **kw)
    cls = _BY_CODE.get(errorcode, CloudStackError)
    if cls is CloudAuthError:
        kw.setdefault("details", f"OSSEA rejected the API key or request signature ({errortext}). "
                                 "Check api_key and secret_key, and that this appliance's clock "
                                 "is correct: signed requests expire.")
    return cls(errortext, errorcode=errorcode, command=command, cserrorcode=cserrorcode,
               retryable=errorcode in _RETRYABLE_CODES or cls.retryable, **kw)


# -- credentials --------------------------------------------------------------------------------

@dataclass(frozen=True)
class CloudCredentials:
    api_url: str
    api_key: str
    secret_key: str = field(repr=False)
    domain: str = "/"
    zone: str | None = None


# -- client -------------------------------------------------------------------------------------

def job_duration(running: float, done: float) -> float:
    """What a finished job's polls say of its duration, for the next job's first poll: the last time
    it was seen running (a lower bound: the next first poll is not late). Found done at the first
    poll after a long pause, it may have been much faster: half that pause then, so jobs that got
    faster are soon polled at their pace. (Recording when a job was found done ratchets the first
    poll up: never earlier than the first job was found, whatever the jobs take since.)"""
    return max(running, POLL_EARLY * done)


def _is_read(command: str) -> bool:
    return command.lower().startswith(READ_PREFIXES)


def _wire(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


class CloudStackClient:
    """`async with CloudStackClient(url, key, secret) as cs: await cs.list_zones()`.

    Reads (list*, query*, get*) are retried with backoff on retryable errors; anything that
    changes state is sent once and its error raised, so the caller decides what to do.
    """

    def __init__(self, api_url: str, api_key: str, secret_key: str, *, timeout: float = 30.0,
                 job_timeout: float = 120.0, poll_interval: float = 0.5, retries: int = 2,
                 retry_backoff: float = 0.5):
        self.api_url, self.api_key, self._secret = api_url, api_key, secret_key
        self.timeout, self.job_timeout, self.poll_interval = timeout, job_timeout, poll_interval
        self.retries, self.retry_backoff = retries, retry_backoff
        self._session: aiohttp.ClientSession | None = None

    @classmethod
    def from_credentials(cls, credentials: CloudCredentials, **kw: Any) -> CloudStackClient:
        return cls(credentials.api_url, credentials.api_key, credentials.secret_key, **kw)

    def __repr__(self) -> str:
        return f"CloudStackClient(api_url={self.api_url!r})"

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout))
        return self._session

    # -- generic calls --------------------------------------------------------------------------

    async def call(self, command: str, **params: Any) -> dict[str, Any]:
        """Run one API command; return the inner `<command>response` object."""
        clean = {k: _wire(v) for k, v in params.items() if v is not None}
        loop = asyncio.get_running_loop()
        # `timeout` bounds the whole call, retries included, so callers can promise an answer in time.
        deadline = loop.time() + self.timeout

        async def once() -> dict[str, Any]:
            try:
                async with asyncio.timeout(max(deadline - loop.time(), 0.001)):
                    return await self._request(command, clean)
            except TimeoutError:
                raise CloudTimeout(f"OSSEA at {self._where()} did not answer {command} "
                                   f"within {self.timeout:g}s", command=command) from None
        return await retry(once, retry_if=lambda exc: getattr(exc, "retryable", False) and _is_read(command),
                           attempts=1 + (self.retries if _is_read(command) else 0), base=self.retry_backoff,
                           deadline=deadline, what=f"cloudstack {command}")

    async def call_async(self, command: str, **params: Any) -> dict[str, Any]:
        """Run an async command and wait for its job; return the job's `jobresult`."""
        submitted = await self.call(command, **params)
        job_id = submitted.get("jobid")
        if not job_id:
            raise CloudStackError(f"no jobid in the response: {sorted(submitted)}", command=command)
        return await self.wait_for_job(job_id, command=command, resource_id=submitted.get("id"))

    async def wait_for_job(self, job_id: str, *, command: str | None = None,
                           resource_id: str | None = None) -> dict[str, Any]:
        context = {"command": command, "job_id": job_id, "resource_id": resource_id}
        loop = asyncio.get_running_loop()
        started = loop.time()
        deadline = started + self.job_timeout
        key = (self.api_url, command)
        running = 0.0  # when the last poll that found the job still running was sent
        while True:
            asked = loop.time() - started
            job = await self.query_async_job_result(job_id)
            status = job.get("jobstatus")
            if status == 1:
                done = loop.time() - started
                _JOB_TIMES.setdefault(key, deque(maxlen=32)).append(job_duration(running, done))
                _JOB_DONE.setdefault(key, deque(maxlen=32)).append(done)
                return job.get("jobresult") or {}
            if status == 2:
                result = job.get("jobresult") or {}
                code = int(result.get("errorcode") or job.get("jobresultcode") or 530)
                raise error_for(code, result.get("errortext") or "async job failed",
                                cserrorcode=result.get("cserrorcode"), **context)
            if loop.time() >= deadline:
                # Not retryable: the job may still finish; the caller decides (poll again, clean up).
                raise CloudTimeout(f"async job {job_id} did not finish within {self.job_timeout:g}s",
                                   retryable=False, **context)
            running = asked
            await asyncio.sleep(self._poll_pause(loop.time() - started, _JOB_TIMES.get(key), _JOB_DONE.get(key)))

    def _poll_pause(self, elapsed: float, seen: deque[float] | None, found: deque[float] | None = None) -> float:
        """Seconds until the next queryAsyncJobResult. Not a fixed interval, which makes a 0.3 s job
        cost up to a whole interval more: first until the fastest recent job of this command would
        have finished, then a fifth of the time waited beyond that, at most `poll_interval`; from
        the soonest a recent job was found done (`found`: they all had finished by then) the steps
        start again at POLL_MIN. So a job as fast as the others is found within POLL_MIN, one queued
        behind others on its VM ~20% late, and a first poll drawn early (a job found done at it is
        recorded as maybe twice as fast: job_duration) costs polls, not lateness."""
        fastest = min(seen) if seen else 0.0
        if elapsed < fastest:
            return fastest - elapsed
        anchor = max(fastest, min(found)) if found else fastest
        if elapsed < anchor:
            return min(anchor - elapsed, max(POLL_MIN, (elapsed - fastest) * POLL_FRACTION))
        return min(self.poll_interval, max(POLL_MIN, (elapsed - anchor) * POLL_FRACTION))

    async def list_all(self, command: str, key: str, **params: Any) -> list[dict[str, Any]]:
        """Every item of a list command across pages (an empty list comes back as `{}`)."""
        items: list[dict[str, Any]] = []
        page = 1
        while True:
            body = await self.call(command, page=page, pagesize=MAX_PAGE_SIZE, **params)
            chunk = body.get(key, [])
            items.extend(chunk)
            if len(chunk) < MAX_PAGE_SIZE or len(items) >= int(body.get("count", 0)):
                return items
            page += 1

    # -- one request ----------------------------------------------------------------------------

    async def _request(self, command: str, params: dict[str, str]) -> dict[str, Any]:
        log.debug("cloudstack %s %s", command, params)  # caller's params: no apiKey, no signature
        signed = signed_query({"command": command, **params}, self.api_key, self._secret,
                              datetime.now(UTC) + SIGNATURE_LIFETIME)
        encoded = urlencode(signed, quote_via=quote)
        session = self._http()
        try:
            if _is_read(command):
                # encoded=True: yarl must not requote (it would turn %2B back into "+").
                request = session.get(URL(f"{self.api_url}?{encoded}", encoded=True))
            else:
                request = session.post(self.api_url, data=encoded, headers={
                    "Content-Type": "application/x-www-form-urlencoded"})
            async with request as resp:
                raw = await resp.read()
                status = resp.status
        except TimeoutError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # an outer deadline or a cancel: never swallow it
            raise CloudTimeout(f"OSSEA at {self._where()} did not answer {command} "
                               f"within {self.timeout:g}s", command=command) from None
        except aiohttp.ClientError as exc:
            raise CloudUnreachable(f"cannot reach OSSEA at {self._where()}: {_reason(exc)}; "
                                   "check api_url and the network", command=command) from None
        return self._unwrap(command, status, raw)

    def _unwrap(self, command: str, status: int, raw: bytes) -> dict[str, Any]:
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            body = None
        if not isinstance(body, dict):
            hint = "; check that api_url ends with /client/api" if status in (404, 200) else ""
            raise CloudStackError(f"OSSEA at {self._where()} answered HTTP {status} without a "
                                  f"CloudStack JSON body{hint}", command=command)
        inner = body.get(f"{command.lower()}response", body.get("errorresponse"))
        if inner is None and len(body) == 1:
            inner = next(iter(body.values()))
        if not isinstance(inner, dict):
            raise CloudStackError(f"unexpected response shape: {sorted(body)}", command=command)
        if "errorcode" in inner or status >= 400:
            code = int(inner.get("errorcode") or status)
            raise error_for(code, str(inner.get("errortext") or f"HTTP {status}"), command,
                            cserrorcode=inner.get("cserrorcode"))
        return inner

    def _where(self) -> str:
        """The API URL for messages: no query, no user:password@."""
        parts = urlsplit(self.api_url)
        return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path}"

    # -- commands -------------------------------------------------------------------------------

    async def list_zones(self, name: str | None = None) -> list[dict[str, Any]]:
        return await self.list_all("listZones", "zone", name=name)

    async def list_virtual_machines(self, id: str | None = None, **filters: Any) -> list[dict[str, Any]]:
        return await self.list_all("listVirtualMachines", "virtualmachine", id=id, **filters)

    async def list_disk_offerings(self) -> list[dict[str, Any]]:
        return await self.list_all("listDiskOfferings", "diskoffering")

    async def list_accounts(self) -> list[dict[str, Any]]:
        """The caller's account(s) with their limits (`volumeavailable`: a number or "Unlimited")."""
        return await self.list_all("listAccounts", "account")

    async def list_volumes(self, **filters: Any) -> list[dict[str, Any]]:
        return await self.list_all("listVolumes", "volume", **filters)

    async def query_async_job_result(self, job_id: str) -> dict[str, Any]:
        return await self.call("queryAsyncJobResult", jobid=job_id)

    async def create_volume(self, name: str, zone_id: str, disk_offering_id: str,
                            size_gb: int | None = None) -> dict[str, Any]:
        """Create a data volume (state Allocated until first attach); `size_gb` only for custom offerings."""
        result = await self.call_async("createVolume", name=name, zoneid=zone_id,
                                       diskofferingid=disk_offering_id, size=size_gb)
        return result["volume"]

    async def start_create_volume(self, name: str, zone_id: str, disk_offering_id: str,
                                  size_gb: int) -> dict[str, Any]:
        """Submit createVolume without waiting: `{"id", "jobid"}`, so a caller can record the id first."""
        return await self.call("createVolume", name=name, zoneid=zone_id, diskofferingid=disk_offering_id,
                               size=size_gb)

    async def attach_volume(self, volume_id: str, virtual_machine_id: str,
                            device_id: int | None = None) -> dict[str, Any]:
        """Attach and return the volume, including the `deviceid` CloudStack chose; `device_id=0`
        makes it the ROOT of a Stopped VM that has none."""
        result = await self.call_async("attachVolume", id=volume_id,
                                       virtualmachineid=virtual_machine_id, deviceid=device_id)
        return result["volume"]

    async def detach_volume(self, volume_id: str) -> dict[str, Any]:
        result = await self.call_async("detachVolume", id=volume_id)
        return result["volume"]

    async def start_detach_volume(self, volume_id: str) -> dict[str, Any]:
        """Submit detachVolume without waiting: `{"jobid"}`, so a caller can record the job first."""
        return await self.call("detachVolume", id=volume_id)

    async def delete_volume(self, volume_id: str) -> None:
        await self.call("deleteVolume", id=volume_id)

    # -- VMs, snapshots, networks (failover) ----------------------------------------------------

    async def list_capabilities(self) -> dict[str, Any]:
        return (await self.call("listCapabilities")).get("capability", {})

    async def list_templates(self, templatefilter: str = "executable", **filters: Any) -> list[dict[str, Any]]:
        return await self.list_all("listTemplates", "template", templatefilter=templatefilter, **filters)

    async def list_service_offerings(self, **filters: Any) -> list[dict[str, Any]]:
        return await self.list_all("listServiceOfferings", "serviceoffering", **filters)

    async def list_networks(self, **filters: Any) -> list[dict[str, Any]]:
        return await self.list_all("listNetworks", "network", **filters)

    async def list_nics(self, virtual_machine_id: str) -> list[dict[str, Any]]:
        return await self.list_all("listNics", "nic", virtualmachineid=virtual_machine_id)

    async def list_snapshots(self, **filters: Any) -> list[dict[str, Any]]:
        return await self.list_all("listSnapshots", "snapshot", **filters)

    async def deploy_virtual_machine(self, *, name: str, zone_id: str, service_offering_id: str,
                                     template_id: str, network_ids: list[str] | None = None,
                                     nics: list[dict[str, str]] | None = None, start: bool = False,
                                     boot_type: str | None = None) -> dict[str, Any]:
        """`nics` ([{networkid, ip?, mac?}], in NIC order) goes out as `iptonetworklist[n]`, which
        CloudStack refuses together with `networkids`."""
        extra: dict[str, Any] = {}
        for i, nic in enumerate(nics or []):
            extra.update({f"iptonetworklist[{i}].{k}": v for k, v in nic.items()})
        result = await self.call_async(
            "deployVirtualMachine", name=name, displayname=name, zoneid=zone_id,
            serviceofferingid=service_offering_id, templateid=template_id, startvm=start,
            networkids=",".join(network_ids) if network_ids else None, boottype=boot_type, **extra)
        return result["virtualmachine"]

    async def start_virtual_machine(self, vm_id: str) -> dict[str, Any]:
        return (await self.call_async("startVirtualMachine", id=vm_id))["virtualmachine"]

    async def stop_virtual_machine(self, vm_id: str, forced: bool = False) -> dict[str, Any]:
        return (await self.call_async("stopVirtualMachine", id=vm_id, forced=forced))["virtualmachine"]

    async def destroy_virtual_machine(self, vm_id: str, expunge: bool = False,
                                      volume_ids: list[str] | None = None) -> None:
        await self.call_async("destroyVirtualMachine", id=vm_id, expunge=expunge,
                              volumeids=",".join(volume_ids) if volume_ids else None)

    async def create_snapshot(self, volume_id: str, name: str) -> dict[str, Any]:
        return (await self.call_async("createSnapshot", volumeid=volume_id, name=name))["snapshot"]

    async def create_volume_from_snapshot(self, snapshot_id: str, name: str,
                                          zone_id: str | None = None) -> dict[str, Any]:
        result = await self.call_async("createVolume", snapshotid=snapshot_id, name=name, zoneid=zone_id)
        return result["volume"]

    async def revert_snapshot(self, snapshot_id: str) -> None:
        await self.call_async("revertSnapshot", id=snapshot_id)

    async def delete_snapshot(self, snapshot_id: str) -> None:
        await self.call_async("deleteSnapshot", id=snapshot_id)


def _reason(exc: aiohttp.ClientError) -> str:
    """A short cause without the request URL (which carries the apiKey and signature)."""
    if isinstance(exc, aiohttp.ClientConnectorError):
        return getattr(exc.os_error, "strerror", None) or str(exc)  # host:port, never the query
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "server closed the connection"
    return type(exc).__name__
