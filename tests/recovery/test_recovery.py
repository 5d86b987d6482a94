"""Lockout-proof renewal over the real TLS server, on both backends."""

from __future__ import annotations

import datetime as dt
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import func, select

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
    # Failed proofs count per address like bad registration tokens; these tests fail many on
    # purpose from one address (the limit has tests of its own below).
    yield from start_stack(
        tmp_path_factory.mktemp("grace"),
        database_url,
        worker=False,
        cert_grace=GRACE,
        registration_failure_limit=10_000,
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


def test_a_challenge_is_single_use_and_another_does_not_spoil_it(
    grace_stack: Stack, ops: httpx.Client, anon: httpx.Client
) -> None:
    agent = lapsed(grace_stack, ops, "lapsed-2")
    first = challenge(anon, agent.id)
    second = challenge(anon, agent.id)  # anyone may ask in the agent's name: no harm done
    assert redeem(anon, agent, first).status_code == 200
    assert "already used" in problem(redeem(anon, agent, first), 401)
    assert redeem(anon, agent, second).status_code == 200


def test_asking_for_a_challenge_writes_nothing(
    grace_stack: Stack, ops: httpx.Client, anon: httpx.Client
) -> None:
    agent = lapsed(grace_stack, ops, "lapsed-2b")
    for _ in range(5):
        challenge(anon, agent.id)
    assert spent_challenges(grace_stack) == 0
    value = challenge(anon, agent.id)
    assert redeem(anon, agent, value).status_code == 200
    assert spent_challenges(grace_stack) == 1


def test_an_expired_challenge_is_refused(
    grace_stack: Stack, ops: httpx.Client, anon: httpx.Client
) -> None:
    agent = lapsed(grace_stack, ops, "lapsed-3")
    codec = grace_stack.runtime.recovery_challenges
    value, _ = codec.issue(uuid.UUID(agent.id), utcnow() - dt.timedelta(seconds=61))
    assert "expired" in problem(redeem(anon, agent, value), 401)


def test_a_challenge_made_for_another_agent_or_altered_is_refused(
    grace_stack: Stack, ops: httpx.Client, anon: httpx.Client
) -> None:
    agent, other = lapsed(grace_stack, ops, "lapsed-3b"), lapsed(grace_stack, ops, "lapsed-3c")
    theirs = challenge(anon, other.id)
    assert "not made for this agent" in problem(redeem(anon, agent, theirs), 401)
    expires, nonce, mac = challenge(anon, agent.id).split(".")
    later = f"{int(expires) + 3600}.{nonce}.{mac}"  # a longer life, same MAC
    assert "not made for this agent" in problem(redeem(anon, agent, later), 401)
    for forged in ("x", "1.2", "..", f"{expires}.{nonce}."):
        assert problem(redeem(anon, agent, forged), 401)
    assert spent_challenges(grace_stack) == 0


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


def test_concurrent_challenges_are_each_good_once(
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
    assert [redeem(anon, agent, value).status_code for value in issued] == [200] * racers
    assert [redeem(anon, agent, value).status_code for value in issued] == [401] * racers


def spent_challenges(stack: Stack) -> int:
    with transaction(stack.runtime.engine) as session:
        count: int = session.execute(
            select(func.count()).select_from(RecoveryChallenge)
        ).scalar_one()
    return count


# --- guessing -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def strict_stack(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    yield from start_stack(
        tmp_path_factory.mktemp("strict"),
        database_url,
        worker=False,
        cert_grace=GRACE,
        registration_failure_limit=3,
        registration_failure_window=60,
    )


def test_failed_proofs_and_unknown_agents_are_rate_limited_per_address(
    strict_stack: Stack,
) -> None:
    stack = strict_stack
    truncate(stack.runtime)
    with operator_client(stack) as operators:
        agent = lapsed(stack, operators, "guessed-1")
    with httpx.Client(base_url=stack.base_url, verify=stack.ssl_context(), timeout=30) as client:
        assert problem(client.post(f"/api/v1/agents/{uuid.uuid4()}/recover/challenge"), 404)
        value = challenge(client, agent.id)
        bad = {"challenge": value, "signature": agent.sign("another challenge")}
        # The third failure is the last one answered as such; then the address is refused.
        for _ in range(2):
            assert problem(client.post(f"/api/v1/agents/{agent.id}/recover", json=bad), 401)
        for attempt in (
            client.post(f"/api/v1/agents/{agent.id}/recover/challenge"),
            redeem(client, agent, value),  # even a good proof
        ):
            assert problem(attempt, 429)
            assert int(attempt.headers["Retry-After"]) >= 1
