"""Log lines of a task, one row each, in arrival order."""

from __future__ import annotations

import datetime as dt
import uuid

from sqlalchemy import BigInteger, Column, Integer
from sqlmodel import Field, SQLModel

from app.models.types import UTCDateTime


class TaskLog(SQLModel, table=True):
    __tablename__ = "task_logs"

    # BIGINT on PostgreSQL; SQLite needs plain INTEGER to autoincrement a rowid.
    id: int | None = Field(
        default=None,
        sa_column=Column(BigInteger().with_variant(Integer(), "sqlite"), primary_key=True),
    )
    task_id: uuid.UUID = Field(index=True)
    timestamp: dt.datetime = Field(sa_column=Column(UTCDateTime, nullable=False))
    level: str = Field(max_length=16)
    message: str
