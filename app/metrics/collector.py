"""Gauges that are facts of the database, read when Prometheus scrapes.

Kept nowhere in memory: any web process answers a scrape with the same
numbers, and none of them drifts when another process, a worker or a sweep
changes a row. One grouped query per gauge, in one short transaction.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from typing import get_args

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import Engine, func, select
from sqlmodel import col

from app.agents.schemas import AgentStatus
from app.db import transaction
from app.models import Agent, Task
from app.models.types import utcnow
from app.settings import Settings
from app.tasks.schemas import TaskStatus

AGENTS = "stella_agents"
TASKS = "stella_tasks"
CERTIFICATES_EXPIRING = "stella_certificates_expiring"
FAMILIES = (AGENTS, TASKS, CERTIFICATES_EXPIRING)


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
        yield _by_label(AGENTS, "Registered agents, by status.", "status", agents)
        yield _by_label(TASKS, "Tasks, by state.", "status", tasks)
        yield GaugeMetricFamily(
            CERTIFICATES_EXPIRING,
            "Agent certificates within STELLA_CERT_RENEWAL_WINDOW of expiry (renewals behind).",
            value=expiring,
        )


def _by_label(name: str, documentation: str, label: str, counts: dict[str, int]) -> Metric:
    family = GaugeMetricFamily(name, documentation, labels=[label])
    for value, count in sorted(counts.items()):
        family.add_metric([value], count)
    return family
