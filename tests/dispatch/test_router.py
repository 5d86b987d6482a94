"""Selector dispatches over the API: POST /api/v1/tasks (202) and GET /api/v1/dispatches/{id}."""

from __future__ import annotations

import time
import uuid
from typing import Any

import httpx
import pytest

from tests.api.problems import assert_problem
from tests.conftest import AgentClient, Stack, dispatch
from tests.tasks.helpers import CREDENTIALS, SECRET, Register, set_agent_status, view


def accepted(operator: httpx.Client, target: dict[str, Any], **body: Any) -> str:
    response = dispatch(operator, target, **body)
    assert response.status_code == 202, response.text
    dispatch_id: str = response.json()["dispatchId"]
    return dispatch_id


def wait_done(operator: httpx.Client, dispatch_id: str, timeout: float = 5.0) -> dict[str, Any]:
    """The dispatch once its expansion is done (polls up to `timeout` seconds)."""
    deadline = time.monotonic() + timeout
    while True:
        response = operator.get(f"/api/v1/dispatches/{dispatch_id}")
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        assert body["status"] in ("pending", "expanding", "done"), body
        if body["status"] == "done":
            return body
        assert time.monotonic() < deadline, f"dispatch not done after {timeout}s: {body}"
        time.sleep(0.05)


def agents_of(body: dict[str, Any]) -> list[str]:
    return sorted(task["agentId"] for task in body["tasks"])


