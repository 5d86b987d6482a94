"""STELLA_CERT_RENEW_AT: renewal at a fraction of the lifetime, with a per-agent jitter.

Unit tests of the rule, then the two places that apply it: the heartbeat's
renewal decision (a real TLS server) and the renewal sweep (the database of
the session stack, `now` passed in).
"""

from __future__ import annotations

import datetime as dt
import statistics
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives import serialization

from app.certs import renew_at
from app.db import transaction
from app.models import Agent
from app.settings import Settings
from app.sweeps import service as sweeps
from pki import issue_client_certificate
from tests.conftest import Stack, agent_client, operator_client, start_stack, truncate
from tests.recovery.helpers import register_keyed
from tests.sweeps.test_service import agent_row, insert, stored_certificate

DAY = 86400


def settings(**values: object) -> Settings:
    return Settings(cert_ttl=DAY, **values)  # type: ignore[arg-type]


class TestRule:
    def test_unset_keeps_the_seed_window(self) -> None:
        seed = settings(cert_renewal_window=1234)
        for _ in range(20):
            threshold = renew_at.renewal_threshold(seed, uuid.uuid4())
            assert threshold == dt.timedelta(seconds=1234)
        assert renew_at.largest_threshold(seed) == dt.timedelta(seconds=1234)

    def test_a_fraction_renews_within_five_percent_of_its_point(self) -> None:
        fraction = settings(cert_renew_at=0.67)
        thresholds = [
            renew_at.renewal_threshold(fraction, uuid.uuid4()).total_seconds() for _ in range(2000)
        ]
        # Due once 0.67 of the lifetime has passed, give or take 5 % of the lifetime.
        low, high = (1 - 0.67 - 0.05) * DAY, (1 - 0.67 + 0.05) * DAY
        assert all(low <= t <= high for t in thresholds)
        # Spread over the whole band, evenly: not a fleet renewing at once.
        assert min(thresholds) < low + 0.02 * DAY
        assert max(thresholds) > high - 0.02 * DAY
        assert statistics.mean(thresholds) == pytest.approx(0.33 * DAY, rel=0.02)
        assert statistics.pstdev(thresholds) == pytest.approx(0.1 * DAY / 12**0.5, rel=0.1)
        assert max(thresholds) <= renew_at.largest_threshold(fraction).total_seconds()

    def test_the_jitter_is_fixed_per_agent(self) -> None:
        agent_id = uuid.UUID("2f0e7f5c-1d3b-4a5e-9b8c-7d6e5f4a3b2c")
        first = renew_at.renewal_threshold(settings(cert_renew_at=0.5), agent_id)
        again = renew_at.renewal_threshold(settings(cert_renew_at=0.5), agent_id)
        assert first == again
        assert -1 <= renew_at.agent_jitter(agent_id) < 1
        other = renew_at.renewal_threshold(settings(cert_renew_at=0.5), uuid.uuid4())
        assert other != first

    def test_due_follows_the_threshold(self) -> None:
        rule = settings(cert_renew_at=0.5)
        agent_id = uuid.uuid4()
        now = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
        threshold = renew_at.renewal_threshold(rule, agent_id)
        second = dt.timedelta(seconds=1)
        assert renew_at.renewal_due(rule, agent_id, now + threshold, now)
        assert not renew_at.renewal_due(rule, agent_id, now + threshold + second, now)

    def test_extreme_fractions_stay_within_the_lifetime(self) -> None:
        for fraction in (0.01, 0.99):
            for _ in range(200):
                rule = settings(cert_renew_at=fraction)
                threshold = renew_at.renewal_threshold(rule, uuid.uuid4())
                assert dt.timedelta(0) <= threshold <= dt.timedelta(seconds=DAY)

    def test_the_setting_is_a_fraction(self) -> None:
        for bad in (0, 1, 1.5, -0.1):
            with pytest.raises(ValueError, match="cert_renew_at"):
                settings(cert_renew_at=bad)


