"""CloudStack request signing, byte-for-byte what `ApiServer.verifyRequest` computes.

The server re-encodes every received value with Java's `URLEncoder` (`+` -> `%20`), so a
client must sign with exactly that encoding or a value holding `~`, `[`, `]` or non-ASCII
text gets a 401 even though the request itself is well-formed.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from urllib.parse import quote

DATE_FORMAT = "%Y-%m-%dT%H:%M:%S%z"  # Java yyyy-MM-dd'T'HH:mm:ssZ -> 2030-01-01T00:00:00+0000


def java_urlencode(value: str) -> str:
    """`URLEncoder.encode(value, "UTF-8").replace("+", "%20")`: only A-Z a-z 0-9 . - * _ stay."""
    return quote(value, safe="*").replace("~", "%7E")


def canonical_string(params: Mapping[str, str]) -> str:
    """The lowercased, sorted `name=value&...` string that is signed (without `signature`)."""
    pairs = (f"{name}={java_urlencode(params[name])}"
             for name in sorted(params) if name.lower() != "signature")
    return "&".join(pairs).lower()


def sign(params: Mapping[str, str], secret: str) -> str:
    digest = hmac.new(secret.encode(), canonical_string(params).encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode()


def format_date(when: datetime) -> str:
    """CloudStack's date format, used for `expires` and for every date in its responses."""
    return when.astimezone(UTC).strftime(DATE_FORMAT)


def signed_query(params: Mapping[str, str], api_key: str, secret: str,
                 expires: datetime | None = None) -> dict[str, str]:
    """`params` plus apiKey, response=json, signature (and signatureVersion=3 + expires when given)."""
    query = {**params, "apiKey": api_key, "response": "json"}
    if expires is not None:
        query["signatureVersion"] = "3"
        query["expires"] = format_date(expires)
    query["signature"] = sign(query, secret)
    return query


def lookup(params: Mapping[str, str], name: str) -> str | None:
    """Find a parameter case-insensitively, as the server does for apiKey, signature, expires..."""
    wanted = name.lower()
    return next((v for k, v in params.items() if k.lower() == wanted), None)


def verify(params: Mapping[str, str], secret: str, now: datetime | None = None,
           *, max_ahead: timedelta | None = None) -> bool:
    """Server side: True when the signature matches and (v3) `expires` has not passed.

    `max_ahead` models `enforce.post.requests.and.timestamps` (which rejects an expiry more than
    15 minutes ahead); it is off by default, as on a stock server.
    """
    signature = lookup(params, "signature")
    if not signature or lookup(params, "apiKey") is None:
        return False
    if lookup(params, "signatureVersion") == "3":
        expires = lookup(params, "expires")
        if expires is None:
            return False
        try:
            deadline = datetime.strptime(expires, DATE_FORMAT)
        except ValueError:
            return False
        now = now or datetime.now(UTC)
        if deadline < now or (max_ahead is not None and deadline > now + max_ahead):
            return False
    return hmac.compare_digest(signature.encode(), sign(params, secret).encode())
