"""Registered agents: identity, certified key, liveness and what they report."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

from sqlalchemy import Column, Index
from sqlmodel import Field, SQLModel

from app.models.types import JSONType, UTCDateTime, utcnow


class Agent(SQLModel, table=True):
    __tablename__ = "agents"
    __table_args__ = (
        # The offline sweep reads only agents still marked live and stale.
        Index("ix_agents_status_last_heartbeat", "status", "last_heartbeat"),
    )

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    name: str = Field(max_length=128, unique=True)
    version: str = Field(default="", max_length=64)
    # online | degraded | offline
    status: str = Field(default="online", max_length=16)
    # The last `status` the agent itself reported ("healthy", ...).
    reported_status: str = Field(default="healthy", max_length=32)
    capabilities: list[str] = Field(
        default_factory=list, sa_column=Column(JSONType, nullable=False)
    )
    labels: dict[str, str] = Field(default_factory=dict, sa_column=Column(JSONType, nullable=False))
    resource_usage: dict[str, Any] | None = Field(default=None, sa_column=Column(JSONType))
    running_tasks: int = 0
    registered_at: dt.datetime = Field(
        default_factory=utcnow, sa_column=Column(UTCDateTime, nullable=False)
    )
    last_heartbeat: dt.datetime = Field(
        default_factory=utcnow, sa_column=Column(UTCDateTime, nullable=False)
    )
    # The certified public key; renewals re-certify this same key.
    public_key_pem: str
    key_thumbprint: str = Field(max_length=64)
    # The newest certificate issued for the key (a renewal may be issued ahead).
    cert_pem: str
    cert_serial: str = Field(max_length=64)
    cert_not_after: dt.datetime = Field(sa_column=Column(UTCDateTime, nullable=False, index=True))