# --- the heartbeat --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def renew_at_stack(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    yield from start_stack(
        tmp_path_factory.mktemp("renew-at"), database_url, worker=False, cert_renew_at=0.9
    )


def heartbeat_with_certificate(
    stack: Stack, operator: httpx.Client, tmp: Path, remaining: dt.timedelta
) -> httpx.Response:
    """A heartbeat presenting a certificate (for the agent's key) with `remaining` to live."""
    agent = register_keyed(stack, operator, f"renew-at-{uuid.uuid4().hex[:8]}")
    certificate = issue_client_certificate(
        stack.runtime.ca,
        agent_id=uuid.UUID(agent.id),
        public_key=agent.key.public_key(),
        ttl=remaining,
    )
    pem = certificate.public_bytes(serialization.Encoding.PEM).decode()
    with agent_client(
        stack, agent_id=agent.id, token=agent.token, cert_pem=pem, key_pem=agent.key_pem, tmp=tmp
    ) as http:
        return http.post(f"/api/v1/agents/{agent.id}/heartbeat", json={"status": "healthy"})


def test_the_heartbeat_renews_at_the_fraction_and_not_before(
    renew_at_stack: Stack, stack: Stack, tmp_path: Path
) -> None:
    truncate(renew_at_stack.runtime)
    # 0.9 of a day: due with 0.05-0.15 of the day left, at least 4,320 s; the seed's
    # window (3,600 s) would not renew a certificate with 4,000 s left.
    remaining = dt.timedelta(seconds=4000)
    with operator_client(renew_at_stack) as operator:
        early = heartbeat_with_certificate(renew_at_stack, operator, tmp_path, remaining)
        assert early.status_code == 200, early.text
        assert "certificateRenewal" in early.json()
        fresh = heartbeat_with_certificate(
            renew_at_stack, operator, tmp_path, dt.timedelta(seconds=0.8 * DAY)
        )
        assert fresh.status_code == 200, fresh.text
        assert "certificateRenewal" not in fresh.json()
    with operator_client(stack) as operator:
        seed = heartbeat_with_certificate(stack, operator, tmp_path, remaining)
        assert seed.status_code == 200, seed.text
        assert "certificateRenewal" not in seed.json()


# --- the renewal sweep ----------------------------------------------------------------------


def test_the_sweep_renews_each_agent_at_its_own_point(stack: Stack) -> None:
    rule = stack.runtime.settings.model_copy(update={"cert_renew_at": 0.5})
    # Agents whose renewal points lie at least five minutes apart.
    agents: list[Agent] = []
    while len(agents) < 4:
        candidate = agent_row(stack)
        point = renew_at.renewal_threshold(rule, candidate.id)
        if all(
            abs(point - renew_at.renewal_threshold(rule, a.id)) > dt.timedelta(minutes=5)
            for a in agents
        ):
            agents.append(candidate)
    insert(stack, *agents)
    ahead = dt.timedelta(seconds=2 * rule.resolved_sweep_interval)
    minute = dt.timedelta(seconds=60)

    def sweep(now: dt.datetime) -> None:
        with transaction(stack.runtime.engine) as session:
            sweeps.issue_renewals(session=session, ca=stack.runtime.ca, settings=rule, now=now)

    def serial(agent: Agent) -> str:
        return str(stored_certificate(stack, agent.id)[1].cert_serial)

    # Earliest first: the largest threshold before expiry.
    for agent in sorted(agents, key=lambda a: renew_at.renewal_threshold(rule, a.id), reverse=True):
        due_at = agent.cert_not_after - renew_at.renewal_threshold(rule, agent.id) - ahead
        sweep(due_at - minute)  # just before its own point: not this agent
        assert serial(agent) == agent.cert_serial
        sweep(due_at + minute)
        assert serial(agent) != agent.cert_serial
