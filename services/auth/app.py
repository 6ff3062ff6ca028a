from __future__ import annotations

from prometheus_client import Counter

from oma.services.auth import operators, service
from oma.shared import errors
from oma.shared.schemas import ApplianceAction, LoginRequest
from oma.shared.service import BusRequest, ServiceApp, endpoint
from oma.shared.subjects import Auth

AUTH_EVENTS = Counter("oma_auth_events_total", "Authentication events", ["event"])


def parse_bootstrap(spec: str) -> dict[str, str]:
    """`name=token,other=token2` (OMA_APPLIANCE_TOKENS)."""
    out = {}
    for item in filter(None, (p.strip() for p in spec.split(","))):
        name, sep, token = item.partition("=")
        if not sep or not name.strip() or not token.strip():
            raise errors.BadRequest("Invalid OMA_APPLIANCE_TOKENS", "expected name=token[,name=token...]")
        out[name.strip()] = token.strip()
    return out


class AuthService(ServiceApp):
    name = "auth"
    description = "Appliance login and bearer sessions"

    async def setup(self) -> None:
        self.throttle = service.LoginThrottle(self.settings.login_rate_limit)
        bootstrap = parse_bootstrap(self.settings.appliance_tokens)
        if bootstrap:
            async with self.sessions.begin() as db:
                for name, token in bootstrap.items():
                    await service.upsert_appliance(db, self.keys, name, token)
            self.log.info("appliances registered from OMA_APPLIANCE_TOKENS", extra={"appliances": sorted(bootstrap)})

    @endpoint(Auth.LOGIN)
    async def login(self, req: BusRequest):
        payload = req.json()
        client = str(payload.pop("client_addr", "") or "")
        body = req.model(LoginRequest, payload)
        try:  # the token first: the throttle only decides how a failure is answered
            async with self.sessions.begin() as db:
                result = await service.login(db, self.keys, body.appliance_id, body.token, self.settings.session_ttl)
        except errors.Unauthorized:
            wait = self.throttle.failed(body.appliance_id, client)
            if wait:  # counted, not logged: a flood must not flood the log too
                AUTH_EVENTS.labels(event="login_throttled").inc()
                raise errors.TooManyRequests("Too many failed login attempts", f"retry in {wait} seconds",
                                             headers={"Retry-After": str(wait)}) from None
            AUTH_EVENTS.labels(event="login_failed").inc()
            self.log.warning("login failed", extra={"appliance_id": body.appliance_id, "client": client})
            raise
        AUTH_EVENTS.labels(event="login_ok").inc()
        self.log.info("login ok", extra={"appliance_id": body.appliance_id, "client": client,
                                         "appliance_version": body.version})
        return result

    @endpoint(Auth.VERIFY)
    async def verify(self, req: BusRequest):
        token = str(req.json().get("token") or "")
        async with self.sessions() as db:
            return await service.verify(db, self.keys, token)

    @endpoint(Auth.LOGOUT)
    async def logout(self, req: BusRequest):
        token = str(req.json().get("token") or "")
        async with self.sessions.begin() as db:
            row = await service.find_session(db, self.keys, token)
            row.revoked_at = service.utcnow()
            sid, appliance = row.id, row.appliance_id
        # Published before the reply, so every gateway drops its cached verification first.
        await self.bus.publish_event(Auth.EVT_SESSION_REVOKED, {"session_id": sid, "appliance_id": appliance},
                                     msg_id=f"session-revoked-{sid}")
        AUTH_EVENTS.labels(event="logout").inc()
        self.log.info("logout", extra={"appliance_id": appliance, "session_id": sid})
        return {"success": True, "message": "Logged out"}

    @endpoint(Auth.APPLIANCE_ADD)
    async def appliance_add(self, req: BusRequest):
        data = req.json()
        name = str(data.get("name") or "").strip()
        if not name or len(name) > 255:
            raise errors.BadRequest("Validation failed", "name: required, at most 255 characters")
        token = data.get("token") or service.new_appliance_token()
        async with self.sessions.begin() as db:
            await service.upsert_appliance(db, self.keys, name, token, data.get("api_url"))
        AUTH_EVENTS.labels(event="appliance_added").inc()
        return {"success": True, "appliance_id": name, "token": token}

    @endpoint(Auth.APPLIANCE_LIST)
    async def appliance_list(self, req: BusRequest):
        async with self.sessions() as db:
            return {"success": True, "appliances": await service.list_appliances(db)}

    @endpoint(Auth.APPLIANCE_ACTION)
    async def appliance_action(self, req: BusRequest):
        """`POST /api/v1/appliances`: {action: get} lists, {action: update, appliance_id, api_url} sets the URL."""
        body = req.model(ApplianceAction)
        async with self.sessions.begin() as db:
            if body.action == "get":
                return {"success": True, "appliances": await service.list_appliances(db)}
            if not body.appliance_id or not body.api_url:
                raise errors.BadRequest("Missing required fields", "update needs appliance_id and api_url")
            view = await service.update_appliance(db, body.appliance_id, body.api_url)
        self.log.info("appliance API URL changed", extra={"appliance_id": body.appliance_id})
        return {"success": True, "appliance": view}

    @endpoint(Auth.APPLIANCE_GET)
    async def appliance_get(self, req: BusRequest):
        async with self.sessions() as db:
            return {"success": True, "appliance": service.appliance_view(
                await service.find_appliance(db, str(req.json().get("appliance_id") or "")))}

    @endpoint(Auth.APPLIANCE_SEEN)
    async def appliance_seen(self, req: BusRequest):
        data = req.json()
        name, reachable = str(data.get("appliance_id") or ""), bool(data.get("reachable"))
        async with self.sessions.begin() as db:
            await service.appliance_seen(db, name, reachable)
        return {"success": True}

    @endpoint(Auth.APPLIANCE_REVOKE)
    async def appliance_revoke(self, req: BusRequest):
        name = str(req.json().get("name") or "")
        async with self.sessions.begin() as db:
            await service.revoke_appliance(db, name)
        await self.bus.publish_event(Auth.EVT_APPLIANCE_REVOKED, {"appliance_id": name})
        AUTH_EVENTS.labels(event="appliance_revoked").inc()
        self.log.info("appliance revoked", extra={"appliance_id": name})
        return {"success": True, "message": f"Appliance {name} revoked"}

    # --- operators (people using the web GUI) ------------------------------------------------
    @endpoint(Auth.USER_LOGIN)
    async def user_login(self, req: BusRequest):
        data = req.json()
        username, password = str(data.get("username") or ""), str(data.get("password") or "")
        client = str(data.get("client_addr") or "")
        throttle_key = f"user:{username}"  # shares the per-address budget with appliance logins
        wait = self.throttle.waiting(throttle_key, client)
        if not wait:
            try:
                async with self.sessions.begin() as db:
                    result = await operators.login(db, self.keys, username, password, self.settings.session_ttl)
            except errors.Unauthorized:
                wait = self.throttle.failed(throttle_key, client)
                if not wait:
                    AUTH_EVENTS.labels(event="user_login_failed").inc()
                    self.log.warning("operator login failed", extra={"username": username, "client": client})
                    raise
        if wait:
            AUTH_EVENTS.labels(event="login_throttled").inc()
            raise errors.TooManyRequests("Too many failed login attempts", f"retry in {wait} seconds",
                                         headers={"Retry-After": str(wait)})
        AUTH_EVENTS.labels(event="user_login_ok").inc()
        self.log.info("operator login ok", extra={"username": username, "client": client})
        return result

    @endpoint(Auth.USER_VERIFY)
    async def user_verify(self, req: BusRequest):
        data = req.json()
        async with self.sessions.begin() as db:
            return await operators.verify(db, self.keys, str(data.get("token") or ""),
                                          self.settings.ui_idle_timeout, touch=bool(data.get("touch", True)))

    @endpoint(Auth.USER_LOGOUT)
    async def user_logout(self, req: BusRequest):
        async with self.sessions.begin() as db:
            await operators.logout(db, self.keys, str(req.json().get("token") or ""))
        AUTH_EVENTS.labels(event="user_logout").inc()
        return {"success": True, "message": "Signed out"}
