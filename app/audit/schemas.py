"""Response bodies of the audit API."""

from __future__ import annotations

import uuid
from typing import Any, Literal

from app.schemas import ApiModel, Timestamp

AuditAction = Literal[
    "agent.registered",
    "agent.updated",
    "agent.deleted",
    "auth.refused",
    "cert.issued",
    "cert.recovered",
    "cert.renewed",
    "token.created",
]


class AuditEventPublic(ApiModel):
    id: int
    at: Timestamp
    action: str
    # operator | agent:<uuid> | anonymous | system
    actor: str
    agent_id: uuid.UUID | None
    source: str | None
    detail: dict[str, Any]
    # More than 1: refusals coalesced into this event.
    count: int
