from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from oma.services.gateway.deps import BusDep, bearer_token
from oma.services.gateway.proxy import errors_doc, forward
from oma.services.gateway import responses as r
from oma.shared.schemas import LoginRequest, LoginResponse
from oma.shared.subjects import Auth

router = APIRouter(prefix="/api/v1/auth", tags=["auth"])


@router.post("/login", response_model=LoginResponse, responses=errors_doc(400, 401, 429))
async def login(body: LoginRequest, request: Request, bus: BusDep):
    """Exchange an appliance token for a session token (the seed's login)."""
    client = request.client.host if request.client else ""
    return await forward(bus, Auth.LOGIN, {**body.model_dump(), "client_addr": client})


@router.post("/logout", response_model=r.Message,
             responses={200: {"description": "Session revoked"}, **errors_doc(401)})
async def logout(request: Request, bus: BusDep, token: str = Depends(bearer_token)):
    """Revoke the bearer's session at once, on every gateway."""
    request.app.state.session_cache.drop(token)
    return await forward(bus, Auth.LOGOUT, {"token": token})
