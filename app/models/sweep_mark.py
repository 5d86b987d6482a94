"""When each sweep last ran, and the state of the mass-offline guard.

The guard lives here, on the control-plane mark, so that every worker and
beat agrees on it: the row lock the sweeps take orders their runs.
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import Column, Integer, String
from sqlmodel import Field, SQLModel

from app.models.types import UTCDateTime


class SweepMark(SQLModel, table=True):
    __tablename__ = "sweep_marks"

    name: str = Field(primary_key=True, max_length=32)
    last_run_at: dt.datetime = Field(sa_column=Column(UTCDateTime, nullable=False))
    # Until then the sweep marks no agent offline (the guard's grace).
    held_until: dt.datetime | None = Field(
        default=None, sa_column=Column(UTCDateTime, nullable=True)
    )
    # The guard, while engaged (and until the first sweep after its grace):
    # why ("outage" or "percent"), since when, and how many agents were
    # silent when it engaged.
    guard_reason: str | None = Field(default=None, sa_column=Column(String(16), nullable=True))
    guard_since: dt.datetime | None = Field(
        default=None, sa_column=Column(UTCDateTime, nullable=True)
    )
    guard_held: int | None = Field(default=None, sa_column=Column(Integer, nullable=True))
    # How many times the guard engaged, by reason (exported as counters).
    guard_outages: int = Field(
        default=0, sa_column=Column(Integer, nullable=False, server_default="0")
    )
    guard_percent_trips: int = Field(
        default=0, sa_column=Column(Integer, nullable=False, server_default="0")
    )
