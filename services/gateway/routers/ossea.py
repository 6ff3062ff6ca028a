from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from oma.services.gateway.deps import BusDep
from oma.services.gateway.proxy import errors_doc, forward
from oma.services.gateway import responses as r
from oma.shared.schemas import OsseaConfigRequest
from oma.shared.subjects import Config

router = APIRouter(prefix="/api/v1/ossea", tags=["ossea"])


def config_timeout(bus_timeout: float, settings: Any) -> float:
    """`test` is bounded by cloud_timeout in the service: wait past it, to relay its clear answer."""
    return max(bus_timeout, settings.cloud_timeout + 5)


@router.post("/config", response_model=r.OsseaConfigResult,
             responses={200: {"description": "get/update/delete/test result"},
                        201: {"model": r.OsseaConfigResult, "description": "created configuration"},
                        **errors_doc(400, 401, 404, 409, 502, 504)})
async def ossea_config(body: OsseaConfigRequest, bus: BusDep, request: Request):
    """The unified OSSEA configuration endpoint: `action` is get, create, update, delete or test."""
    return await forward(bus, Config.ACTION, body.model_dump(exclude_none=True),
                         timeout=config_timeout(bus.timeout, request.app.state.settings))
