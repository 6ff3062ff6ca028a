"""VMAs as appliances OMA drives: their API URL and whether OMA reaches them (services/auth)."""
from __future__ import annotations

from fastapi import APIRouter

from oma.services.gateway import responses as r
from oma.services.gateway.deps import BusDep
from oma.services.gateway.proxy import errors_doc, forward
from oma.shared.schemas import ApplianceAction
from oma.shared.subjects import Auth

router = APIRouter(prefix="/api/v1", tags=["appliances"])


@router.post("/appliances", response_model=r.ApplianceResult, responses=errors_doc(400, 401, 404))
async def appliances(body: ApplianceAction, bus: BusDep):
    """`{action: "get"}` lists the VMAs (appliance_id, api_url, reachable, last_seen);
    `{action: "update", appliance_id, api_url}` sets the URL OMA reaches one at."""
    return await forward(bus, Auth.APPLIANCE_ACTION, body.model_dump(exclude_none=True))
