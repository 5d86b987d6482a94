"""POST /api/v1/agents/{id}/heartbeat: liveness, task hand-over, certificate renewal, auth."""

from __future__ import annotations

import datetime as dt
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from sqlalchemy import select
from sqlmodel import Session, col

from app.models import Task
from app.tasks.service import claim_pending, has_pending
from pki import issue_client_certificate
from tests.agents.helpers import (
    assert_problem,
    common_name,
    load_cert,
    parse_timestamp,
    race,
    set_agent,
    spki,
    task_ids,
    timestamp,
)
from tests.conftest import ADMIN_TOKEN, AgentClient, Stack, agent_client, dispatch

SECRET = "s3cret-registry-password-91c2"


def _dispatch_id(operator: httpx.Client, agent: AgentClient, **body: Any) -> str:
    response = dispatch(operator, {"agentId": agent.id}, **body)
    assert response.status_code == 201, response.text
    task_id: str = response.json()["tasks"][0]["taskId"]
    return task_id


def _client_with(
    stack: Stack, agent: AgentClient, *, cert: Path | None, token: str | None
) -> httpx.Client:
    """A client presenting `cert` (with the agent's key) and bearer `token`, either optional."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    context = stack.ssl_context(cert, agent.key_file) if cert else stack.ssl_context()
    return httpx.Client(base_url=stack.base_url, verify=context, headers=headers, timeout=30)


def _short_certificate(stack: Stack, agent: AgentClient, ttl: dt.timedelta) -> str:
    """A certificate for the agent's own key from our CA, expiring after `ttl`."""
    key = serialization.load_pem_private_key(agent.key_file.read_bytes(), password=None)
    cert = issue_client_certificate(
        stack.runtime.ca,
        agent_id=uuid.UUID(agent.id),
        public_key=key.public_key(),  # type: ignore[arg-type]
        ttl=ttl,
    )
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def _present(stack: Stack, agent: AgentClient, cert_pem: str, tmp: Path) -> httpx.Client:
    """The agent's client, presenting `cert_pem` with its JWT."""
    tmp.mkdir(exist_ok=True)
    return agent_client(
        stack,
        agent_id=agent.id,
        token=agent.token,
        cert_pem=cert_pem,
        key_pem=agent.key_file.read_text(),
        tmp=tmp,
    )


def _expiring_stored_certificate(stack: Stack, agent: AgentClient) -> str:
    """Make a 10-minute certificate the agent's newest one, as ~24 h after registration."""
    pem = _short_certificate(stack, agent, dt.timedelta(minutes=10))
    cert = load_cert(pem)
    set_agent(
        stack,
        agent.id,
        cert_pem=pem,
        cert_serial=format(cert.serial_number, "x"),
        cert_not_after=cert.not_valid_after_utc,
    )
    return pem


def _beat(client: httpx.Client, agent: AgentClient) -> httpx.Response:
    return client.post(f"/api/v1/agents/{agent.id}/heartbeat", json={"status": "healthy"})


