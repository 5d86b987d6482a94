"""Who may call what, over every operation /openapi.json documents.

- an agent's JWT and certificate on any operator operation: 401;
- the admin token on any agent operation (with or without a client certificate): 401;
- agent A's credentials on agent B's records and tasks: 403, and B's state is untouched.

The task stream (not in the OpenAPI document) is refused the same way: see
tests/stream/test_auth.py (4401 for the admin token, 4403 for another agent's stream).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from tests.api.problems import assert_problem
from tests.conftest import ADMIN_TOKEN, AgentClient, Stack
from tests.security.openapi import Operation, fetch_document, minimal_body, operations
from tests.tasks.helpers import delivered_task, view

Register = Callable[..., AgentClient]


@dataclass
class World:
    """Two agents, a task delivered to B, and the documented operations."""

    document: dict[str, Any]
    operations: list[Operation]
    a: AgentClient
    b: AgentClient
    b_task: str

    def ids(self, agent: AgentClient) -> dict[str, str]:
        """Path parameters that name `agent` and B's task (real ids: only auth decides)."""
        return {"id": agent.id, "taskId": self.b_task, "dispatchId": self.b_task}

    def of_kind(self, *kinds: str) -> list[Operation]:
        found = [operation for operation in self.operations if operation.kind in kinds]
        assert found, kinds
        return found

    def send(
        self, client: httpx.Client, operation: Operation, path_agent: AgentClient, **kwargs: Any
    ) -> httpx.Response:
        schema = operation.body_schema
        body = None if schema is None else minimal_body(self.document, schema)
        return client.request(
            operation.method, operation.url(**self.ids(path_agent)), json=body, **kwargs
        )


@pytest.fixture
def world(operator: httpx.Client, register: Register) -> World:
    document = fetch_document(operator)
    a, b = register("agent-a"), register("agent-b")
    return World(document, operations(document), a, b, delivered_task(operator, b))


def assert_b_untouched(operator: httpx.Client, world: World) -> None:
    task = view(operator, world.b_task)
    assert task["status"] == "assigned", task
    assert task["agentId"] == world.b.id
    record = operator.get(f"/api/v1/agents/{world.b.id}")
    assert record.status_code == 200, record.text
    assert record.json()["reportedStatus"] == "healthy"


class TestEveryOperationIsClassified:
    def test_the_rules_name_a_caller_for_each(self, operator: httpx.Client) -> None:
        kinds = {op.label: op.kind for op in operations(fetch_document(operator))}
        assert kinds["POST /api/v1/agents/register"] == "register"
        assert kinds["POST /api/v1/agents/{id}/heartbeat"] == "agent"
        assert kinds["POST /api/v1/tasks"] == "operator"
        assert kinds["GET /healthz"] == "public"


class TestAgentCredentialsOnOperatorOperations:
    def test_each_is_401(self, operator: httpx.Client, world: World) -> None:
        for operation in world.of_kind("operator"):
            response = world.send(world.a.http, operation, world.a)
            assert_problem(response, 401)
            assert 401 in operation.documented, operation.label
        # Nothing was deleted, cancelled or changed along the way.
        assert_b_untouched(operator, world)
        assert world.a.heartbeat().status_code == 200


class TestAdminTokenOnAgentOperations:
    def test_without_a_certificate_each_is_401(
        self, stack: Stack, operator: httpx.Client, world: World
    ) -> None:
        for operation in world.of_kind("agent"):
            for path_agent in (world.a, world.b):
                response = world.send(operator, operation, path_agent)
                assert_problem(response, 401)
        assert_b_untouched(operator, world)

    def test_with_the_agents_certificate_each_is_401(
        self, operator: httpx.Client, world: World
    ) -> None:
        admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        for operation in world.of_kind("agent"):
            response = world.send(world.b.http, operation, world.b, headers=admin)
            assert_problem(response, 401)
        assert_b_untouched(operator, world)

    def test_operators_may_read_any_agent(self, operator: httpx.Client, world: World) -> None:
        for operation in world.of_kind("operator-or-self"):
            response = world.send(operator, operation, world.b)
            assert response.status_code == 200, (operation.label, response.text)


class TestOneAgentOnAnothersOperations:
    def test_each_is_403_and_changes_nothing(self, operator: httpx.Client, world: World) -> None:
        for operation in world.of_kind("agent", "operator-or-self"):
            response = world.send(world.a.http, operation, world.b)
            body = assert_problem(response, 403)
            assert "not authorized" in body["detail"], operation.label
            assert 403 in operation.documented, operation.label
        assert_b_untouched(operator, world)

    def test_on_its_own_path_anothers_task_is_not_found(
        self, operator: httpx.Client, world: World
    ) -> None:
        # A's own credentials and path work, but B's task is not A's to complete.
        response = world.a.complete(world.b_task)
        assert_problem(response, 404)
        assert_b_untouched(operator, world)

    def test_its_own_operations_answer_it(self, world: World) -> None:
        # The same requests with matching credentials pass: the refusals above are
        # about who asks, not about the requests.
        for operation in world.of_kind("agent", "operator-or-self"):
            if "{taskId}" in operation.path:
                continue  # B's task: 404 above
            response = world.send(world.a.http, operation, world.a)
            assert response.status_code == 200, (operation.label, response.text)
