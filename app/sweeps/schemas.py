"""Response body of the guard API."""

from __future__ import annotations

from typing import Literal

from app.schemas import ApiModel, Timestamp

# Why the mass-offline guard holds the offline sweep (app/sweeps/guard.py).
GuardReason = Literal["outage", "percent"]


class GuardEngagements(ApiModel):
    outage: int
    percent: int


class OfflineGuardPublic(ApiModel):
    # True while the offline sweep holds: no agent is marked offline before `until`.
    engaged: bool
    reason: GuardReason | None
    since: Timestamp | None
    until: Timestamp | None
    # Live agents silent for longer than the offline window now, kept online by the guard.
    agents_held: int
    # Live agents that were silent when the guard engaged.
    silent_when_engaged: int | None
    # STELLA_OFFLINE_GUARD_PERCENT (0: only an outage engages the guard) and the grace.
    percent: float
    grace_seconds: int
    # Times the guard engaged, by reason, since the database was created.
    engagements: GuardEngagements