class TestHeartbeatLiveness:
    def test_records_the_report(
        self, stack: Stack, register: Callable[..., AgentClient], operator: httpx.Client
    ) -> None:
        """status, resourceUsage, capabilities, runningTasks and lastHeartbeat are stored."""
        agent = register("a1", capabilities=["docker"])
        long_ago = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
        set_agent(stack, agent.id, last_heartbeat=long_ago)
        response = agent.heartbeat(
            resourceUsage={"cpu": 15.5, "memory": 45.2, "disk": 60.0},
            capabilities=["docker", "compose", "ssh"],
            runningTasks=2,
        )
        assert response.status_code == 200, response.text
        assert response.json() == {"tasks": []}
        detail = operator.get(f"/api/v1/agents/{agent.id}").json()
        assert detail["status"] == "online"
        assert detail["reportedStatus"] == "healthy"
        assert detail["resourceUsage"] == {"cpu": 15.5, "memory": 45.2, "disk": 60.0}
        assert detail["capabilities"] == ["docker", "compose", "ssh"]
        assert detail["runningTasks"] == 2
        age = dt.datetime.now(dt.UTC) - parse_timestamp(detail["lastHeartbeat"])
        assert dt.timedelta(0) <= age < dt.timedelta(seconds=30)

    def test_omitted_fields_keep_their_values(
        self, register: Callable[..., AgentClient], operator: httpx.Client
    ) -> None:
        agent = register("a1", capabilities=["docker"])
        agent.heartbeat(resourceUsage={"cpu": 1.0}, runningTasks=3)
        assert agent.heartbeat(futureField="ignored").status_code == 200
        detail = operator.get(f"/api/v1/agents/{agent.id}").json()
        assert detail["capabilities"] == ["docker"]
        assert detail["resourceUsage"] == {"cpu": 1.0}
        assert detail["runningTasks"] == 0

    def test_unhealthy_degrades_and_healthy_recovers(
        self, register: Callable[..., AgentClient], operator: httpx.Client
    ) -> None:
        agent = register("a1")
        path = f"/api/v1/agents/{agent.id}"
        assert agent.heartbeat(status="unhealthy").status_code == 200
        detail = operator.get(path).json()
        assert (detail["status"], detail["reportedStatus"]) == ("degraded", "unhealthy")
        assert agent.heartbeat(status="healthy").status_code == 200
        detail = operator.get(path).json()
        assert (detail["status"], detail["reportedStatus"]) == ("online", "healthy")

    def test_offline_agent_is_online_again(
        self, stack: Stack, register: Callable[..., AgentClient], operator: httpx.Client
    ) -> None:
        agent = register("a1")
        set_agent(stack, agent.id, status="offline")
        assert operator.get(f"/api/v1/agents/{agent.id}").json()["status"] == "offline"
        assert agent.heartbeat().status_code == 200
        assert operator.get(f"/api/v1/agents/{agent.id}").json()["status"] == "online"


class TestHeartbeatTasks:
    def test_delivers_pending_tasks_by_priority_then_age(
        self, register: Callable[..., AgentClient], operator: httpx.Client
    ) -> None:
        """Highest priority first, then oldest; all marked assigned; handed over once."""
        agent = register("a1")
        old_low = _dispatch_id(operator, agent)
        high = _dispatch_id(operator, agent, priority=10)
        new_low = _dispatch_id(operator, agent)
        middle = _dispatch_id(operator, agent, priority=5)
        response = agent.heartbeat()
        assert task_ids(response) == [high, middle, old_low, new_low]
        first = response.json()["tasks"][0]
        assert first["taskType"] == "docker.pull"
        assert first["payload"] == {"image": "myapp"}
        assert first["timeout"] == 300
        for task_id in (high, middle, old_low, new_low):
            view = operator.get(f"/api/v1/tasks/{task_id}").json()
            assert view["status"] == "assigned"
            assert view["assignedAt"] is not None
        assert task_ids(agent.heartbeat()) == []

    def test_only_the_agents_own_tasks(
        self, register: Callable[..., AgentClient], operator: httpx.Client
    ) -> None:
        agent, other = register("a1"), register("a2")
        mine = _dispatch_id(operator, agent)
        theirs = _dispatch_id(operator, other)
        assert task_ids(agent.heartbeat()) == [mine]
        assert task_ids(other.heartbeat()) == [theirs]

    def test_new_tasks_arrive_on_a_later_heartbeat(
        self, register: Callable[..., AgentClient], operator: httpx.Client
    ) -> None:
        agent = register("a1")
        first = _dispatch_id(operator, agent)
        assert task_ids(agent.heartbeat()) == [first]
        second = _dispatch_id(operator, agent)
        assert task_ids(agent.heartbeat()) == [second]

    def test_credentials_go_to_the_agent_only(
        self, stack: Stack, register: Callable[..., AgentClient], operator: httpx.Client
    ) -> None:
        """The agent gets them in clear; operators' views and the database never show them."""
        agent = register("a1")
        credentials = {"registry.username": "user", "registry.password": SECRET}
        created = dispatch(operator, {"agentId": agent.id}, credentials=credentials, timeout=120)
        assert SECRET not in created.text
        task_id = created.json()["tasks"][0]["taskId"]

        (delivered,) = agent.heartbeat().json()["tasks"]
        assert delivered["taskId"] == task_id
        assert delivered["credentials"] == credentials
        assert delivered["timeout"] == 120

        view = operator.get(f"/api/v1/tasks/{task_id}")
        listing = operator.get("/api/v1/tasks", params={"agentId": agent.id})
        for response in (view, listing):
            assert response.status_code == 200, response.text
            assert SECRET not in response.text
            assert "credentials" not in response.text
        with stack.runtime.engine.connect() as connection:
            stored = connection.execute(select(col(Task.credentials_encrypted))).scalar_one()
        assert stored is not None
        assert SECRET.encode() not in stored


