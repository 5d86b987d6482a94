"""Lockout-proof renewal over the real TLS server, on both backends."""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import update
from sqlmodel import col

from app.db import transaction
from app.models import RecoveryChallenge
from app.models.types import utcnow
from pki import jwk_thumbprint
from tests.conftest import Stack, agent_client, operator_client, start_stack, truncate
from tests.recovery.helpers import KeyedAgent, csr_for, lapse, register_keyed

GRACE = 3600
AGO = dt.timedelta(minutes=30)


@pytest.fixture(scope="module")
def _grace_stack(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    yield from start_stack(
        tmp_path_factory.mktemp("grace"), database_url, worker=False, cert_grace=GRACE
    )


@pytest.fixture
def grace_stack(_grace_stack: Stack) -> Stack:
    truncate(_grace_stack.runtime)
    return _grace_stack


@pytest.fixture
def ops(grace_stack: Stack) -> Iterator[httpx.Client]:
    with operator_client(grace_stack) as client:
        yield client


@pytest.fixture
def anon(grace_stack: Stack) -> Iterator[httpx.Client]:
    """No token, no client certificate: all a locked-out agent has."""
    with httpx.Client(
        base_url=grace_stack.base_url, verify=grace_stack.ssl_context(), timeout=30
    ) as client:
        yield client


def challenge(client: httpx.Client, agent_id: str) -> str:
    response = client.post(f"/api/v1/agents/{agent_id}/recover/challenge")
    assert response.status_code == 201, response.text
    value: str = response.json()["challenge"]
    return value


def redeem(client: httpx.Client, agent: KeyedAgent, value: str, **extra: str) -> httpx.Response:
    body = {"challenge": value, "signature": agent.sign(value), **extra}
    return client.post(f"/api/v1/agents/{agent.id}/recover", json=body)


def lapsed(stack: Stack, ops: httpx.Client, name: str, ago: dt.timedelta = AGO) -> KeyedAgent:
    agent = register_keyed(stack, ops, name)
    agent.cert_pem = lapse(stack, agent.id, agent.key.public_key(), ago=ago)
    return agent


def problem(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    detail: str = response.json()["detail"]
    return detail


def test_an_expired_agent_is_recertified_and_works_again(
    grace_stack: Stack, ops: httpx.Client, anon: httpx.Client, tmp_path: Path
) -> None:
    agent = lapsed(grace_stack, ops, "lapsed-1")
    assert ops.get("/api/v1/certificates/forecast").json()["recoverable"] == 1
    answer = redeem(anon, agent, challenge(anon, agent.id), csr=csr_for(agent.key))
    assert answer.status_code == 200, answer.text
    data = answer.json()
    assert data["agentId"] == agent.id
    assert "key" not in data["certificate"]
    certificate = x509.load_pem_x509_certificate(data["certificate"]["cert"].encode())
    assert certificate.not_valid_after_utc > utcnow() + dt.timedelta(hours=23)
    assert jwk_thumbprint(certificate.public_key()) == jwk_thumbprint(agent.key.public_key())  # type: ignore[arg-type]

    # The new pair is a working identity: a heartbeat over mTLS passes.
    with agent_client(
        grace_stack,
        agent_id=agent.id,
        token=data["token"],
        cert_pem=data["certificate"]["cert"],
        key_pem=agent.key_pem,
        tmp=tmp_path,
    ) as http:
        beat = http.post(f"/api/v1/agents/{agent.id}/heartbeat", json={"status": "healthy"})
        assert beat.status_code == 200, beat.text

    assert ops.get("/api/v1/certificates/forecast").json()["recoverable"] == 0
    detail = ops.get(f"/api/v1/agents/{agent.id}").json()
    assert detail["certificate"]["serial"] == format(certificate.serial_number, "x")
    events = ops.get("/api/v1/audit", params={"action": "cert.recovered"}).json()
    assert [event["agentId"] for event in events] == [agent.id]
    assert events[0]["actor"] == f"agent:{agent.id}"
    assert events[0]["detail"]["expiredFor"] >= 1800
    assert events[0]["detail"]["serial"] == format(certificate.serial_number, "x")


def test_a_challenge_is_single_use_and_replaced_by_a_new_one(
    grace_stack: Stack, ops: httpx.Client, anon: httpx.Client
) -> None:
    agent = lapsed(grace_stack, ops, "lapsed-2")
    first = challenge(anon, agent.id)
    second = challenge(anon, agent.id)  # one live challenge per agent: the first is gone
    assert "unknown" in problem(redeem(anon, agent, first), 401)
    assert redeem(anon, agent, second).status_code == 200
    assert "already used" in problem(redeem(anon, agent, second), 401)


def test_an_expired_challenge_is_refused(
    grace_stack: Stack, ops: httpx.Client, anon: httpx.Client
) -> None:
    agent = lapsed(grace_stack, ops, "lapsed-3")
    value = challenge(anon, agent.id)
    with transaction(grace_stack.runtime.engine) as session:
        session.execute(
            update(RecoveryChallenge)
            .where(col(RecoveryChallenge.challenge) == value)
            .values(expires_at=utcnow() - dt.timedelta(seconds=1))
        )
    assert "expired" in problem(redeem(anon, agent, value), 401)


def test_bad_signatures_and_another_agents_proof_are_refused(
    grace_stack: Stack, ops: httpx.Client, anon: httpx.Client
) -> None:
    agent = lapsed(grace_stack, ops, "lapsed-4")
    other = lapsed(grace_stack, ops, "lapsed-5")
    value = challenge(anon, agent.id)
    # Signed by another agent's key.
    forged = {"challenge": value, "signature": other.sign(value, agent_id=agent.id)}
    response = anon.post(f"/api/v1/agents/{agent.id}/recover", json=forged)
    assert "does not verify" in problem(response, 401)
    # Our own key, but over another agent's id: the signature names the agent.
    replayed = {"challenge": value, "signature": agent.sign(value, agent_id=other.id)}
    response = anon.post(f"/api/v1/agents/{agent.id}/recover", json=replayed)
    problem(response, 401)
    # Another agent's own valid proof does not open this agent.
    theirs = challenge(anon, other.id)
    response = anon.post(
        f"/api/v1/agents/{agent.id}/recover",
        json={"challenge": theirs, "signature": other.sign(theirs, agent_id=agent.id)},
    )
    problem(response, 401)
    # Not base64url; a CSR for another key.
    response = anon.post(
        f"/api/v1/agents/{agent.id}/recover", json={"challenge": value, "signature": "***"}
    )
    problem(response, 422)
    response = redeem(anon, agent, value, csr=csr_for(ec.generate_private_key(ec.SECP256R1())))
    assert "certified key" in problem(response, 422)
    # None of it spent the challenge.
    assert redeem(anon, agent, value).status_code == 200
    refused = ops.get("/api/v1/audit", params={"action": "auth.refused"}).json()
    assert any(event["agentId"] in (None, agent.id) for event in refused)


def test_a_certificate_of_another_agent_presented_is_refused(
    grace_stack: Stack, ops: httpx.Client, tmp_path: Path
) -> None:
    agent = lapsed(grace_stack, ops, "lapsed-6")
    other = register_keyed(grace_stack, ops, "valid-7")
    with agent_client(
        grace_stack,
        agent_id=other.id,
        token=other.token,
        cert_pem=other.cert_pem,
        key_pem=other.key_pem,
        tmp=tmp_path,
    ) as http:
        response = http.post(f"/api/v1/agents/{agent.id}/recover/challenge")
        assert "another agent" in problem(response, 403)


def test_expired_longer_than_the_grace_is_locked_out(
    grace_stack: Stack, ops: httpx.Client, anon: httpx.Client
) -> None:
    agent = lapsed(grace_stack, ops, "lapsed-8", ago=dt.timedelta(seconds=GRACE + 60))
    response = anon.post(f"/api/v1/agents/{agent.id}/recover/challenge")
    assert "STELLA_CERT_GRACE" in problem(response, 403)


def test_a_deleted_agent_is_not_found(
    grace_stack: Stack, ops: httpx.Client, anon: httpx.Client
) -> None:
    agent = lapsed(grace_stack, ops, "lapsed-9")
    value = challenge(anon, agent.id)
    assert ops.delete(f"/api/v1/agents/{agent.id}").status_code == 200
    problem(redeem(anon, agent, value), 404)
    problem(anon.post(f"/api/v1/agents/{agent.id}/recover/challenge"), 404)


def test_off_by_default(stack: Stack, operator: httpx.Client) -> None:
    agent = lapsed(stack, operator, "lapsed-10")
    with httpx.Client(base_url=stack.base_url, verify=stack.ssl_context(), timeout=30) as anon:
        response = anon.post(f"/api/v1/agents/{agent.id}/recover/challenge")
        assert "STELLA_CERT_GRACE" in problem(response, 403)
        response = anon.post(
            f"/api/v1/agents/{agent.id}/recover", json={"challenge": "x", "signature": "eA"}
        )
        assert "STELLA_CERT_GRACE" in problem(response, 403)


def test_concurrent_redemptions_of_one_challenge_one_wins(
    grace_stack: Stack, ops: httpx.Client, anon: httpx.Client
) -> None:
    agent = lapsed(grace_stack, ops, "lapsed-11")
    value = challenge(anon, agent.id)
    body = {"challenge": value, "signature": agent.sign(value)}
    racers = 8
    barrier = threading.Barrier(racers)
    statuses: list[int] = []

    def race() -> None:
        with httpx.Client(
            base_url=grace_stack.base_url, verify=grace_stack.ssl_context(), timeout=60
        ) as client:
            barrier.wait()
            response = client.post(f"/api/v1/agents/{agent.id}/recover", json=body)
            statuses.append(response.status_code)

    threads = [threading.Thread(target=race) for _ in range(racers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(statuses) == [200] + [401] * (racers - 1)
    events = ops.get("/api/v1/audit", params={"action": "cert.recovered"}).json()
    assert len(events) == 1


def test_concurrent_challenges_leave_one_live(
    grace_stack: Stack, ops: httpx.Client, anon: httpx.Client
) -> None:
    agent = lapsed(grace_stack, ops, "lapsed-12")
    racers = 6
    barrier = threading.Barrier(racers)
    issued: list[str] = []

    def ask() -> None:
        with httpx.Client(
            base_url=grace_stack.base_url, verify=grace_stack.ssl_context(), timeout=60
        ) as client:
            barrier.wait()
            issued.append(challenge(client, agent.id))

    threads = [threading.Thread(target=ask) for _ in range(racers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(issued)) == racers
    # One per agent: only the last one stored can be redeemed.
    statuses = [redeem(anon, agent, value).status_code for value in issued]
    assert sorted(statuses) == [200] + [401] * (racers - 1)
