"""Single-use registration tokens, stored only as a SHA-256 hash."""

from __future__ import annotations

import datetime as dt
import uuid

from sqlalchemy import Column
from sqlmodel import Field, SQLModel

from app.models.types import UTCDateTime, utcnow


class RegistrationToken(SQLModel, table=True):
    __tablename__ = "registration_tokens"

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    token_hash: str = Field(max_length=64, unique=True)
    created_at: dt.datetime = Field(
        default_factory=utcnow, sa_column=Column(UTCDateTime, nullable=False)
    )
    expires_at: dt.datetime = Field(sa_column=Column(UTCDateTime, nullable=False, index=True))
    used_at: dt.datetime | None = Field(default=None, sa_column=Column(UTCDateTime, nullable=True))
    agent_id: uuid.UUID | None = Field(default=None)