class TestHeartbeatRace:
    def test_concurrent_heartbeats_and_polls_deliver_each_task_once(
        self, stack: Stack, register: Callable[..., AgentClient], operator: httpx.Client
    ) -> None:
        """20 heartbeats and 20 polls at once: heartbeat answers never share a task."""
        agent = register("a1")
        created = {_dispatch_id(operator, agent) for _ in range(60)}
        barrier = threading.Barrier(40)

        def call(index: int) -> tuple[str, httpx.Response]:
            with _client_with(stack, agent, cert=agent.cert_file, token=agent.token) as client:
                barrier.wait(timeout=30)
                if index % 2:
                    return "poll", client.get(f"/api/v1/agents/{agent.id}/tasks")
                return "heartbeat", _beat(client, agent)

        with ThreadPoolExecutor(max_workers=40) as pool:
            results = list(pool.map(call, range(40)))

        delivered: list[str] = []
        for kind, response in results:
            ids = task_ids(response)
            if kind == "heartbeat":
                delivered += ids
            else:
                assert {task["status"] for task in response.json()["tasks"]} <= {"assigned"}
        assert len(delivered) == len(set(delivered))
        assert set(delivered) <= created
        pending = operator.get("/api/v1/tasks", params={"agentId": agent.id, "status": "pending"})
        assert pending.json() == []


class TestClaimRace:
    def test_claim_pending_never_hands_a_task_out_twice(self, stack: Stack) -> None:
        """8 threads claiming one task at a time over 200: 200 distinct claims."""
        agent_id = uuid.uuid4()
        with Session(stack.runtime.engine) as session:
            session.add_all(
                Task(agent_id=agent_id, task_type="t", payload={"n": n}) for n in range(200)
            )
            session.commit()
        barrier = threading.Barrier(8)

        def worker() -> list[uuid.UUID]:
            claimed: list[uuid.UUID] = []
            barrier.wait(timeout=30)
            while True:
                with Session(stack.runtime.engine) as session:
                    tasks = claim_pending(session=session, agent_id=agent_id, limit=1)
                    claimed += [task.id for task in tasks]
                    session.commit()
                if not tasks:
                    # An empty claim may only mean another thread won this row.
                    with Session(stack.runtime.engine) as session:
                        if not has_pending(session=session, agent_id=agent_id):
                            return claimed

        with ThreadPoolExecutor(max_workers=8) as pool:
            futures = [pool.submit(worker) for _ in range(8)]
            claims = [task_id for future in futures for task_id in future.result()]
        assert len(claims) == 200
        assert len(set(claims)) == 200
        with Session(stack.runtime.engine) as session:
            statuses = session.scalars(select(col(Task.status))).all()
        assert set(statuses) == {"assigned"}


