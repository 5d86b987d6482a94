"""Proof-of-possession challenges of lockout-proof renewal (STELLA_CERT_GRACE).

At most one per agent (the agent id is the key): asking again replaces it.
A challenge is spent by deleting its row, so two redemptions of one
challenge cannot both succeed. No foreign key: a challenge of an agent
deleted meanwhile is refused when redeemed, and replaced or left to expire.
"""

from __future__ import annotations

import datetime as dt
import uuid

from sqlalchemy import Column
from sqlmodel import Field, SQLModel

from app.models.types import UTCDateTime


class RecoveryChallenge(SQLModel, table=True):
    __tablename__ = "recovery_challenges"

    agent_id: uuid.UUID = Field(primary_key=True)
    # Random, base64url; the agent signs it (bound to its id) with its key.
    challenge: str = Field(max_length=64)
    created_at: dt.datetime = Field(sa_column=Column(UTCDateTime, nullable=False))
    expires_at: dt.datetime = Field(sa_column=Column(UTCDateTime, nullable=False, index=True))
