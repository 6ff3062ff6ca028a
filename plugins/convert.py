"""Built-in guest converters (failover's `convert` option): `none`, and `virt-v2v`, which runs
`virt-v2v-in-place -i disk <device>` on the boot disk while it is attached to the OMA VM: the guest
gets virtio drivers and its VMware tools removed, so it boots on KVM (shared/reference/failover.md §2).

A converter's `convert(device_path)` returns what it did, or raises `ConversionFailed` whose details
are the converter's own message. A converted disk no longer matches its change ids: the next sync of
the VM must be a full one (the failover service tells replication).
"""
from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path
from typing import Any

from pydantic import Field

from oma.shared import errors
from oma.shared.hookspecs import PluginSettings, hookimpl

OUTPUT_KEPT = 4000  # characters of the converter's output kept in an error (its message is at the end)


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

    async def convert(self, device_path: str) -> dict[str, Any]:
        self.check()
        proc = await asyncio.create_subprocess_exec(
            self.program, "-i", "disk", device_path, env=self.environment(), stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, start_new_session=True)
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), self.settings.convert.timeout)
        except (asyncio.TimeoutError, asyncio.CancelledError):
            proc.kill()
            await proc.wait()
            raise ConversionFailed(f"{self.program} did not finish within {self.settings.convert.timeout:g} s") \
                from None
        text = out.decode(errors="replace").strip()
        if proc.returncode != 0:
            raise ConversionFailed(f"{self.program} exited with {proc.returncode}: {text[-OUTPUT_KEPT:]}")
        return {"converter": self.name, "converted": True, "output": text[-OUTPUT_KEPT:]}


@hookimpl
def oma_register_settings(register):
    register("convert", ConvertSettings)


@hookimpl
def oma_register_converters(register):
    register("none", NoConverter, description="no guest conversion (the default)")
    register("virt-v2v", VirtV2v, description="virt-v2v-in-place -i disk on the boot disk (virtio drivers)")
