"""GET /api/v1/certificates/forecast and the stella_certificates_lockout_forecast gauge."""

from __future__ import annotations

import datetime as dt
import uuid

import httpx
from sqlalchemy import update
from sqlmodel import col

from app.db import transaction
from app.models import Agent
from app.models.types import utcnow
from tests.conftest import Stack
from tests.metrics.helpers import scrape, value
from tests.sweeps.test_service import agent_row, insert

GAUGE = "stella_certificates_lockout_forecast"
HOURS = dt.timedelta(hours=1)


def fleet(stack: Stack) -> dict[str, Agent]:
    """One agent of each kind, by what the forecast should say of it."""
    silent_since = utcnow() - dt.timedelta(minutes=10)
    agents = {
        # Heartbeating: its next heartbeat renews it.
        "renewing": agent_row(stack, cert_ttl=2 * HOURS),
        "offline": agent_row(stack, status="offline", cert_ttl=2 * HOURS),
        "silent": agent_row(stack, last_heartbeat=silent_since, cert_ttl=5 * HOURS),
        # Heartbeating, but it expires before its next heartbeat (30 s).
        "late": agent_row(stack, cert_ttl=dt.timedelta(seconds=10)),
        "offline_later": agent_row(stack, status="offline", cert_ttl=48 * HOURS),
        "expired": agent_row(stack, status="offline"),
        "far": agent_row(stack, status="offline", cert_ttl=30 * 24 * HOURS),
    }
    insert(stack, *agents.values())
    set_not_after(stack, agents["expired"].id, utcnow() - dt.timedelta(minutes=10))
    return agents


def set_not_after(stack: Stack, agent_id: uuid.UUID, not_after: dt.datetime) -> None:
    with transaction(stack.runtime.engine) as session:
        session.execute(
            update(Agent).where(col(Agent.id) == agent_id).values(cert_not_after=not_after)
        )


def test_the_forecast_names_the_agents_no_renewal_will_reach(
    stack: Stack, operator: httpx.Client
) -> None:
    agents = fleet(stack)
    response = operator.get("/api/v1/certificates/forecast", params={"hours": 24})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["hours"] == 24
    assert body["expiring"] == 4  # renewing, offline, silent, late
    assert body["atRisk"] == 3
    assert body["expired"] == 1
    assert body["recoverable"] == 0  # STELLA_CERT_GRACE is off
    listed = [(item["agentId"], item["reason"]) for item in body["agents"]]
    assert listed == [
        (str(agents["late"].id), "renewal_late"),
        (str(agents["offline"].id), "offline"),
        (str(agents["silent"].id), "silent"),
    ]
    assert body["agents"][1]["name"] == agents["offline"].name
    assert body["agents"][1]["status"] == "offline"

    week = operator.get("/api/v1/certificates/forecast", params={"hours": 168, "limit": 1}).json()
    assert (week["expiring"], week["atRisk"]) == (5, 4)
    assert [item["agentId"] for item in week["agents"]] == [str(agents["late"].id)]


def test_the_gauge_moves_with_the_fleet(stack: Stack, operator: httpx.Client) -> None:
    agents = fleet(stack)
    samples = scrape(operator)
    assert value(samples, GAUGE, within="1h") == 1
    assert value(samples, GAUGE, within="24h") == 3
    assert value(samples, GAUGE, within="168h") == 4

    # The offline agent comes back: its heartbeat will renew it.
    with transaction(stack.runtime.engine) as session:
        session.execute(
            update(Agent)
            .where(col(Agent.id) == agents["offline"].id)
            .values(status="online", last_heartbeat=utcnow())
        )
    samples = scrape(operator)
    assert value(samples, GAUGE, within="24h") == 2
    assert value(samples, GAUGE, within="168h") == 3


def test_operators_only_and_bounded(stack: Stack, operator: httpx.Client) -> None:
    with httpx.Client(base_url=stack.base_url, verify=stack.ssl_context()) as anonymous:
        response = anonymous.get("/api/v1/certificates/forecast")
        assert response.status_code == 401
        assert response.headers["content-type"] == "application/problem+json"
    for params in ({"hours": 0}, {"hours": "x"}, {"limit": 0}, {"limit": 5000}):
        response = operator.get("/api/v1/certificates/forecast", params=params)
        assert response.status_code == 422, params
        assert response.headers["content-type"] == "application/problem+json"
    empty = operator.get("/api/v1/certificates/forecast").json()
    assert (empty["hours"], empty["expiring"], empty["atRisk"], empty["agents"]) == (24, 0, 0, [])
