"""GET /api/v1/audit, and the events the API's own calls leave in it. Both backends.

Every action is read back through the operator API, as an operator would,
with who did it and when; refused authentications are read after the
listing has flushed the web process's coalesced counts.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from app.audit import service as audit_service
from app.db import transaction
from app.tokens.service import hash_token
from pki import issue_client_certificate
from tests.agents.helpers import (
    NEXT_LINK,
    assert_problem,
    load_cert,
    parse_timestamp,
    post_register,
    registration_body,
    set_agent,
)
from tests.conftest import AgentClient, Stack, agent_client, dispatch, mint_token, truncate

PATH = "/api/v1/audit"
Register = Callable[..., AgentClient]
CREDENTIAL = "audit-canary-password-5d1f"


@pytest.fixture
def clean(stack: Stack, operator: httpx.Client) -> Stack:
    """An empty trail: refusals still counted from earlier tests are flushed, then dropped."""
    operator.get(PATH)
    truncate(stack.runtime)
    return stack


def events(operator: httpx.Client, **params: Any) -> list[dict[str, Any]]:
    response = operator.get(PATH, params=params)
    assert response.status_code == 200, response.text
    body: list[dict[str, Any]] = response.json()
    return body


def recent(value: str) -> bool:
    return abs((parse_timestamp(value) - dt.datetime.now(dt.UTC)).total_seconds()) < 60


def only(found: list[dict[str, Any]], action: str) -> dict[str, Any]:
    matching = [event for event in found if event["action"] == action]
    assert len(matching) == 1, found
    return matching[0]


class TestRecordedActions:
    def test_token_and_registration(
        self, clean: Stack, operator: httpx.Client, register: Register
    ) -> None:
        """token.created by the operator; agent.registered and cert.issued by the new agent."""
        agent = register("recorded", labels={"site": "lab"})
        token = only(events(operator, action="token.created"), "token.created")
        assert token["actor"] == "operator"
        assert token["source"] == "127.0.0.1"
        assert token["agentId"] is None
        assert set(token["detail"]) == {"tokenId", "expiresAt"}
        assert recent(token["at"])

        trail = events(operator, agentId=agent.id)
        assert sorted(event["action"] for event in trail) == ["agent.registered", "cert.issued"]
        registered = only(trail, "agent.registered")
        assert registered["actor"] == f"agent:{agent.id}"
        assert registered["source"] == "127.0.0.1"
        assert registered["count"] == 1
        assert registered["detail"]["name"] == "recorded"
        assert registered["detail"]["labels"] == {"site": "lab"}
        assert recent(registered["at"])
        issued = only(trail, "cert.issued")
        cert = load_cert(agent.registration["certificate"]["cert"])
        assert issued["detail"]["serial"] == format(cert.serial_number, "x")
        assert issued["detail"]["notAfter"] == agent.registration["certificate"]["expiresAt"]
        assert issued["detail"]["keyFrom"] == "server"

    def test_update_and_delete_outlive_the_agent(
        self, clean: Stack, operator: httpx.Client, register: Register
    ) -> None:
        agent = register("doomed")
        changed = operator.put(f"/api/v1/agents/{agent.id}", json={"labels": {"tier": "gold"}})
        assert changed.status_code == 200, changed.text
        assert operator.delete(f"/api/v1/agents/{agent.id}").status_code == 200

        trail = events(operator, agentId=agent.id)
        assert [event["action"] for event in trail[:2]] == ["agent.deleted", "agent.updated"]
        deleted, updated = trail[0], trail[1]
        assert updated["actor"] == deleted["actor"] == "operator"
        assert updated["detail"] == {"name": "doomed", "changes": {"labels": {"tier": "gold"}}}
        assert deleted["detail"] == {"name": "doomed", "cancelledTasks": 0}
        assert parse_timestamp(deleted["at"]) >= parse_timestamp(updated["at"])

    def test_a_refused_update_records_nothing(
        self, clean: Stack, operator: httpx.Client, register: Register
    ) -> None:
        """A 409 rolls the change back, and its event with it."""
        first, second = register("first"), register("second")
        taken = operator.put(f"/api/v1/agents/{second.id}", json={"name": first.name})
        assert_problem(taken, 409)
        assert events(operator, action="agent.updated") == []

    def test_renewal_on_a_heartbeat(
        self, clean: Stack, operator: httpx.Client, register: Register, tmp_path: Path
    ) -> None:
        """A certificate signed for an expiring one: cert.renewed by the agent, both serials."""
        agent = register("renewing")
        key = serialization.load_pem_private_key(agent.key_file.read_bytes(), password=None)
        short = issue_client_certificate(
            clean.runtime.ca,
            agent_id=uuid.UUID(agent.id),
            public_key=key.public_key(),  # type: ignore[arg-type]
            ttl=dt.timedelta(minutes=10),
        )
        short_pem = short.public_bytes(serialization.Encoding.PEM).decode()
        serial = format(short.serial_number, "x")
        set_agent(
            clean,
            agent.id,
            cert_pem=short_pem,
            cert_serial=serial,
            cert_not_after=short.not_valid_after_utc,
        )
        (tmp_path / "short").mkdir()
        with agent_client(
            clean,
            agent_id=agent.id,
            token=agent.token,
            cert_pem=short_pem,
            key_pem=agent.key_file.read_text(),
            tmp=tmp_path / "short",
        ) as client:
            answer = client.post(f"/api/v1/agents/{agent.id}/heartbeat", json={"status": "healthy"})
        assert answer.status_code == 200, answer.text
        renewed = load_cert(answer.json()["certificateRenewal"]["cert"])

        event = only(events(operator, agentId=agent.id), "cert.renewed")
        assert event["actor"] == f"agent:{agent.id}"
        assert event["detail"] == {
            "serial": format(renewed.serial_number, "x"),
            "notAfter": answer.json()["certificateRenewal"]["expiresAt"],
            "previousSerial": serial,
        }


class TestRefusals:
    def test_refused_jwts_are_coalesced(
        self, clean: Stack, operator: httpx.Client, register: Register
    ) -> None:
        """Three bad JWTs from one address on one agent's path: counted, not one row each.

        (Exactly one event unless the recorder's own loop flushed in between;
        tests/audit/test_refusals.py pins the coalescing down.)
        """
        agent = register("target")
        for _ in range(3):
            response = agent.http.post(
                f"/api/v1/agents/{agent.id}/heartbeat",
                json={"status": "healthy"},
                headers={"Authorization": "Bearer not-a-jwt"},
            )
            assert_problem(response, 401)
        refused = [e for e in events(operator, agentId=agent.id) if e["action"] == "auth.refused"]
        assert sum(event["count"] for event in refused) == 3
        assert len(refused) < 3
        event = refused[-1]
        assert event["actor"] == "anonymous"
        assert event["source"] == "127.0.0.1"
        assert event["detail"]["reason"] == "agent token is invalid"
        assert event["detail"]["status"] == 401
        assert event["detail"]["route"] == "POST /api/v1/agents/{id}/heartbeat"
        assert recent(event["at"])
        assert parse_timestamp(event["detail"]["lastAt"]) >= parse_timestamp(event["at"])

    def test_deleted_agent_and_another_agents_records(
        self, clean: Stack, operator: httpx.Client, register: Register
    ) -> None:
        agent, other = register("self"), register("other")
        assert_problem(agent.http.get(f"/api/v1/agents/{other.id}/tasks"), 403)
        assert operator.delete(f"/api/v1/agents/{agent.id}").status_code == 200
        assert_problem(agent.heartbeat(), 401)

        forbidden = only(events(operator, agentId=other.id), "auth.refused")
        assert forbidden["detail"]["status"] == 403
        assert forbidden["detail"]["route"] == "GET /api/v1/agents/{id}/tasks"
        gone = only(events(operator, agentId=agent.id), "auth.refused")
        assert gone["detail"] == {
            "reason": "agent is not registered",
            "status": 401,
            "route": "POST /api/v1/agents/{id}/heartbeat",
            "lastAt": gone["detail"]["lastAt"],
        }

    def test_a_failed_registration_records_only_its_refusal(
        self, clean: Stack, operator: httpx.Client
    ) -> None:
        """A bad token: one auth.refused, no agent, no certificate; a taken name: nothing."""
        assert_problem(post_register(clean, "srt_guessed", registration_body("nope")), 401)
        trail = events(operator)
        assert [event["action"] for event in trail] == ["auth.refused"]
        assert trail[0]["detail"]["route"] == "POST /api/v1/agents/register"
        assert trail[0]["detail"]["reason"] == "registration token is invalid, used or expired"
        assert trail[0]["agentId"] is None

        token = mint_token(operator)
        assert post_register(clean, token, registration_body("taken")).status_code == 201
        again = mint_token(operator)
        assert_problem(post_register(clean, again, registration_body("taken")), 409)
        bad_csr = registration_body("csr-agent", csr="not a csr")
        assert_problem(post_register(clean, again, bad_csr), 422)
        actions = [event["action"] for event in events(operator)]
        assert actions.count("agent.registered") == 1
        assert actions.count("cert.issued") == 1
        assert actions.count("auth.refused") == 1

    def test_refused_task_stream(self, clean: Stack, operator: httpx.Client) -> None:
        agent_id = str(uuid.uuid4())
        url = (
            clean.base_url.replace("https://", "wss://") + f"/api/v1/agents/{agent_id}/task-stream"
        )

        async def scenario() -> int:
            async with connect(
                url,
                ssl=clean.ssl_context(),
                additional_headers={"Authorization": "Bearer forged"},
                open_timeout=10,
            ) as websocket:
                with pytest.raises(ConnectionClosed) as closed:
                    await asyncio.wait_for(websocket.recv(), 5)
                assert closed.value.rcvd is not None
                return closed.value.rcvd.code

        assert asyncio.run(scenario()) == 4401
        event = only(events(operator, agentId=agent_id), "auth.refused")
        assert event["detail"]["route"] == "WS /api/v1/agents/{id}/task-stream"
        assert event["detail"]["reason"] == "agent token is invalid"


class TestNoSecrets:
    def test_no_secret_in_any_answer(
        self, clean: Stack, operator: httpx.Client, register: Register
    ) -> None:
        """Tokens, JWTs, private keys and task credentials appear nowhere in the trail."""
        token = mint_token(operator)
        response = post_register(clean, token, registration_body("secretive"))
        assert response.status_code == 201, response.text
        registration = response.json()
        agent = register("bystander")
        created = dispatch(
            operator,
            {"agentId": agent.id},
            credentials={"registry.password": CREDENTIAL},
        )
        assert created.status_code == 201, created.text
        assert (
            operator.put(f"/api/v1/agents/{agent.id}", json={"name": "renamed"}).status_code == 200
        )
        assert_problem(post_register(clean, token, registration_body("replayed")), 401)
        forged = agent.http.post(
            f"/api/v1/agents/{agent.id}/heartbeat",
            json={"status": "healthy"},
            headers={"Authorization": f"Bearer {registration['token']}"},
        )
        assert_problem(forged, 401)
        assert operator.delete(f"/api/v1/agents/{agent.id}").status_code == 200

        text = operator.get(PATH, params={"limit": 1000}).text
        assert len(events(operator, limit=1000)) >= 8
        key_pem = registration["certificate"]["key"]
        key_body = "".join(line for line in key_pem.splitlines() if "-----" not in line)
        secrets = [
            token,
            token.removeprefix("srt_"),
            hash_token(token),
            registration["token"],
            agent.token,
            key_body,
            key_body[-44:],
            CREDENTIAL,
            base64.b64encode(CREDENTIAL.encode()).decode(),
        ]
        for secret in secrets:
            assert secret not in text
        assert "PRIVATE KEY" not in text


class TestAccess:
    def test_anonymous_is_refused(self, clean: Stack) -> None:
        with httpx.Client(base_url=clean.base_url, verify=clean.ssl_context()) as client:
            assert_problem(client.get(PATH), 401)

    def test_an_agent_is_refused(
        self, clean: Stack, operator: httpx.Client, register: Register
    ) -> None:
        """An agent's JWT and certificate do not open the trail; the attempt is in it."""
        agent = register("curious")
        assert_problem(agent.http.get(PATH), 401)
        refused = [
            event
            for event in events(operator, action="auth.refused")
            if event["detail"]["route"] == f"GET {PATH}"
        ]
        assert [event["detail"]["reason"] for event in refused] == ["operator token required"]


