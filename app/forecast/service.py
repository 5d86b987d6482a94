"""Who will be locked out: certificates that lapse with no renewal in sight.

An agent renews on its heartbeat (and the renewal sweep signs ahead only
for live agents), so a certificate expiring within the horizon is at risk
when, judged on its newest certificate (`cert_not_after`, a renewal signed
ahead included):

- the agent is `offline`, or
- it is still marked live but silent for the offline window (its
  STELLA_OFFLINE_AFTER_MISSED heartbeat intervals), or
- it heartbeats, yet the certificate expires within one heartbeat
  interval: its next chance to renew may come too late.

Every other agent with a certificate expiring within the horizon will be
handed a renewal by a heartbeat before it lapses. Certificates already
expired are counted apart: locked out, or recoverable within
STELLA_CERT_GRACE (lockout-proof renewal).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

from sqlalchemy import ColumnElement, and_, case, func, or_, select
from sqlmodel import Session, col

from app.forecast.schemas import AgentAtRisk, LockoutForecast
from app.models import Agent
from app.models.types import utcnow
from app.settings import Settings

# The horizons of the metric, in hours (the label `within`: "1h", "24h", "168h").
METRIC_HORIZONS = (1, 24, 168)


def _offline() -> ColumnElement[bool]:
    return col(Agent.status) == "offline"


def _silent(settings: Settings, now: dt.datetime) -> ColumnElement[bool]:
    window = dt.timedelta(seconds=settings.heartbeat_interval * settings.offline_after_missed)
    return and_(col(Agent.status) != "offline", col(Agent.last_heartbeat) < now - window)


def _late(settings: Settings, now: dt.datetime) -> ColumnElement[bool]:
    next_chance = now + dt.timedelta(seconds=settings.heartbeat_interval)
    return col(Agent.cert_not_after) <= next_chance


def _at_risk(settings: Settings, now: dt.datetime) -> ColumnElement[bool]:
    return or_(_offline(), _silent(settings, now), _late(settings, now))


def at_risk_counts(
    session: Session, settings: Settings, horizons: Sequence[int], now: dt.datetime | None = None
) -> dict[int, int]:
    """Agents at risk within each horizon (hours), in one query."""
    now = now or utcnow()
    risk = _at_risk(settings, now)
    columns = [
        func.coalesce(
            func.sum(case((and_(risk, col(Agent.cert_not_after) <= now + _hours(h)), 1), else_=0)),
            0,
        )
        for h in horizons
    ]
    furthest = now + _hours(max(horizons))
    row = session.execute(
        select(*columns).where(
            col(Agent.cert_not_after) > now, col(Agent.cert_not_after) <= furthest
        )
    ).one()
    return {h: int(count) for h, count in zip(horizons, row, strict=True)}


def forecast(
    *, session: Session, settings: Settings, hours: int, limit: int, now: dt.datetime | None = None
) -> LockoutForecast:
    """The forecast for the next `hours`, with up to `limit` agents at risk, soonest first."""
    now = now or utcnow()
    horizon = now + _hours(hours)
    risk = _at_risk(settings, now)
    expiring = and_(col(Agent.cert_not_after) > now, col(Agent.cert_not_after) <= horizon)
    expired = col(Agent.cert_not_after) <= now
    grace_start = now - dt.timedelta(seconds=settings.cert_grace)
    recoverable = and_(expired, col(Agent.cert_not_after) >= grace_start)
    counts = session.execute(
        select(
            func.coalesce(func.sum(case((expiring, 1), else_=0)), 0),
            func.coalesce(func.sum(case((and_(expiring, risk), 1), else_=0)), 0),
            func.coalesce(func.sum(case((expired, 1), else_=0)), 0),
            func.coalesce(func.sum(case((recoverable, 1), else_=0)), 0),
        ).where(col(Agent.cert_not_after) <= horizon)
    ).one()
    rows = session.execute(
        select(
            col(Agent.id),
            col(Agent.name),
            col(Agent.status),
            col(Agent.last_heartbeat),
            col(Agent.cert_not_after),
            _offline(),
            _silent(settings, now),
        )
        .where(expiring, risk)
        .order_by(col(Agent.cert_not_after), col(Agent.id))
        .limit(limit)
    ).all()
    agents = [
        AgentAtRisk(
            agent_id=agent_id,
            name=name,
            status=status,
            last_heartbeat=last_heartbeat,
            cert_expires_at=not_after,
            reason="offline" if offline else "silent" if silent else "renewal_late",
        )
        for agent_id, name, status, last_heartbeat, not_after, offline, silent in rows
    ]
    return LockoutForecast(
        hours=hours,
        as_of=now,
        expiring=int(counts[0]),
        at_risk=int(counts[1]),
        expired=int(counts[2]),
        recoverable=int(counts[3]) if settings.cert_grace > 0 else 0,
        agents=agents,
    )


def _hours(hours: int) -> dt.timedelta:
    return dt.timedelta(hours=hours)
