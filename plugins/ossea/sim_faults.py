"""The CloudStack simulator's fault injection, in the spirit of CloudStack's `configureSimulator`:
failing calls, slow calls, hung calls, and the record of hazards (inconsistent states CloudStack
would be left in). The /sim/ control endpoints call these methods."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from .signing import format_date
from .sim_common import _now


@dataclass
class Fault:
    errorcode: int
    errortext: str
    remaining: int
    sync: bool


class Faults:
    """Mixed into CloudStackSimulator; `_init_faults` sets its state up."""

    job_latency: float
    async_commands: frozenset[str]
    _running: Any  # the job whose work is running (Jobs sets it)

    def _init_faults(self) -> None:
        self.hazards: list[dict[str, Any]] = []  # inconsistent states CloudStack would be left in
        self._faults: dict[str, list[Fault]] = {}
        self._latency: dict[str, float] = {}
        self._job_latency: dict[str, float] = {}
        self._hangs: dict[str, asyncio.Event] = {}

    def fail(self, command: str, count: int = 1, errorcode: int = 530,
             errortext: str = "Internal error executing command, please contact your administrator",
             *, sync: bool = False) -> None:
        """Fail the next `count` calls of `command`. An async command still gets its jobid and its
        job fails (createVolume's volume stays allocated, as on a real cloud) unless `sync`."""
        self._faults.setdefault(command, []).append(
            Fault(errorcode, errortext, count, sync or command not in self.async_commands))

    def set_latency(self, command: str, seconds: float) -> None:
        """Delay every call of `command` by `seconds` before it acts (0 removes the delay), like a slow
        API server: a client that gives up or dies meanwhile does not stop it (createVolume's volume,
        attachVolume's job still appear)."""
        self._latency[command] = seconds

    def set_job_latency(self, seconds: float, command: str | None = None) -> None:
        """How long new jobs (of `command`, or all) stay pending before they run."""
        if command is None:
            self.job_latency = seconds
        else:
            self._job_latency[command] = seconds

    def hang(self, command: str) -> None:
        """Never answer `command` until `release()`."""
        self._hangs.setdefault(command, asyncio.Event())

    def release(self, command: str | None = None) -> None:
        for name in [command] if command else list(self._hangs):
            event = self._hangs.pop(name, None)
            if event is not None:
                event.set()

    def reset_faults(self) -> None:
        self.release()
        self._faults.clear()
        self._latency.clear()
        self._job_latency.clear()

    async def _delay(self, command: str) -> None:
        """Hold a call of `command` while it is hung, then for its latency."""
        if command in self._hangs:
            await self._hangs[command].wait()
        if self._latency.get(command):
            await asyncio.sleep(self._latency[command])

    def _take_fault(self, command: str) -> Fault | None:
        queue = self._faults.get(command)
        if not queue:
            return None
        fault = queue[0]
        fault.remaining -= 1
        if fault.remaining <= 0:
            queue.pop(0)
        return fault

    def _record_hazard(self, kind: str, **detail: Any) -> None:
        job = self._running.id if self._running else None
        self.hazards.append({"kind": kind, "jobid": job, "at": format_date(_now()), **detail})