def _seed(stack: Stack, count: int, *, start: dt.datetime, agent_id: uuid.UUID) -> None:
    """`count` events a minute apart from `start`, every third on `agent_id`, as cert.issued."""
    with transaction(stack.runtime.engine) as session:
        for index in range(count):
            audit_service.record(
                session=session,
                action="cert.issued" if index % 3 == 0 else "token.created",
                actor="system",
                agent_id=agent_id if index % 3 == 0 else None,
                detail={"index": index},
                at=start + dt.timedelta(minutes=index),
            )


class TestListing:
    def test_pages_newest_first_without_gaps_or_repeats(
        self, clean: Stack, operator: httpx.Client
    ) -> None:
        start = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
        _seed(clean, 7, start=start, agent_id=uuid.uuid4())
        # Two events at the very same instant: the id breaks the tie.
        _seed(clean, 1, start=start + dt.timedelta(minutes=3), agent_id=uuid.uuid4())
        seen: list[dict[str, Any]] = []
        url: str | None = f"{PATH}?limit=3"
        while url is not None:
            response = operator.get(url)
            assert response.status_code == 200, response.text
            seen.extend(response.json())
            link = NEXT_LINK.search(response.headers.get("link", ""))
            url = link[1] if link else None
        assert len(seen) == 8
        assert len({event["id"] for event in seen}) == 8
        keys = [(parse_timestamp(event["at"]), event["id"]) for event in seen]
        assert keys == sorted(keys, reverse=True)

    def test_filters(self, clean: Stack, operator: httpx.Client) -> None:
        agent_id = uuid.uuid4()
        start = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
        _seed(clean, 9, start=start, agent_id=agent_id)
        issued = events(operator, action="cert.issued")
        assert [event["detail"]["index"] for event in issued] == [6, 3, 0]
        assert {event["agentId"] for event in events(operator, agentId=str(agent_id))} == {
            str(agent_id)
        }
        since = events(operator, since="2026-01-01T00:05:00Z")
        assert [event["detail"]["index"] for event in since] == [8, 7, 6, 5]
        both = events(operator, action="token.created", since="2026-01-01T00:05:00Z")
        assert [event["detail"]["index"] for event in both] == [8, 7, 5]
        assert events(operator, agentId=str(uuid.uuid4())) == []

    @pytest.mark.parametrize(
        "params",
        [
            {"action": "agent.exploded"},
            {"agentId": "not-a-uuid"},
            {"since": "yesterday"},
            {"limit": "0"},
            {"limit": "1001"},
            {"cursor": "bm90LWEtY3Vyc29y"},
            {"cursor": "%%%"},
        ],
    )
    def test_bad_parameters_are_422(
        self, clean: Stack, operator: httpx.Client, params: dict[str, str]
    ) -> None:
        assert_problem(operator.get(PATH, params=params), 422)
