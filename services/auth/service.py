"""Appliance tokens and sessions. Tokens are stored only as keyed hashes."""
from __future__ import annotations

import re
import secrets
import time
from collections import defaultdict, deque
from datetime import timedelta

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from oma.services.auth.models import Appliance, Session
from oma.shared import errors
from oma.shared.crypto import Keyring
from oma.shared.db import iso, utcnow

SESSION_PREFIX = "oma_session_"
_DUMMY_HASH = "0" * 64


def new_session_token() -> str:
    return SESSION_PREFIX + secrets.token_urlsafe(32)  # 256 bits


def new_appliance_token() -> str:
    return "vma_" + secrets.token_urlsafe(32)  # 256 bits


class RateLimiter:
    """Failed attempts per key in a sliding window; a key holds at most `limit` of them, so a
    flood costs no memory beyond that."""

    def __init__(self, limit: int, window: float = 60.0):
        self.limit, self.window = limit, window
        self._hits: dict[str, deque[float]] = defaultdict(deque)

    def _trim(self, key: str, now: float) -> deque[float]:
        q = self._hits[key]
        while q and q[0] <= now - self.window:
            q.popleft()
        return q

    def retry_after(self, *keys: str) -> int:
        now = time.monotonic()
        waits = [q[0] + self.window - now for k in keys if len(q := self._trim(k, now)) >= self.limit]
        return max(1, int(max(waits)) + 1) if waits else 0

    def fail(self, *keys: str) -> None:
        now = time.monotonic()
        for k in keys:
            if len(q := self._trim(k, now)) < self.limit:
                q.append(now)
        if len(self._hits) > 10_000:  # forget idle keys
            for k in [k for k, q in self._hits.items() if not q]:
                del self._hits[k]


class LoginThrottle:
    """How failed logins are answered: 401 until a client has failed `limit` times a minute for
    one appliance (or ten times that for any appliance) from its address, then 429 with
    Retry-After. It is asked only after a token failed: a correct token always logs in, so nobody
    can lock the real VMA out, not even from its own address (every tunnelled VMA is 127.0.0.1).
    Tokens are 256-bit random, so this limits load, not guessing."""

    def __init__(self, limit: int):
        self.pairs, self.addrs = RateLimiter(limit), RateLimiter(limit * 10)

    def waiting(self, name: str, client: str) -> int:
        """Seconds the client must still wait, recording nothing (operators' passwords are
        guessable, unlike tokens: a throttled client is refused before its password is checked)."""
        return max(self.pairs.retry_after(f"{client}\0{name}"), self.addrs.retry_after(*((client,) if client else ())))

    def failed(self, appliance_id: str, client: str) -> int:
        """Record a failure; the seconds to ask the client to wait (0: answer 401)."""
        pair, addr = (f"{client}\0{appliance_id}",), ((client,) if client else ())
        wait = max(self.pairs.retry_after(*pair), self.addrs.retry_after(*addr))
        self.pairs.fail(*pair)
        self.addrs.fail(*addr)
        return wait


DEFAULT_API_URL = "http://127.0.0.1:9081"  # the reverse SSH tunnel to the VMA's port 8081


def check_api_url(url: str) -> str:
    url = url.strip().rstrip("/")
    if not re.fullmatch(r"https?://[^\s/?#]+(/[^\s?#]*)?", url) or len(url) > 1024:
        raise errors.BadRequest("Validation failed", "api_url: an http:// or https:// URL such as "
                                f"{DEFAULT_API_URL}, at most 1024 characters")
    return url


async def upsert_appliance(db: AsyncSession, keys: Keyring, name: str, token: str,
                           api_url: str | None = None) -> None:
    row = await db.scalar(select(Appliance).where(Appliance.appliance_id == name))
    url = check_api_url(api_url) if api_url else None
    if row is None:
        db.add(Appliance(appliance_id=name, token_hash=keys.token_hash(token), enabled=True, created_at=utcnow(),
                         api_url=url))
    else:
        row.token_hash, row.enabled = keys.token_hash(token), True
        row.api_url = url or row.api_url


