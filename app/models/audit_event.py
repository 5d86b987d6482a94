"""The audit trail: who did what to which agent, and when. Never a secret."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

from sqlalchemy import BigInteger, Column, Integer
from sqlmodel import Field, SQLModel

from app.models.types import JSONType, UTCDateTime, utcnow


class AuditEvent(SQLModel, table=True):
    __tablename__ = "audit_events"

    # BIGINT on PostgreSQL; SQLite needs plain INTEGER to autoincrement a rowid.
    id: int | None = Field(
        default=None,
        sa_column=Column(BigInteger().with_variant(Integer(), "sqlite"), primary_key=True),
    )
    at: dt.datetime = Field(
        default_factory=utcnow, sa_column=Column(UTCDateTime, nullable=False, index=True)
    )
    # agent.registered | agent.updated | agent.deleted | auth.refused | cert.issued | ...
    action: str = Field(max_length=32)
    # operator | agent:<uuid> | anonymous | system
    actor: str = Field(max_length=64)
    # No foreign key: the trail outlives the agent's deletion.
    agent_id: uuid.UUID | None = Field(default=None, index=True)
    # The client's address, where there was a client.
    source: str | None = Field(default=None, max_length=64)
    detail: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSONType, nullable=False))
    # Refusals are coalesced: how many this one event stands for.
    count: int = Field(default=1, sa_column_kwargs={"server_default": "1"})
