"""Minting and spending registration tokens."""

from __future__ import annotations

import datetime as dt
import hashlib
import secrets
import uuid

from sqlalchemy import Table, update
from sqlmodel import Session

from app.audit import service as audit_service
from app.errors import InvalidInput
from app.models import RegistrationToken
from app.models.types import utcnow
from app.settings import Settings

TOKEN_PREFIX = "srt_"  # noqa: S105  (a prefix that makes leaked tokens greppable)


def hash_token(token: str) -> str:
    """Tokens are high-entropy, so a plain SHA-256 is enough (no password hashing)."""
    return hashlib.sha256(token.encode()).hexdigest()


def create_token(
    *,
    session: Session,
    settings: Settings,
    ttl_seconds: int | None = None,
    source: str | None = None,
) -> tuple[str, RegistrationToken]:
    """Mint a token (by the operator); the plaintext is returned once and never stored."""
    ttl = settings.registration_token_ttl if ttl_seconds is None else ttl_seconds
    if not 1 <= ttl <= settings.registration_token_ttl:
        raise InvalidInput(f"ttlSeconds must be between 1 and {settings.registration_token_ttl}")
    plaintext = TOKEN_PREFIX + secrets.token_urlsafe(32)
    now = utcnow()
    row = RegistrationToken(
        token_hash=hash_token(plaintext), created_at=now, expires_at=now + dt.timedelta(seconds=ttl)
    )
    session.add(row)
    session.flush()
    audit_service.record(
        session=session,
        action="token.created",
        actor=audit_service.OPERATOR,
        source=source,
        # The row's id, never the token or its hash.
        detail={"tokenId": str(row.id), "expiresAt": audit_service.timestamp(row.expires_at)},
    )
    return plaintext, row


def consume_token(*, session: Session, token: str, agent_id: uuid.UUID) -> bool:
    """Spend `token` for `agent_id`; False when it is unknown, used or expired.

    One guarded UPDATE: of concurrent registrations with one token, exactly
    one sees its row returned. The caller's transaction decides whether the
    spend sticks, so a registration that fails later spends nothing.
    """
    now = utcnow()
    # Core, not ORM: no bulk-update bookkeeping for a row we never load.
    tokens: Table = RegistrationToken.__table__  # type: ignore[attr-defined]
    spent = session.execute(
        update(tokens)
        .where(
            tokens.c.token_hash == hash_token(token),
            tokens.c.used_at.is_(None),
            tokens.c.expires_at > now,
        )
        .values(used_at=now, agent_id=agent_id)
        .returning(tokens.c.id)
    ).first()
    return spent is not None
