"""Recording audit events in the caller's transaction, reading and pruning them.

An event is added to the transaction of the change it describes, so a
change that rolls back leaves no event behind. Details name what changed
(names, labels, certificate serials and expiries), never a secret: no
token, JWT, credential or private key.
"""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

from sqlalchemy import CursorResult, delete, select
from sqlmodel import Session, col

from app.audit.schemas import AuditAction, AuditEventPublic
from app.errors import InvalidInput
from app.models import AuditEvent
from app.models.types import utcnow
from app.pagination import DEFAULT_LIMIT, decode_cursor, encode_cursor
from app.settings import Settings

OPERATOR = "operator"
SYSTEM = "system"
ANONYMOUS = "anonymous"


def agent_actor(agent_id: uuid.UUID) -> str:
    return f"agent:{agent_id}"


def timestamp(value: dt.datetime) -> str:
    """A datetime in a detail, as the API renders them (UTC, milliseconds, "Z")."""
    return value.astimezone(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def record(
    *,
    session: Session,
    action: AuditAction,
    actor: str,
    agent_id: uuid.UUID | None = None,
    source: str | None = None,
    detail: dict[str, Any] | None = None,
    at: dt.datetime | None = None,
    count: int = 1,
) -> None:
    """Add an event to the caller's transaction: it is kept only if that commits."""
    session.add(
        AuditEvent(
            at=at or utcnow(),
            action=action,
            actor=actor,
            agent_id=agent_id,
            source=source[:64] if source else None,
            detail=detail or {},
            count=count,
        )
    )


def list_events(
    *,
    session: Session,
    action: AuditAction | None = None,
    agent_id: uuid.UUID | None = None,
    since: dt.datetime | None = None,
    limit: int = DEFAULT_LIMIT,
    cursor: str | None = None,
) -> tuple[list[AuditEventPublic], str | None]:
    """Events newest first, filtered, one keyset page at a time (next cursor or None)."""
    query = select(AuditEvent)
    if action is not None:
        query = query.where(col(AuditEvent.action) == action)
    if agent_id is not None:
        query = query.where(col(AuditEvent.agent_id) == agent_id)
    if since is not None:
        query = query.where(col(AuditEvent.at) >= since)
    if cursor is not None:
        at_raw, id_raw = decode_cursor(cursor, 2)
        try:
            last_at = dt.datetime.fromisoformat(at_raw).astimezone(dt.UTC)
            last_id = int(id_raw)
        except (TypeError, ValueError, OverflowError) as exc:
            raise InvalidInput("cursor is not valid") from exc
        if not 0 <= last_id < 2**63:
            raise InvalidInput("cursor is not valid")
        query = query.where(
            (col(AuditEvent.at) < last_at)
            | ((col(AuditEvent.at) == last_at) & (col(AuditEvent.id) < last_id))
        )
    rows = session.scalars(
        query.order_by(col(AuditEvent.at).desc(), col(AuditEvent.id).desc()).limit(limit + 1)
    ).all()
    page = rows[:limit]
    next_cursor = encode_cursor(page[-1].at.isoformat(), page[-1].id) if len(rows) > limit else None
    return [AuditEventPublic.model_validate(event) for event in page], next_cursor


def prune(*, session: Session, settings: Settings, now: dt.datetime | None = None) -> int:
    """Delete the events older than STELLA_AUDIT_RETENTION_DAYS; how many went."""
    cutoff = (now or utcnow()) - dt.timedelta(days=settings.audit_retention_days)
    # No RETURNING: a long retention may end thousands of rows at once.
    result = session.execute(delete(AuditEvent).where(col(AuditEvent.at) < cutoff))
    assert isinstance(result, CursorResult)
    return int(result.rowcount)