class TestCertificateRenewal:
    def test_no_renewal_for_a_fresh_certificate(self, register: Callable[..., AgentClient]) -> None:
        response = register("a1").heartbeat()
        assert response.status_code == 200
        assert "certificateRenewal" not in response.json()

    def test_no_renewal_outside_the_window(
        self, stack: Stack, register: Callable[..., AgentClient], tmp_path: Path
    ) -> None:
        """A certificate with 2 h left is not renewed (the window is 1 h)."""
        agent = register("a1")
        cert = _short_certificate(stack, agent, dt.timedelta(hours=2))
        with _present(stack, agent, cert, tmp_path / "two-hours") as client:
            response = _beat(client, agent)
        assert response.status_code == 200, response.text
        assert "certificateRenewal" not in response.json()

    def test_expiring_certificate_is_renewed_for_the_same_key(
        self, stack: Stack, register: Callable[..., AgentClient], tmp_path: Path
    ) -> None:
        """{cert, expiresAt} (no key), same key, ~24 h; the JWT works with it; a repeat
        (the answer was lost) gets the same certificate back."""
        agent = register("a1")
        short = _short_certificate(stack, agent, dt.timedelta(minutes=10))
        with _present(stack, agent, short, tmp_path / "short") as client:
            first = _beat(client, agent)
            again = _beat(client, agent)
        assert first.status_code == 200, first.text
        renewal = first.json()["certificateRenewal"]
        assert set(renewal) == {"cert", "expiresAt"}
        renewed = load_cert(renewal["cert"])
        assert spki(renewed.public_key()) == spki(load_cert(short).public_key())
        assert common_name(renewed) == agent.id
        renewed.verify_directly_issued_by(stack.runtime.ca.cert)
        assert renewal["expiresAt"] == timestamp(renewed.not_valid_after_utc)
        lifetime = renewed.not_valid_after_utc - dt.datetime.now(dt.UTC)
        assert lifetime.total_seconds() == pytest.approx(86400, abs=120)
        assert load_cert(again.json()["certificateRenewal"]["cert"]).serial_number == (
            renewed.serial_number
        )

        with _present(stack, agent, renewal["cert"], tmp_path / "renewed") as client:
            response = _beat(client, agent)
        assert response.status_code == 200, response.text
        assert "certificateRenewal" not in response.json()

    def test_renewal_is_signed_when_the_stored_certificate_expires_too(
        self,
        stack: Stack,
        register: Callable[..., AgentClient],
        operator: httpx.Client,
        tmp_path: Path,
    ) -> None:
        """An agent whose newest certificate is near expiry gets a newly signed one, once."""
        agent = register("a1")
        short_pem = _expiring_stored_certificate(stack, agent)
        short = load_cert(short_pem)
        with _present(stack, agent, short_pem, tmp_path / "short") as client:
            first = _beat(client, agent)
            again = _beat(client, agent)
        renewed = load_cert(first.json()["certificateRenewal"]["cert"])
        registered = load_cert(agent.registration["certificate"]["cert"])
        assert renewed.serial_number not in {short.serial_number, registered.serial_number}
        assert spki(renewed.public_key()) == spki(short.public_key())
        lifetime = renewed.not_valid_after_utc - dt.datetime.now(dt.UTC)
        assert lifetime.total_seconds() == pytest.approx(86400, abs=120)
        assert load_cert(again.json()["certificateRenewal"]["cert"]).serial_number == (
            renewed.serial_number
        )
        detail = operator.get(f"/api/v1/agents/{agent.id}").json()
        assert detail["certificate"]["serial"] == format(renewed.serial_number, "x")

    def test_concurrent_renewals_sign_one_certificate(
        self, stack: Stack, register: Callable[..., AgentClient], tmp_path: Path
    ) -> None:
        """10 simultaneous heartbeats with an expiring certificate (an agent retrying
        while its first request is in flight) all get the same renewed certificate."""
        agent = register("a1")
        short_pem = _expiring_stored_certificate(stack, agent)
        _present(stack, agent, short_pem, tmp_path / "short").close()
        cert_file = tmp_path / "short" / f"{agent.id}.pem"

        def call(_index: int) -> int:
            with _client_with(stack, agent, cert=cert_file, token=agent.token) as client:
                response = _beat(client, agent)
            assert response.status_code == 200, response.text
            return load_cert(response.json()["certificateRenewal"]["cert"]).serial_number

        serials = set(race(10, call))
        assert len(serials) == 1
        assert serials != {load_cert(short_pem).serial_number}


