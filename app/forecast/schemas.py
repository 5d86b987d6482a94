"""The answer of GET /api/v1/certificates/forecast."""

from __future__ import annotations

import uuid
from typing import Literal

from app.schemas import ApiModel, Timestamp

# offline: marked offline; silent: still marked live, but no heartbeat for the
# offline window; renewal_late: heartbeating, yet expiring before its next heartbeat.
RiskReason = Literal["offline", "silent", "renewal_late"]


class AgentAtRisk(ApiModel):
    agent_id: uuid.UUID
    name: str
    status: str
    last_heartbeat: Timestamp
    cert_expires_at: Timestamp
    reason: RiskReason


class LockoutForecast(ApiModel):
    hours: int
    as_of: Timestamp
    # Newest certificates that expire within `hours` (renewals in sight or not).
    expiring: int
    # Of those, the ones no renewal will reach in time (listed in `agents`).
    at_risk: int
    # Already expired: locked out, unless within STELLA_CERT_GRACE (`recoverable`).
    expired: int
    recoverable: int
    # The agents at risk, soonest expiry first (at most `limit`).
    agents: list[AgentAtRisk]
