"""A dispatch by selector: one request fanned out into a task per matching agent."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

from sqlalchemy import Column, LargeBinary
from sqlmodel import Field, SQLModel

from app.models.types import JSONType, UTCDateTime, utcnow


class Dispatch(SQLModel, table=True):
    __tablename__ = "dispatches"

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    # pending | expanding | done
    status: str = Field(default="pending", max_length=16, index=True)
    # {"capability"?: str, "labels"?: {k: v}}
    target: dict[str, Any] = Field(sa_column=Column(JSONType, nullable=False))
    task_type: str = Field(max_length=128)
    payload: dict[str, Any] = Field(
        default_factory=dict, sa_column=Column(JSONType, nullable=False)
    )
    credentials_encrypted: bytes | None = Field(default=None, sa_column=Column(LargeBinary))
    timeout: int = 300
    priority: int = 0
    created_at: dt.datetime = Field(
        default_factory=utcnow, sa_column=Column(UTCDateTime, nullable=False)
    )
    updated_at: dt.datetime = Field(
        default_factory=utcnow, sa_column=Column(UTCDateTime, nullable=False)
    )
    completed_at: dt.datetime | None = Field(default=None, sa_column=Column(UTCDateTime))
    # The request that made it; its expansion in a worker logs under the same id.
    request_id: str | None = Field(default=None, max_length=64)
