"""Receipts: an agent's signed statement of how it ended a task (one per task)."""

from __future__ import annotations

import datetime as dt
import uuid

from sqlalchemy import Column, Text
from sqlmodel import Field, SQLModel

from app.models.types import UTCDateTime, utcnow


class TaskReceipt(SQLModel, table=True):
    __tablename__ = "task_receipts"

    # No foreign key, as for task logs: history outlives deletions.
    task_id: uuid.UUID = Field(primary_key=True)
    agent_id: uuid.UUID = Field(index=True)
    # The exact bytes the agent signed (canonical JSON, see app/signing/canonical.py).
    signed: str = Field(sa_column=Column(Text, nullable=False))
    # base64url; ES256 (DER), EdDSA or RS256, after the agent's key.
    signature: str = Field(sa_column=Column(Text, nullable=False))
    algorithm: str = Field(max_length=16)
    # The certificate that certified the agent's key when the receipt arrived.
    certificate_pem: str = Field(sa_column=Column(Text, nullable=False))
    received_at: dt.datetime = Field(
        default_factory=utcnow, sa_column=Column(UTCDateTime, nullable=False)
    )
