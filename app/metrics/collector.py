"""Gauges that are facts of the database, read when Prometheus scrapes.

Kept nowhere in memory: any web process answers a scrape with the same
numbers, and none of them drifts when another process, a worker or a sweep
changes a row. One grouped query per gauge, in one short transaction.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from typing import get_args

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import Engine, func, select
from sqlmodel import col

from app.agents.schemas import AgentStatus
from app.db import transaction
from app.forecast import service as forecast_service
from app.models import Agent, Task
from app.models.types import utcnow
from app.settings import Settings
from app.sweeps import guard
from app.tasks.schemas import TaskStatus

AGENTS = "stella_agents"
TASKS = "stella_tasks"
CERTIFICATES_EXPIRING = "stella_certificates_expiring"
GUARD_ENGAGED = "stella_offline_guard_engaged"
GUARD_HELD = "stella_offline_guard_agents_held"
GUARD_ENGAGEMENTS = "stella_offline_guard_engagements_total"
LOCKOUT_FORECAST = "stella_certificates_lockout_forecast"
FAMILIES = (
    AGENTS,
    TASKS,
    CERTIFICATES_EXPIRING,
    GUARD_ENGAGED,
    GUARD_HELD,
    GUARD_ENGAGEMENTS,
    LOCKOUT_FORECAST,
)


class DatabaseCollector(Collector):
    def __init__(self, engine: Engine, settings: Settings) -> None:
        self._engine = engine
        self._settings = settings

    def collect(self) -> Iterator[Metric]:
        window = dt.timedelta(seconds=self._settings.cert_renewal_window)
        with transaction(self._engine) as session:
            agents = dict.fromkeys(get_args(AgentStatus), 0)
            agents.update(
                session.execute(
                    select(col(Agent.status), func.count()).group_by(col(Agent.status))
                ).all()
            )
            tasks = dict.fromkeys(get_args(TaskStatus), 0)
            tasks.update(
                session.execute(
                    select(col(Task.status), func.count()).group_by(col(Task.status))
                ).all()
            )
            expiring = session.execute(
                select(func.count()).where(col(Agent.cert_not_after) <= utcnow() + window)
            ).scalar_one()
            at_risk = forecast_service.at_risk_counts(
                session, self._settings, forecast_service.METRIC_HORIZONS
            )
            offline_guard = guard.state(session=session, settings=self._settings, now=utcnow())
        yield _by_label(AGENTS, "Registered agents, by status.", "status", agents)
        yield _by_label(TASKS, "Tasks, by state.", "status", tasks)
        yield GaugeMetricFamily(
            CERTIFICATES_EXPIRING,
            "Agent certificates within STELLA_CERT_RENEWAL_WINDOW of expiry (renewals behind).",
            value=expiring,
        )
        yield _by_label(
            LOCKOUT_FORECAST,
            "Agents whose certificates expire within the horizon with no renewal in sight "
            "(offline, silent, or expiring before their next heartbeat).",
            "within",
            {f"{hours}h": count for hours, count in at_risk.items()},
        )
        yield from _guard_families(offline_guard)


def _guard_families(state: guard.GuardState) -> Iterator[Metric]:
    """The mass-offline guard: engaged (by reason), agents it holds, times it engaged."""
    engaged = GaugeMetricFamily(
        GUARD_ENGAGED,
        "1 while the mass-offline guard holds the offline sweep, by reason (outage, percent).",
        labels=["reason"],
    )
    engagements = CounterMetricFamily(
        GUARD_ENGAGEMENTS,
        "Times the mass-offline guard engaged, by reason (kept in the database).",
        labels=["reason"],
    )
    for reason in guard.REASONS:
        engaged.add_metric([reason], 1 if state.reason == reason else 0)
        engagements.add_metric([reason], state.engagements[reason])
    yield engaged
    yield GaugeMetricFamily(
        GUARD_HELD,
        "Live agents silent past the offline window that the engaged guard keeps online.",
        value=state.agents_held,
    )
    yield engagements


def _by_label(name: str, documentation: str, label: str, counts: dict[str, int]) -> Metric:
    family = GaugeMetricFamily(name, documentation, labels=[label])
    for value, count in sorted(counts.items()):
        family.add_metric([value], count)
    return family