class TestSelectorDispatch:
    """POST /api/v1/tasks with a selector target: accepted, then fanned out."""

    @pytest.fixture
    def fleet(self, stack: Stack, register: Register) -> dict[str, AgentClient]:
        """Agents in every state a selector must tell apart."""
        agents = {
            "online": register(capabilities=["docker"], labels={"env": "prod", "dc": "eu"}),
            "online-2": register(capabilities=["docker", "ssh"], labels={"env": "prod"}),
            "dev": register(capabilities=["docker"], labels={"env": "dev"}),
            "ssh-only": register(capabilities=["ssh"], labels={"env": "prod"}),
            "offline": register(capabilities=["docker"], labels={"env": "prod"}),
            "degraded": register(capabilities=["docker"], labels={"env": "prod"}),
        }
        set_agent_status(stack, agents["offline"], "offline")
        assert agents["degraded"].heartbeat(status="unhealthy").status_code == 200
        return agents

    def test_answers_202_with_the_dispatch_id(
        self, operator: httpx.Client, fleet: dict[str, AgentClient]
    ) -> None:
        response = dispatch(operator, {"capability": "docker"})
        assert response.status_code == 202, response.text
        body = response.json()
        assert set(body) == {"dispatchId", "status"}
        assert body["status"] == "pending"
        uuid.UUID(body["dispatchId"])

    def test_one_task_per_matching_online_agent_by_capability(
        self, operator: httpx.Client, fleet: dict[str, AgentClient]
    ) -> None:
        dispatch_id = accepted(operator, {"capability": "docker"}, priority=4, timeout=60)
        done = wait_done(operator, dispatch_id)
        wanted = ["online", "online-2", "dev"]
        assert agents_of(done) == sorted(fleet[name].id for name in wanted)
        for task in done["tasks"]:
            assert set(task) == {"taskId", "agentId", "status"}
            stored = view(operator, task["taskId"])
            assert stored["dispatchId"] == dispatch_id
            assert (stored["priority"], stored["timeout"]) == (4, 60)

    def test_by_labels(self, operator: httpx.Client, fleet: dict[str, AgentClient]) -> None:
        done = wait_done(operator, accepted(operator, {"labels": {"env": "prod"}}))
        assert agents_of(done) == sorted(fleet[n].id for n in ("online", "online-2", "ssh-only"))
        done = wait_done(operator, accepted(operator, {"labels": {"env": "prod", "dc": "eu"}}))
        assert agents_of(done) == [fleet["online"].id]

    def test_by_capability_and_labels(
        self, operator: httpx.Client, fleet: dict[str, AgentClient]
    ) -> None:
        target = {"capability": "ssh", "labels": {"env": "prod"}}
        done = wait_done(operator, accepted(operator, target))
        assert agents_of(done) == sorted(fleet[n].id for n in ("online-2", "ssh-only"))
        assert done["target"] == target

    def test_each_agent_gets_its_task_with_the_credentials_on_its_next_heartbeat(
        self, operator: httpx.Client, fleet: dict[str, AgentClient]
    ) -> None:
        payload = {"image": "myapp", "tag": "v2.3.1"}
        dispatch_id = accepted(
            operator, {"capability": "docker"}, payload=payload, credentials=CREDENTIALS
        )
        done = wait_done(operator, dispatch_id)
        task_of = {task["agentId"]: task["taskId"] for task in done["tasks"]}
        for name in ("online", "online-2", "dev"):
            answer = fleet[name].heartbeat()
            assert answer.status_code == 200, answer.text
            (task,) = answer.json()["tasks"]
            assert task["taskId"] == task_of[fleet[name].id]
            assert task["taskType"] == "docker.pull"
            assert task["payload"] == payload
            assert task["credentials"] == CREDENTIALS
        for name in ("ssh-only", "degraded"):
            assert fleet[name].heartbeat(status="unhealthy").json()["tasks"] == []
        # Operators never see the credentials, on the dispatch or on its tasks.
        dispatch_view = operator.get(f"/api/v1/dispatches/{dispatch_id}")
        assert SECRET not in dispatch_view.text
        assert all(task["status"] == "assigned" for task in dispatch_view.json()["tasks"])

    def test_no_online_agent_matches_is_503(
        self, operator: httpx.Client, fleet: dict[str, AgentClient]
    ) -> None:
        for target in (
            {"capability": "nomad"},
            {"labels": {"env": "staging"}},
            {"capability": "ssh", "labels": {"env": "dev"}},
        ):
            response = dispatch(operator, target)
            assert_problem(response, 503)
            assert int(response.headers["Retry-After"]) > 0

    def test_only_offline_or_degraded_matches_is_503(
        self, stack: Stack, operator: httpx.Client, register: Register
    ) -> None:
        offline = register(capabilities=["winrm"])
        set_agent_status(stack, offline, "offline")
        degraded = register(capabilities=["winrm"])
        assert degraded.heartbeat(status="unhealthy").status_code == 200
        assert_problem(dispatch(operator, {"capability": "winrm"}), 503)
        assert operator.get("/api/v1/tasks").json() == []

    def test_needs_the_admin_token(self, stack: Stack, fleet: dict[str, AgentClient]) -> None:
        response = dispatch(fleet["online"].http, {"capability": "docker"})
        assert_problem(response, 401)


class TestGetDispatch:
    """GET /api/v1/dispatches/{dispatchId}."""

    def test_shows_the_contract_fields(self, operator: httpx.Client, register: Register) -> None:
        agent = register(capabilities=["compose"])
        dispatch_id = accepted(operator, {"capability": "compose"})
        done = wait_done(operator, dispatch_id)
        assert set(done) == {"dispatchId", "status", "target", "createdAt", "tasks"}
        assert done["dispatchId"] == dispatch_id
        assert done["target"] == {"capability": "compose"}
        assert done["createdAt"].endswith("Z")
        (task,) = done["tasks"]
        assert (task["agentId"], task["status"]) == (agent.id, "pending")

    def test_unknown_dispatch_is_404(self, operator: httpx.Client) -> None:
        assert_problem(operator.get(f"/api/v1/dispatches/{uuid.uuid4()}"), 404)

    def test_not_a_uuid_is_422(self, operator: httpx.Client) -> None:
        assert_problem(operator.get("/api/v1/dispatches/not-a-uuid"), 422)

    def test_needs_the_admin_token(self, stack: Stack, register: Register) -> None:
        agent = register()
        assert_problem(agent.http.get(f"/api/v1/dispatches/{uuid.uuid4()}"), 401)
