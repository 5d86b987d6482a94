"""Tasks: one unit of work for one agent, and its life from pending to a final state."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Column, Index, LargeBinary, UniqueConstraint
from sqlmodel import Field, SQLModel

from app.models.types import JSONType, UTCDateTime, utcnow


class Task(SQLModel, table=True):
    __tablename__ = "tasks"
    __table_args__ = (
        # Claiming pending work: one agent's open tasks, best first.
        Index("ix_tasks_agent_status_priority", "agent_id", "status", "priority", "created_at"),
        Index("ix_tasks_status_assigned_at", "status", "assigned_at"),
        # A dispatch creates at most one task per agent, however often it is expanded.
        UniqueConstraint("dispatch_id", "agent_id", name="uq_tasks_dispatch_agent"),
    )

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    # No foreign key: a task outlives its agent's deletion as history.
    agent_id: uuid.UUID
    dispatch_id: uuid.UUID | None = Field(default=None, index=True)
    task_type: str = Field(max_length=128)
    payload: dict[str, Any] = Field(
        default_factory=dict, sa_column=Column(JSONType, nullable=False)
    )
    # Encrypted JSON (AES-GCM); see app/tasks/credentials.py.
    credentials_encrypted: bytes | None = Field(default=None, sa_column=Column(LargeBinary))
    # The server's detached signature, made at creation: {"alg", "kid", "value"}
    # (app/signing/tasks.py). Kept, not re-made, so that a row altered later fails.
    signature: dict[str, str] | None = Field(default=None, sa_column=Column(JSONType))
    timeout: int = 300
    priority: int = 0
    # pending | assigned | running | succeeded | failed | cancelled | timed_out
    # | unknown (agent lost mid-task; app/tasks/lost_work.py)
    status: str = Field(default="pending", max_length=16)
    created_at: dt.datetime = Field(
        default_factory=utcnow, sa_column=Column(UTCDateTime, nullable=False)
    )
    assigned_at: dt.datetime | None = Field(default=None, sa_column=Column(UTCDateTime))
    started_at: dt.datetime | None = Field(default=None, sa_column=Column(UTCDateTime))
    completed_at: dt.datetime | None = Field(default=None, sa_column=Column(UTCDateTime))
    progress: int | None = None
    progress_message: str | None = Field(default=None, max_length=1024)
    result: dict[str, Any] | None = Field(default=None, sa_column=Column(JSONType))
    error: str | None = Field(default=None, max_length=4096)
    # Bytes of log messages stored so far, against STELLA_TASK_LOG_MAX_BYTES.
    log_bytes: int = Field(default=0, sa_column_kwargs={"server_default": "0"})
    log_truncated: bool = Field(default=False, sa_column_kwargs={"server_default": sa.false()})
    # The request that created it (or its dispatch), so that its log lines can be found.
    request_id: str | None = Field(default=None, max_length=64)
