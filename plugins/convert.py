"""Built-in guest converters (failover's `convert` option): `none`, and `virt-v2v`, which runs
`virt-v2v-in-place -i disk <device>` on the boot disk while it is attached to the OMA VM: the guest
gets virtio drivers and its VMware tools removed, so it boots on KVM (shared/reference/failover.md §2).

A converter's `convert(device_path)` returns what it did, or raises `ConversionFailed` whose details
are the converter's own message. A converted disk no longer matches its change ids: the next sync of
the VM must be a full one (the failover service tells replication).

virt-v2v runs in a session of its own (with its qemu and nbdkit), recorded in a pid file under the
data directory: when the failover service is killed mid-conversion the group goes on writing the
disk, so the resumed step stops that group before it converts again (two converters on one disk
would corrupt it).
"""
from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
from pathlib import Path
from typing import Any

from pydantic import Field

from oma.shared import errors
from oma.shared.hookspecs import PluginSettings, hookimpl

OUTPUT_KEPT = 4000  # characters of the converter's output kept in an error (its message is at the end)
log = logging.getLogger("oma.convert")
GROUP_EXIT_WAIT = 30.0  # seconds a killed converter's processes get to go


class ConvertSettings(PluginSettings):
    timeout: float = Field(3600.0, gt=0, description="seconds a guest conversion (virt-v2v) may take")
    libguestfs_backend_settings: str = Field("", max_length=255, description="LIBGUESTFS_BACKEND_SETTINGS for "
                                             "virt-v2v, e.g. force_tcg where /dev/kvm is unusable")
    virtio_win: Path | None = Field(None, description="virtio-win ISO or directory (VIRTIO_WIN) for converting "
                                    "Windows guests")


class ConversionFailed(errors.BadGateway):
    def __init__(self, details: str):
        super().__init__("Guest conversion failed", details)


class NoConverter:
    name = "none"

    def __init__(self, settings: Any = None):
        self.settings = settings

    def check(self) -> None:
        """Raises when the converter cannot run on this appliance (checked when a failover is asked)."""

    async def convert(self, device_path: str) -> dict[str, Any]:
        return {"converter": self.name, "converted": False}


class VirtV2v(NoConverter):
    """`virt-v2v-in-place -i disk` with libguestfs' direct backend (no libvirt daemon on the appliance).
    Windows guests need the virtio-win drivers: `convert_virtio_win` (an ISO or directory, VIRTIO_WIN)."""
    name = "virt-v2v"
    program = "virt-v2v-in-place"

    def check(self) -> None:
        if shutil.which(self.program) is None:
            raise errors.BadRequest("Converter not available", f"options.convert: {self.program} is not installed "
                                    "on this appliance (Debian package virt-v2v)")

    def environment(self) -> dict[str, str]:
        s = self.settings.convert
        env = {**os.environ, "LIBGUESTFS_BACKEND": "direct"}
        if s.libguestfs_backend_settings:  # e.g. force_tcg where /dev/kvm is unusable
            env["LIBGUESTFS_BACKEND_SETTINGS"] = s.libguestfs_backend_settings
        if s.virtio_win:
            env["VIRTIO_WIN"] = str(s.virtio_win)
        return env

    def pid_file(self, device_path: str) -> Path:
        return Path(self.settings.data_dir) / "convert" / (device_path.strip("/").replace("/", "_") + ".pid")

    async def convert(self, device_path: str) -> dict[str, Any]:
        self.check()
        pid_file = self.pid_file(device_path)
        await stop_left_running(pid_file)
        pid_file.parent.mkdir(parents=True, exist_ok=True)
        proc = await asyncio.create_subprocess_exec(
            self.program, "-i", "disk", device_path, env=self.environment(), stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, start_new_session=True)
        pid_file.write_text(f"{proc.pid} {started(proc.pid)}\n")
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), self.settings.convert.timeout)
        except (asyncio.TimeoutError, asyncio.CancelledError):
            await stop_group(proc.pid)
            await proc.wait()
            raise ConversionFailed(f"{self.program} did not finish within {self.settings.convert.timeout:g} s") \
                from None
        finally:
            if proc.returncode is not None:
                pid_file.unlink(missing_ok=True)
        text = out.decode(errors="replace").strip()
        if proc.returncode != 0:
            raise ConversionFailed(f"{self.program} exited with {proc.returncode}: {text[-OUTPUT_KEPT:]}")
        return {"converter": self.name, "converted": True, "output": text[-OUTPUT_KEPT:]}


def _stat(pid: int | str) -> list[str] | None:
    """/proc/PID/stat's fields from the state on (field 3), past the command name (which may hold spaces)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def started(pid: int) -> str:
    """The process's start time (field 22): with its pid it names that process and no later one."""
    fields = _stat(pid)
    return fields[19] if fields else "?"


def group_alive(pgid: int) -> bool:
    """Whether a live (not zombie) process is in process group `pgid` (field 5)."""
    return any(f[0] != "Z" and f[2] == str(pgid) for f in map(_stat, filter(str.isdigit, os.listdir("/proc"))) if f)


async def stop_group(pgid: int) -> None:
    """SIGKILL to the whole group (virt-v2v, its qemu and nbdkit), then wait until none is left."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + GROUP_EXIT_WAIT
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        return
    while group_alive(pgid) and loop.time() < deadline:
        await asyncio.sleep(0.05)


async def stop_left_running(pid_file: Path) -> None:
    """The conversion of this disk a killed service left running: its leader is still the process the
    file names (a pid alone may have been reused), or is gone while the group lives on (the kernel
    gives no new process the pid of a live group)."""
    try:
        pid, start = pid_file.read_text().split()
    except (OSError, ValueError):
        return
    if started(int(pid)) == start or (_stat(pid) is None and group_alive(int(pid))):
        log.warning("stopping a conversion left running", extra={"pid": int(pid), "pid_file": str(pid_file)})
        await stop_group(int(pid))
    pid_file.unlink(missing_ok=True)


@hookimpl
def oma_register_settings(register):
    register("convert", ConvertSettings)


@hookimpl
def oma_register_converters(register):
    register("none", NoConverter, description="no guest conversion (the default)")
    register("virt-v2v", VirtV2v, description="virt-v2v-in-place -i disk on the boot disk (virtio drivers)")
