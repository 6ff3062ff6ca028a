"""The VMA client's settings: `OMA_VMA_TIMEOUT`, `OMA_VMA_RETRIES` (`settings.vma`).
Loaded while shared.settings is built: imports pydantic and shared.hookspecs only."""
from __future__ import annotations

from pydantic import Field

from oma.shared.hookspecs import PluginSettings, Register, hookimpl


class VmaSettings(PluginSettings):
    timeout: float = Field(30.0, gt=0, description="VMA API request timeout (seconds)")
    retries: int = Field(3, ge=0, description="retries of a transient VMA failure (refused, 502/503/504)")


@hookimpl
def oma_register_settings(register: Register) -> None:
    register("vma", VmaSettings)
