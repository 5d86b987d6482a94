"""The real agent restarted after its certificate expired: recovered with the grace on,
locked out (a clear error, exit code 2) with it off."""

from __future__ import annotations

import datetime as dt
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from sqlalchemy import update
from sqlmodel import col

from app.db import transaction
from app.models import Agent
from app.models.types import utcnow
from tests.agent.helpers import AgentRunner, install_fake_docker
from tests.conftest import Stack, mint_token, operator_client, start_stack, truncate
from tests.recovery.helpers import lapse

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def grace_stack(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    yield from start_stack(
        tmp_path_factory.mktemp("agent-grace"),
        database_url,
        worker=False,
        cert_grace=7 * 86400,
        heartbeat_interval=2,
    )


def run_then_lapse(stack: Stack, operator: httpx.Client, tmp: Path) -> AgentRunner:
    """Register and run the agent, stop it, then let its certificate expire an hour ago
    (in its state directory and on the server, as a host that was off would find it)."""
    agent = AgentRunner(stack.base_url, stack.ca_file, tmp, install_fake_docker(tmp))
    process = agent.start(token=mint_token(operator))
    process.wait_for("task stream connected")
    process.stop()
    key = serialization.load_pem_private_key(
        (agent.state_dir / "key.pem").read_bytes(), password=None
    )
    pem = lapse(stack, agent.agent_id, key.public_key(), ago=dt.timedelta(hours=1))
    (agent.state_dir / "cert.pem").write_text(pem)
    # Silent meanwhile: the sweep marked it offline.
    with transaction(stack.runtime.engine) as session:
        session.execute(
            update(Agent).where(col(Agent.id) == uuid.UUID(agent.agent_id)).values(status="offline")
        )
    return agent


def not_after(path: Path) -> dt.datetime:
    return x509.load_pem_x509_certificate(path.read_bytes()).not_valid_after_utc


def test_an_agent_restarted_after_expiry_recovers_with_the_grace_on(
    grace_stack: Stack, tmp_path: Path
) -> None:
    stack = grace_stack
    truncate(stack.runtime)
    with operator_client(stack) as operator:
        agent = run_then_lapse(stack, operator, tmp_path)
        try:
            token_before = (agent.state_dir / "token").read_text()
            process = agent.start()  # no registration token
            process.wait_for("certificate recovered")
            process.wait_for("task stream connected")
            assert not_after(agent.state_dir / "cert.pem") > utcnow() + dt.timedelta(hours=23)
            assert (agent.state_dir / "token").read_text() != token_before
            assert (agent.state_dir / "cert.pem").stat().st_mode & 0o077 == 0

            # Back at work: its heartbeat, with the new certificate, brings it online.
            deadline = time.monotonic() + 20
            while operator.get(f"/api/v1/agents/{agent.agent_id}").json()["status"] != "online":
                assert time.monotonic() < deadline, process.output()
                time.sleep(0.2)
            events = operator.get(
                "/api/v1/audit", params={"action": "cert.recovered", "agentId": agent.agent_id}
            ).json()
            assert len(events) == 1
            assert events[0]["detail"]["expiredFor"] >= 3600
            process.stop()
            assert process.process is not None
            assert process.process.returncode == 0, process.output()
        finally:
            agent.close()


def test_an_agent_restarted_after_expiry_stays_locked_out_with_the_grace_off(
    stack: Stack, operator: httpx.Client, tmp_path: Path
) -> None:
    agent = run_then_lapse(stack, operator, tmp_path)
    try:
        expired_at = not_after(agent.state_dir / "cert.pem")
        process = agent.start()
        assert process.process is not None
        assert process.process.wait(timeout=30) == 2, process.output()
        output = process.output()
        assert "locked out" in output
        assert "STELLA_CERT_GRACE" in output
        assert "task stream connected" not in output
        assert not_after(agent.state_dir / "cert.pem") == expired_at
        assert operator.get("/api/v1/audit", params={"action": "cert.recovered"}).json() == []
    finally:
        agent.close()


def test_a_certificate_that_lapses_while_the_agent_runs_is_recovered(
    grace_stack: Stack, tmp_path: Path
) -> None:
    stack = grace_stack
    truncate(stack.runtime)
    with operator_client(stack) as operator:
        agent = AgentRunner(stack.base_url, stack.ca_file, tmp_path, install_fake_docker(tmp_path))
        try:
            process = agent.start(token=mint_token(operator))
            process.wait_for("task stream connected")
            # The server was away through the renewal window: the certificate lapsed.
            key = serialization.load_pem_private_key(
                (agent.state_dir / "key.pem").read_bytes(), password=None
            )
            pem = lapse(stack, agent.agent_id, key.public_key(), ago=dt.timedelta(minutes=5))
            (agent.state_dir / "cert.pem").write_text(pem)
            process.wait_for("certificate expired while running")
            process.wait_for("certificate recovered")
            assert not_after(agent.state_dir / "cert.pem") > utcnow() + dt.timedelta(hours=23)
            events = operator.get(
                "/api/v1/audit", params={"action": "cert.recovered", "agentId": agent.agent_id}
            ).json()
            assert len(events) == 1
            assert "locked out" not in process.output()
            process.stop()
            assert process.process is not None
            assert process.process.returncode == 0, process.output()
        finally:
            agent.close()
