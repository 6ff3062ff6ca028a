from __future__ import annotations

from datetime import datetime

from sqlalchemy import Boolean, DateTime, Integer, String, func, true
from sqlalchemy.orm import Mapped, mapped_column

from oma.shared.db import Base

SECRET_MAX_CHARS = 500  # the seed's VARCHAR(500) bounds the plaintext (shared.schemas says so too)
# secret_key holds Keyring ciphertext: "v1:" + base64url(12-byte nonce + UTF-8 plaintext + 16-byte
# tag). 500 characters are up to 2000 bytes, so 2707 characters; the seed's 500 would not fit.
SECRET_CIPHERTEXT_LEN = 3 + 4 * -(-(12 + 4 * SECRET_MAX_CHARS + 16) // 3)


class OsseaConfig(Base):
    __tablename__ = "ossea_configs"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(255), unique=True)
    api_url: Mapped[str] = mapped_column(String(500))
    api_key: Mapped[str] = mapped_column(String(500))
    secret_key: Mapped[str] = mapped_column(String(SECRET_CIPHERTEXT_LEN))  # ciphertext, never plaintext
    domain: Mapped[str | None] = mapped_column(String(255), server_default="/")
    zone: Mapped[str] = mapped_column(String(255))
    oma_vm_id: Mapped[str | None] = mapped_column(String(255))
    is_active: Mapped[bool | None] = mapped_column(Boolean, server_default=true())
    created_at: Mapped[datetime] = mapped_column(DateTime, server_default=func.current_timestamp())
    updated_at: Mapped[datetime] = mapped_column(DateTime, server_default=func.current_timestamp())
