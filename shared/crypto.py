"""Keys and secrets at rest.

One 32-byte master key per appliance (`OMA_SECRET_KEY_FILE`, default `<data dir>/secret.key`, created
0600 on first start). Purpose keys are derived from it: one to hash tokens (HMAC-SHA256; tokens are
high-entropy, so a fast keyed hash is right), one to encrypt secrets (AES-GCM).
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from oma.shared import errors

_PREFIX = "v1:"


def load_or_create_key(path: Path) -> bytes:
    if path.exists():
        raw = path.read_bytes().strip()
        key = base64.b64decode(raw)
        if len(key) != 32:
            raise ValueError(f"{path}: expected 32 base64-encoded bytes")
        return key
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_bytes(32)
    # O_EXCL: two services starting at once must not overwrite each other's new key.
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return load_or_create_key(path)
    with os.fdopen(fd, "wb") as f:
        f.write(base64.b64encode(key) + b"\n")
    return key


class Keyring:
    def __init__(self, master: bytes):
        self._hash_key = hmac.new(master, b"oma token hash", hashlib.sha256).digest()
        self._aead = AESGCM(hmac.new(master, b"oma secret encryption", hashlib.sha256).digest())

    @classmethod
    def from_file(cls, path: Path) -> "Keyring":
        return cls(load_or_create_key(path))

    def token_hash(self, token: str) -> str:
        return hmac.new(self._hash_key, token.encode(), hashlib.sha256).hexdigest()

    @staticmethod
    def same(a: str, b: str) -> bool:
        return hmac.compare_digest(a.encode(), b.encode())

    def encrypt(self, plaintext: str) -> str:
        nonce = secrets.token_bytes(12)
        return _PREFIX + base64.urlsafe_b64encode(nonce + self._aead.encrypt(nonce, plaintext.encode(), None)).decode()

    def decrypt(self, stored: str, what: str = "a stored secret") -> str:
        try:
            if not stored.startswith(_PREFIX):
                raise ValueError("not an encrypted value")
            raw = base64.urlsafe_b64decode(stored[len(_PREFIX):])
            return self._aead.decrypt(raw[:12], raw[12:], None).decode()
        except (ValueError, InvalidTag):
            raise errors.OmaError(
                "Stored secret cannot be decrypted",
                f"{what} was encrypted with another key file than this appliance's (OMA_SECRET_KEY_FILE); "
                "restore that file or set the secret again with an update") from None
