"""Dependencies: the bus, and the bearer-session check with a short verification cache."""
from __future__ import annotations

import hashlib
import time
from typing import Annotated, Any

import orjson
from fastapi import Depends, Request

from oma.shared import errors
from oma.shared.bus import Bus
from oma.shared.subjects import Auth


async def get_bus(request: Request) -> Bus:  # async: a plain def would hop to a thread per request
    return request.app.state.bus


BusDep = Annotated[Bus, Depends(get_bus)]


class SessionCache:
    """token digest -> (valid until, session info). Dropped on revocation events, so a logout
    is seen by every gateway at once even though verifications are cached for a few seconds."""

    def __init__(self, ttl: float):
        self.ttl = ttl
        self._entries: dict[bytes, tuple[float, dict[str, Any]]] = {}

    @staticmethod
    def key(token: str) -> bytes:
        return hashlib.sha256(token.encode()).digest()

    def get(self, token: str) -> dict[str, Any] | None:
        hit = self._entries.get(self.key(token))
        if hit and hit[0] > time.monotonic():
            return hit[1]
        return None

    def put(self, token: str, info: dict[str, Any], expires_in: float) -> None:
        if self.ttl > 0:
            if len(self._entries) > 100_000:
                self._entries.clear()
            self._entries[self.key(token)] = (time.monotonic() + min(self.ttl, expires_in), info)

    def drop(self, token: str) -> None:
        self._entries.pop(self.key(token), None)

    def revoke(self, event: dict[str, Any]) -> None:
        sid, appliance = event.get("session_id"), event.get("appliance_id")
        for k, (_, info) in list(self._entries.items()):
            if (sid and info.get("session_id") == sid) or (appliance and not sid and
                                                            info.get("appliance_id") == appliance):
                self._entries.pop(k, None)

    async def on_event(self, msg: Any) -> None:
        try:
            self.revoke(orjson.loads(msg.data))
        except orjson.JSONDecodeError:
            pass


async def bearer_token(request: Request) -> str:
    header = request.headers.get("authorization")
    if not header:
        raise errors.Unauthorized("Authentication required", "missing Authorization: Bearer <session_token>")
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or len(token) > 512:
        raise errors.Unauthorized("Invalid authorization header", "expected Authorization: Bearer <session_token>")
    return token


async def require_session(request: Request) -> dict[str, Any] | None:
    """Called by RequestGuard for every protected route, before the body is read."""
    state = request.app.state
    if not state.settings.auth_enabled:
        return None
    token = await bearer_token(request)
    cache: SessionCache = state.session_cache
    info = cache.get(token)
    if info is None:
        info = await state.bus.call(Auth.VERIFY, {"token": token})
        cache.put(token, info, float(info.get("expires_in", 0)))
    request.state.session = info
    return info
