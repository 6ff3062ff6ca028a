"""Built-in device resolver `by-id`: find an attached CloudStack volume inside the OMA VM.

The guest names virtio disks by probe order (deviceid 4 is often /dev/vdd, and names shift after
detach/re-attach), so we never guess: the disk serial is the volume UUID without dashes, first 20
characters, and udev publishes `/dev/disk/by-id/virtio-<serial>`.
"""
from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

from pydantic import Field

from oma.shared import errors
from oma.shared.hookspecs import PluginSettings, hookimpl


def disk_serial(volume_id: str) -> str:
    """The virtio serial KVM gives a volume: its UUID without dashes, first 20 characters."""
    return volume_id.replace("-", "")[:20]


class DeviceSettings(PluginSettings):
    by_id_dir: Path = Field(Path("/dev/disk/by-id"), description="where udev links attached disks by serial")


class ByIdResolver:
    def __init__(self, settings: Any):
        self.directory = settings.device.by_id_dir
        self.interval = 0.05

    async def resolve(self, volume_id: str, timeout: float) -> str:
        """Wait (bounded) for `virtio-<serial>`; return the real device path it points to."""
        link = self.directory / f"virtio-{disk_serial(volume_id)}"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            if link.exists():
                return os.path.realpath(link)
            if loop.time() >= deadline:
                raise errors.UpstreamTimeout("Device not found",
                                             f"volume {volume_id} did not appear as {link} within {timeout:g}s")
            await asyncio.sleep(self.interval)


@hookimpl
def oma_register_settings(register):
    register("device", DeviceSettings)


@hookimpl
def oma_register_device_resolvers(register):
    register("by-id", ByIdResolver, description="wait for /dev/disk/by-id/virtio-<serial> (udev)")
