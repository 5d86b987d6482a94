"""When each sweep last ran, so that a sweep can tell the control plane was down."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import Column
from sqlmodel import Field, SQLModel

from app.models.types import UTCDateTime


class SweepMark(SQLModel, table=True):
    __tablename__ = "sweep_marks"

    name: str = Field(primary_key=True, max_length=32)
    last_run_at: dt.datetime = Field(sa_column=Column(UTCDateTime, nullable=False))
    # Set after an outage: until then the sweep marks no agent offline.
    held_until: dt.datetime | None = Field(
        default=None, sa_column=Column(UTCDateTime, nullable=True)
    )
