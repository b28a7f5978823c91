"""API keys: who a request is from. Only each key's SHA-256 is stored, so a copy of the
database gives nobody a working key; the secret itself is shown once, when it is created."""

from __future__ import annotations

import hashlib
import secrets

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from api.db import ApiKey, new_id, now

SECRET_PREFIX = "llmflow-"
DISPLAY_CHARS = 14  # "llmflow-" and six random characters: enough to tell keys apart, useless to guess with


def new_secret() -> str:
    """A fresh key: 256 random bits, with a prefix that says what it is for (and what leaked)."""
    return SECRET_PREFIX + secrets.token_urlsafe(32)


def digest(secret: str) -> str:
    """The stored form of a key: a plain SHA-256 is enough, a key has 256 random bits."""
    return hashlib.sha256(secret.encode()).hexdigest()


def display_prefix(secret: str) -> str:
    """The start of a key, kept so that a person can tell which of their keys a row is."""
    return secret[:DISPLAY_CHARS]


def masked(secret: str) -> str:
    """A key as an error message may show it: its ends only (as OpenAI's "Incorrect API key" does)."""
    return f"{secret[:8]}***{secret[-4:]}" if len(secret) > 16 else "***"


async def create_key(session: AsyncSession, name: str) -> tuple[ApiKey, str]:
    """Store a new key named ``name``; the row and the secret (which is not stored anywhere)."""
    name = name.strip()
    if not name or len(name) > 200:
        raise ValueError("a key's name must have 1 to 200 characters")
    secret = new_secret()
    row = ApiKey(id=new_id("key_"), name=name, sha256=digest(secret), prefix=display_prefix(secret), created_at=now())
    session.add(row)
    await session.commit()
    return row, secret


async def list_keys(session: AsyncSession) -> list[ApiKey]:
    """Every key, revoked ones too, oldest first."""
    return list((await session.scalars(select(ApiKey).order_by(ApiKey.created_at, ApiKey.id))).all())


async def revoke_key(session: AsyncSession, key_id: str) -> ApiKey | None:
    """Revoke ``key_id`` (from its next request on); None if there is no such key. Revoking
    twice keeps the first time."""
    row = await session.get(ApiKey, key_id)
    if row is None:
        return None
    if row.revoked_at is None:
        row.revoked_at = now()
        await session.commit()
    return row


async def owner_of(session: AsyncSession, secret: str) -> str | None:
    """The id of the key ``secret`` is; None for an unknown or revoked key."""
    if not secret.startswith(SECRET_PREFIX):
        return None
    row = (await session.execute(select(ApiKey.id, ApiKey.revoked_at).where(ApiKey.sha256 == digest(secret)))).first()
    return row.id if row is not None and row.revoked_at is None else None
