"""Operator accounts: people who use the web GUI, with a password and a role.

Passwords are hashed with scrypt (memory-hard, in the standard library); GUI sessions are random
tokens stored as keyed hashes like the VMA's, with a CSRF synchronizer token and idle expiry.
"""
from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import hmac
import re
import secrets
from datetime import timedelta

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from oma.services.auth.models import Operator, OperatorSession
from oma.shared import errors
from oma.shared.crypto import Keyring
from oma.shared.db import iso, utcnow

ROLES = ("viewer", "operator")
UI_SESSION_PREFIX = "oma_ui_"
USERNAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
MIN_PASSWORD = 10
MAX_PASSWORD = 1024
# scrypt cost: n=2**15, r=8 takes 32 MiB and ~0.1 s per hash here (OWASP's minimum is n=2**17/r=8
# or n=2**15 with p>=3; we use p=3).
SCRYPT = dict(n=2**15, r=8, p=3)


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, dklen=32, maxmem=64 * 2**20, **SCRYPT)
    n, r, p = SCRYPT["n"], SCRYPT["r"], SCRYPT["p"]
    return f"scrypt${n}${r}${p}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def check_password(password: str, stored: str) -> bool:
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        expected = base64.b64decode(digest)
        got = hashlib.scrypt(password.encode(), salt=base64.b64decode(salt), n=int(n), r=int(r), p=int(p),
                             dklen=len(expected), maxmem=64 * 2**20)
    except ValueError:
        return False
    return scheme == "scrypt" and hmac.compare_digest(got, expected)


@functools.cache
def _dummy() -> str:
    """Checked for unknown users too, so the answer's timing does not tell which usernames exist."""
    return hash_password(secrets.token_urlsafe(16))


def validate(username: str, password: str | None = None, role: str | None = None) -> None:
    problems = []
    if not USERNAME.match(username or ""):
        problems.append("username: 1-64 characters: letters, digits and . _ @ -, not starting with a symbol")
    if password is not None and not MIN_PASSWORD <= len(password) <= MAX_PASSWORD:
        problems.append(f"password: {MIN_PASSWORD} to {MAX_PASSWORD} characters")
    if role is not None and role not in ROLES:
        problems.append(f"role: one of {', '.join(ROLES)}")
    if problems:
        raise errors.BadRequest("Validation failed", "; ".join(problems))


async def _get(db: AsyncSession, username: str) -> Operator:
    row = await db.scalar(select(Operator).where(Operator.username == username))
    if row is None:
        raise errors.NotFound("Operator not found", f"No operator named {username!r}")
    return row


async def _end_sessions(db: AsyncSession, username: str) -> None:
    await db.execute(update(OperatorSession).where(OperatorSession.username == username,
                                                   OperatorSession.revoked_at.is_(None))
                     .values(revoked_at=utcnow()))


async def add_operator(db: AsyncSession, username: str, password: str, role: str) -> None:
    validate(username, password, role)
    if await db.scalar(select(Operator.id).where(Operator.username == username)) is not None:
        raise errors.Conflict("Operator exists", f"{username!r} exists; use `user passwd` to change the password")
    db.add(Operator(username=username, password_hash=await asyncio.to_thread(hash_password, password),
                    role=role, created_at=utcnow()))


async def list_operators(db: AsyncSession) -> list[dict]:
    rows = (await db.scalars(select(Operator).order_by(Operator.username))).all()
    return [{"username": r.username, "role": r.role, "created_at": iso(r.created_at),
             "last_login_at": iso(r.last_login_at)} for r in rows]


async def remove_operator(db: AsyncSession, username: str) -> None:
    await db.delete(await _get(db, username))
    await _end_sessions(db, username)


async def set_password(db: AsyncSession, username: str, password: str) -> None:
    """A new password ends every session of the operator."""
    validate(username, password)
    row = await _get(db, username)
    row.password_hash = await asyncio.to_thread(hash_password, password)
    await _end_sessions(db, username)


async def login(db: AsyncSession, keys: Keyring, username: str, password: str, ttl: float) -> dict:
    row = await db.scalar(select(Operator).where(Operator.username == username))
    ok = len(password) <= MAX_PASSWORD and await asyncio.to_thread(
        check_password, password, row.password_hash if row else _dummy())
    if not ok or row is None:
        raise errors.Unauthorized("Authentication failed", "invalid username or password")
    now = utcnow()
    token = UI_SESSION_PREFIX + secrets.token_urlsafe(32)
    expires = now + timedelta(seconds=ttl)
    db.add(OperatorSession(token_hash=keys.token_hash(token), username=username,
                           csrf_token=secrets.token_urlsafe(32), issued_at=now, last_seen_at=now,
                           expires_at=expires))
    row.last_login_at = now
    return {"success": True, "session_token": token, "username": username, "role": row.role,
            "expires_at": iso(expires)}


async def _find(db: AsyncSession, keys: Keyring, token: str) -> OperatorSession:
    row = None
    if token.startswith(UI_SESSION_PREFIX):
        row = await db.scalar(select(OperatorSession).where(OperatorSession.token_hash == keys.token_hash(token)))
    if row is None or row.revoked_at is not None:
        raise errors.Unauthorized("Not signed in", "unknown or ended session")
    return row


async def verify(db: AsyncSession, keys: Keyring, token: str, idle: float, touch: bool = True) -> dict:
    """The session's operator, role and CSRF token; each use (`touch`) restarts the idle clock."""
    row = await _find(db, keys, token)
    now = utcnow()
    if row.expires_at <= now or row.last_seen_at + timedelta(seconds=idle) <= now:
        raise errors.Unauthorized("Session expired", "sign in again")
    role = await db.scalar(select(Operator.role).where(Operator.username == row.username))
    if role is None:
        raise errors.Unauthorized("Not signed in", "operator removed")
    if touch and now - row.last_seen_at >= timedelta(seconds=min(30.0, idle / 20)):
        row.last_seen_at = now  # not on every request: a page view is one read, not one write
    return {"session_id": row.id, "username": row.username, "role": role, "csrf_token": row.csrf_token,
            "expires_at": iso(row.expires_at)}


async def logout(db: AsyncSession, keys: Keyring, token: str) -> None:
    row = await _find(db, keys, token)
    row.revoked_at = utcnow()
