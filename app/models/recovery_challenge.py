"""Spent proof-of-possession challenges of lockout-proof renewal (STELLA_CERT_GRACE).

Challenges are not stored when made (see app/recovery/challenges.py); a
redeemed one's nonce is inserted here in the transaction that issues the
certificate, so of two redemptions of one challenge exactly one inserts it.
Kept until the challenge would have expired anyway, then purged.
"""

from __future__ import annotations

import datetime as dt
import uuid

from sqlalchemy import Column
from sqlmodel import Field, SQLModel

from app.models.types import UTCDateTime


class RecoveryChallenge(SQLModel, table=True):
    __tablename__ = "recovery_challenges"

    nonce: str = Field(primary_key=True, max_length=32)
    agent_id: uuid.UUID
    expires_at: dt.datetime = Field(sa_column=Column(UTCDateTime, nullable=False, index=True))