def appliance_view(r: Appliance) -> dict:
    return {"appliance_id": r.appliance_id, "enabled": r.enabled, "created_at": iso(r.created_at),
            "last_used_at": iso(r.last_used_at), "api_url": r.api_url or DEFAULT_API_URL,
            "reachable": r.reachable, "last_seen": iso(r.last_seen)}


async def list_appliances(db: AsyncSession) -> list[dict]:
    rows = (await db.scalars(select(Appliance).order_by(Appliance.appliance_id))).all()
    return [appliance_view(r) for r in rows]


async def find_appliance(db: AsyncSession, name: str) -> Appliance:
    row = await db.scalar(select(Appliance).where(Appliance.appliance_id == name))
    if row is None:
        raise errors.NotFound("Appliance not found", f"No appliance registered as {name!r}")
    return row


async def update_appliance(db: AsyncSession, name: str, api_url: str) -> dict:
    row = await find_appliance(db, name)
    row.api_url = check_api_url(api_url)
    return appliance_view(row)


async def appliance_seen(db: AsyncSession, name: str, reachable: bool) -> None:
    """What the replication service found when it last called the VMA."""
    values: dict = {"reachable": reachable}
    if reachable:
        values["last_seen"] = utcnow()
    await db.execute(update(Appliance).where(Appliance.appliance_id == name).values(**values))


async def revoke_appliance(db: AsyncSession, name: str) -> None:
    row = await db.scalar(select(Appliance).where(Appliance.appliance_id == name))
    if row is None:
        raise errors.NotFound("Appliance not found", f"No appliance registered as {name!r}")
    row.enabled = False
    await db.execute(update(Session).where(Session.appliance_id == name, Session.revoked_at.is_(None))
                     .values(revoked_at=utcnow()))


async def login(db: AsyncSession, keys: Keyring, appliance_id: str, token: str, ttl: float) -> dict:
    row = await db.scalar(select(Appliance).where(Appliance.appliance_id == appliance_id))
    # Compare even for an unknown id, so timing does not tell which ids exist.
    ok = keys.same(keys.token_hash(token), row.token_hash if row else _DUMMY_HASH) and row is not None
    if not ok or not row.enabled:
        raise errors.Unauthorized("Authentication failed", "invalid appliance_id or token")
    now = utcnow()
    session_token = new_session_token()
    expires = now + timedelta(seconds=ttl)
    db.add(Session(token_hash=keys.token_hash(session_token), appliance_id=appliance_id,
                   issued_at=now, expires_at=expires))
    row.last_used_at = now
    return {"success": True, "message": "Authentication successful", "session_token": session_token,
            "expires_at": iso(expires)}


async def find_session(db: AsyncSession, keys: Keyring, token: str) -> Session:
    if not token.startswith(SESSION_PREFIX):
        raise errors.Unauthorized("Invalid session token", "not an OMA session token")
    row = await db.scalar(select(Session).where(Session.token_hash == keys.token_hash(token)))
    if row is None:
        raise errors.Unauthorized("Invalid session token", "unknown session")
    if row.revoked_at is not None:
        raise errors.Unauthorized("Invalid session token", "session revoked")
    if row.expires_at <= utcnow():
        raise errors.Unauthorized("Invalid session token", "session expired")
    return row


async def verify(db: AsyncSession, keys: Keyring, token: str) -> dict:
    row = await find_session(db, keys, token)
    enabled = await db.scalar(select(Appliance.enabled).where(Appliance.appliance_id == row.appliance_id))
    if not enabled:
        raise errors.Unauthorized("Invalid session token", "appliance revoked")
    return {"session_id": row.id, "appliance_id": row.appliance_id, "expires_at": iso(row.expires_at),
            "expires_in": (row.expires_at - utcnow()).total_seconds()}