class TestHeartbeatAuth:
    def test_without_client_certificate(
        self, stack: Stack, register: Callable[..., AgentClient]
    ) -> None:
        agent = register("a1")
        with _client_with(stack, agent, cert=None, token=agent.token) as client:
            assert_problem(_beat(client, agent), 401)

    def test_without_jwt(self, stack: Stack, register: Callable[..., AgentClient]) -> None:
        agent = register("a1")
        with _client_with(stack, agent, cert=agent.cert_file, token=None) as client:
            assert_problem(_beat(client, agent), 401)

    def test_jwt_of_one_agent_with_certificate_of_another(
        self, stack: Stack, register: Callable[..., AgentClient]
    ) -> None:
        agent, other = register("a1"), register("a2")
        context = stack.ssl_context(other.cert_file, other.key_file)
        headers = {"Authorization": f"Bearer {agent.token}"}
        with httpx.Client(base_url=stack.base_url, verify=context, headers=headers) as client:
            assert_problem(_beat(client, agent), 401)
            assert_problem(_beat(client, other), 401)

    def test_agent_posting_to_another_agents_path(
        self, register: Callable[..., AgentClient], operator: httpx.Client
    ) -> None:
        """403, and the other agent's record is untouched."""
        agent, other = register("a1"), register("a2")
        response = agent.http.post(
            f"/api/v1/agents/{other.id}/heartbeat", json={"status": "unhealthy"}
        )
        assert_problem(response, 403)
        assert operator.get(f"/api/v1/agents/{other.id}").json()["status"] == "online"

    @pytest.mark.parametrize("kind", ["garbage", "admin", "forged"])
    def test_bad_bearer_with_a_good_certificate(
        self, stack: Stack, register: Callable[..., AgentClient], kind: str
    ) -> None:
        """Garbage, the operator's token, or a JWT the agent signed itself: all 401."""
        agent = register("a1")
        if kind == "garbage":
            token = "not.a.jwt"
        elif kind == "admin":
            token = ADMIN_TOKEN
        else:
            claims = jwt.decode(agent.token, options={"verify_signature": False})
            header = jwt.get_unverified_header(agent.token)
            key = serialization.load_pem_private_key(agent.key_file.read_bytes(), password=None)
            token = jwt.encode(claims, key, algorithm="ES256", headers={"kid": header["kid"]})  # type: ignore[arg-type]
        with _client_with(stack, agent, cert=agent.cert_file, token=token) as client:
            assert_problem(_beat(client, agent), 401)

    def test_admin_token_without_certificate(
        self, stack: Stack, register: Callable[..., AgentClient]
    ) -> None:
        agent = register("a1")
        with _client_with(stack, agent, cert=None, token=ADMIN_TOKEN) as client:
            assert_problem(_beat(client, agent), 401)

    @pytest.mark.parametrize(
        "body",
        [
            pytest.param({"status": "healthy", "resourceUsage": {"cpu": -1}}, id="cpu-negative"),
            pytest.param({"status": "healthy", "runningTasks": -1}, id="running-negative"),
            pytest.param({"status": "healthy", "runningTasks": "two"}, id="running-str"),
            pytest.param({"resourceUsage": {"cpu": 1}}, id="status-missing"),
            pytest.param({"status": "x" * 100}, id="status-100-chars"),
            pytest.param({"status": ""}, id="status-empty"),
            pytest.param({"status": "healthy", "capabilities": "docker"}, id="capabilities-str"),
            pytest.param(["healthy"], id="body-list"),
        ],
    )
    def test_bad_body_is_422(self, register: Callable[..., AgentClient], body: Any) -> None:
        agent = register("a1")
        response = agent.http.post(f"/api/v1/agents/{agent.id}/heartbeat", json=body)
        assert_problem(response, 422)

    @pytest.mark.parametrize(
        "content",
        [b'{"status": "healthy", "resourceUsage": {"cpu": NaN}}', b'{"status": '],
        ids=["nan", "truncated"],
    )
    def test_unparseable_body_is_422(
        self, register: Callable[..., AgentClient], content: bytes
    ) -> None:
        agent = register("a1")
        response = agent.http.post(
            f"/api/v1/agents/{agent.id}/heartbeat",
            content=content,
            headers={"Content-Type": "application/json"},
        )
        assert_problem(response, 422)
