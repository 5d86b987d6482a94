"""The task endpoints over real mutual TLS, against SQLite and PostgreSQL.

Operators dispatch to one agent and read tasks; agents poll and complete
their own tasks. Each class exercises one endpoint.
"""

from __future__ import annotations

import threading
import uuid
from typing import Any

import httpx
import pytest

from tests.api.problems import assert_problem
from tests.conftest import Stack, dispatch
from tests.tasks.helpers import (
    CREDENTIALS,
    LOGS,
    SECRET,
    Register,
    create_task,
    delivered_task,
    set_agent_status,
    set_task_status,
    view,
)


class TestDispatchToOneAgent:
    """POST /api/v1/tasks with target {"agentId"}."""

    def test_creates_a_pending_task_with_the_default_timeout_and_priority(
        self, operator: httpx.Client, register: Register
    ) -> None:
        agent = register()
        response = dispatch(operator, {"agentId": agent.id})
        assert response.status_code == 201, response.text
        body = response.json()
        assert list(body) == ["tasks"]
        assert len(body["tasks"]) == 1
        (task,) = body["tasks"]
        assert set(task) == {"taskId", "agentId", "status"}
        assert task["agentId"] == agent.id
        assert task["status"] == "pending"
        uuid.UUID(task["taskId"])
        stored = view(operator, task["taskId"])
        assert stored["timeout"] == 300
        assert stored["priority"] == 0
        assert stored["status"] == "pending"
        (delivered,) = agent.heartbeat().json()["tasks"]
        assert delivered["timeout"] == 300
        assert delivered["priority"] == 0

    def test_keeps_the_given_timeout_priority_payload_and_type(
        self, operator: httpx.Client, register: Register
    ) -> None:
        agent = register()
        task_id = create_task(
            operator,
            agent,
            taskType="docker.run",
            payload={"image": "myapp", "tag": "v2.3.1"},
            timeout=45,
            priority=7,
        )
        stored = view(operator, task_id)
        assert (stored["taskType"], stored["timeout"], stored["priority"]) == ("docker.run", 45, 7)
        assert stored["payload"] == {"image": "myapp", "tag": "v2.3.1"}

    def test_unknown_agent_is_404(self, operator: httpx.Client) -> None:
        response = dispatch(operator, {"agentId": str(uuid.uuid4())})
        assert_problem(response, 404)

    def test_offline_agent_is_503_with_retry_after(
        self, stack: Stack, operator: httpx.Client, register: Register
    ) -> None:
        agent = register()
        set_agent_status(stack, agent, "offline")
        response = dispatch(operator, {"agentId": agent.id})
        assert_problem(response, 503)
        assert int(response.headers["Retry-After"]) > 0
        assert operator.get("/api/v1/tasks", params={"agentId": agent.id}).json() == []

    def test_degraded_agent_still_gets_its_task(
        self, operator: httpx.Client, register: Register
    ) -> None:
        agent = register()
        assert agent.heartbeat(status="unhealthy").status_code == 200
        assert operator.get(f"/api/v1/agents/{agent.id}").json()["status"] == "degraded"
        response = dispatch(operator, {"agentId": agent.id})
        assert response.status_code == 201, response.text
        task_id = response.json()["tasks"][0]["taskId"]
        delivered = agent.heartbeat(status="unhealthy").json()["tasks"]
        assert [task["taskId"] for task in delivered] == [task_id]

    @pytest.mark.parametrize(
        "body",
        [
            pytest.param({"payload": {}, "target": {"agentId": "AGENT"}}, id="missing-taskType"),
            pytest.param(
                {"taskType": "docker.pull", "target": {"agentId": "AGENT", "capability": "docker"}},
                id="agentId-and-capability",
            ),
            pytest.param({"taskType": "docker.pull", "target": {}}, id="empty-target"),
            pytest.param({"taskType": "docker.pull"}, id="missing-target"),
            pytest.param(
                {"taskType": "docker.pull", "timeout": 0, "target": {"agentId": "AGENT"}},
                id="timeout-0",
            ),
            pytest.param(
                {"taskType": "docker.pull", "target": {"agentId": "AGENT"}, "color": "red"},
                id="unknown-field",
            ),
            pytest.param(
                {"taskType": "docker.pull", "target": {"agentId": "AGENT", "color": "red"}},
                id="unknown-target-field",
            ),
            pytest.param(
                {"taskType": "docker.pull", "payload": [1], "target": {"agentId": "AGENT"}},
                id="payload-not-an-object",
            ),
        ],
    )
    def test_invalid_body_is_422(
        self, operator: httpx.Client, register: Register, body: dict[str, Any]
    ) -> None:
        agent = register()
        target = body.get("target")
        if target and "agentId" in target:
            body = {**body, "target": {**target, "agentId": agent.id}}
        response = operator.post("/api/v1/tasks", json=body)
        assert_problem(response, 422)
        assert operator.get("/api/v1/tasks").json() == []

    def test_needs_the_admin_token(self, stack: Stack, register: Register) -> None:
        agent = register()
        body = {"taskType": "docker.pull", "target": {"agentId": agent.id}}
        for headers in ({}, {"Authorization": "Bearer not-the-admin-token"}):
            response = httpx.post(
                f"{stack.base_url}/api/v1/tasks",
                json=body,
                headers=headers,
                verify=stack.ssl_context(),
            )
            assert_problem(response, 401)
        # Nor does an agent's own JWT make it an operator.
        assert_problem(agent.http.post("/api/v1/tasks", json=body), 401)


class TestPollTasks:
    """GET /api/v1/agents/{id}/tasks (the agent's poll)."""

    def test_lists_the_seed_fields_and_what_a_heartbeat_hands_over(
        self, operator: httpx.Client, register: Register
    ) -> None:
        agent = register()
        task_id = create_task(
            operator,
            agent,
            taskType="docker.run",
            payload={"image": "myapp"},
            credentials=CREDENTIALS,
            timeout=120,
            priority=10,
        )
        response = agent.poll()
        assert response.status_code == 200, response.text
        (task,) = response.json()["tasks"]
        assert task == {
            "taskId": task_id,
            "taskType": "docker.run",
            "priority": 10,
            "createdAt": task["createdAt"],
            "payload": {"image": "myapp"},
            "credentials": CREDENTIALS,
            "timeout": 120,
            "status": "assigned",
            # Beyond the seed: the server's detached signature (tests/signing/).
            "signature": task["signature"],
        }
        assert set(task["signature"]) == {"alg", "kid", "value"}
        assert task["createdAt"].endswith("Z")
        assert task["createdAt"] == view(operator, task_id)["createdAt"]

    def test_pending_tasks_become_assigned_and_stay_listed(
        self, operator: httpx.Client, register: Register
    ) -> None:
        agent = register()
        task_id = create_task(operator, agent)
        assert view(operator, task_id)["assignedAt"] is None
        assert [t["status"] for t in agent.poll().json()["tasks"]] == ["assigned"]
        stored = view(operator, task_id)
        assert stored["status"] == "assigned"
        assert stored["assignedAt"] is not None
        # A restarted agent sees what it holds; a heartbeat does not hand it over again.
        assert [t["taskId"] for t in agent.poll().json()["tasks"]] == [task_id]
        assert agent.heartbeat().json()["tasks"] == []

    def test_lists_running_tasks(
        self, stack: Stack, operator: httpx.Client, register: Register
    ) -> None:
        agent = register()
        task_id = delivered_task(operator, agent)
        set_task_status(stack, task_id, "running")
        (task,) = agent.poll().json()["tasks"]
        assert (task["taskId"], task["status"]) == (task_id, "running")

    def test_finished_tasks_are_not_listed(
        self, stack: Stack, operator: httpx.Client, register: Register
    ) -> None:
        agent = register()
        succeeded = delivered_task(operator, agent)
        failed = delivered_task(operator, agent)
        cancelled = create_task(operator, agent)
        timed_out = delivered_task(operator, agent)
        still_open = create_task(operator, agent)
        assert agent.complete(succeeded).status_code == 200
        assert agent.complete(failed, success=False).status_code == 200
        assert operator.post(f"/api/v1/tasks/{cancelled}/cancel").status_code == 200
        set_task_status(stack, timed_out, "timed_out")
        assert [t["taskId"] for t in agent.poll().json()["tasks"]] == [still_open]

    def test_highest_priority_first_then_oldest(
        self, operator: httpx.Client, register: Register
    ) -> None:
        agent = register()
        low_old = create_task(operator, agent, priority=0)
        high = create_task(operator, agent, priority=10)
        low_new = create_task(operator, agent, priority=0)
        middle = create_task(operator, agent, priority=5)
        negative = create_task(operator, agent, priority=-3)
        listed = [t["taskId"] for t in agent.poll().json()["tasks"]]
        assert listed == [high, middle, low_old, low_new, negative]

    def test_lists_only_the_agents_own_tasks(
        self, operator: httpx.Client, register: Register
    ) -> None:
        agent, other = register(), register()
        mine = create_task(operator, agent)
        theirs = create_task(operator, other)
        assert [t["taskId"] for t in agent.poll().json()["tasks"]] == [mine]
        assert view(operator, theirs)["status"] == "pending"
        # Another agent's list is not this agent's to read (nor to claim).
        response = agent.http.get(f"/api/v1/agents/{other.id}/tasks")
        assert_problem(response, 403)
        assert view(operator, theirs)["status"] == "pending"

    def test_an_empty_list(self, register: Register) -> None:
        agent = register()
        response = agent.poll()
        assert response.status_code == 200
        assert response.json() == {"tasks": []}


class TestCompleteTask:
    """POST /api/v1/agents/{id}/tasks/{taskId}/complete."""

    def test_success_stores_result_and_logs_in_order(
        self, operator: httpx.Client, register: Register
    ) -> None:
        agent = register()
        task_id = delivered_task(operator, agent)
        result = {"imageId": "sha256:abc123", "containerId": "container-uuid"}
        response = agent.complete(task_id, success=True, result=result, logs=LOGS)
        assert response.status_code == 200, response.text
        assert response.json() == {"acknowledged": True}
        stored = view(operator, task_id)
        assert stored["status"] == "succeeded"
        assert stored["result"] == result
        assert stored["completedAt"] is not None
        assert stored["error"] is None
        assert stored["logs"] == LOGS

    def test_failure_stores_the_error(self, operator: httpx.Client, register: Register) -> None:
        agent = register()
        task_id = delivered_task(operator, agent)
        response = agent.complete(task_id, success=False, error="image not found", logs=LOGS[:1])
        assert response.status_code == 200, response.text
        assert response.json() == {"acknowledged": True}
        stored = view(operator, task_id)
        assert (stored["status"], stored["error"]) == ("failed", "image not found")
        assert stored["logs"] == LOGS[:1]
        assert stored["completedAt"] is not None

    def test_a_running_task_can_complete(
        self, stack: Stack, operator: httpx.Client, register: Register
    ) -> None:
        agent = register()
        task_id = delivered_task(operator, agent)
        set_task_status(stack, task_id, "running")
        assert agent.complete(task_id).status_code == 200
        assert view(operator, task_id)["status"] == "succeeded"

    @pytest.mark.parametrize("success", [True, False])
    def test_repeating_the_same_outcome_is_acknowledged_without_duplicating_logs(
        self, operator: httpx.Client, register: Register, success: bool
    ) -> None:
        agent = register()
        task_id = delivered_task(operator, agent)
        first = agent.complete(task_id, success=success, result={"n": 1}, logs=LOGS)
        assert first.status_code == 200, first.text
        completed_at = view(operator, task_id)["completedAt"]
        again = agent.complete(task_id, success=success, result={"n": 2}, logs=LOGS)
        assert again.status_code == 200, again.text
        assert again.json() == {"acknowledged": True}
        stored = view(operator, task_id)
        assert stored["logs"] == LOGS
        assert stored["result"] == {"n": 1}
        assert stored["completedAt"] == completed_at

    @pytest.mark.parametrize("success", [True, False])
    def test_another_outcome_after_finishing_is_409(
        self, operator: httpx.Client, register: Register, success: bool
    ) -> None:
        agent = register()
        task_id = delivered_task(operator, agent)
        assert agent.complete(task_id, success=success).status_code == 200
        response = agent.complete(task_id, success=not success, logs=LOGS)
        assert_problem(response, 409)
        stored = view(operator, task_id)
        assert stored["status"] == ("succeeded" if success else "failed")
        assert stored["logs"] == []

    def test_a_task_of_another_agent_is_404(
        self, operator: httpx.Client, register: Register
    ) -> None:
        owner, intruder = register(), register()
        task_id = delivered_task(operator, owner)
        response = intruder.complete(task_id, logs=LOGS)
        assert_problem(response, 404)
        stored = view(operator, task_id)
        assert (stored["status"], stored["logs"]) == ("assigned", [])
        # Nor can it complete the task through the owner's path.
        response = intruder.http.post(
            f"/api/v1/agents/{owner.id}/tasks/{task_id}/complete", json={"success": True}
        )
        assert_problem(response, 403)
        assert view(operator, task_id)["status"] == "assigned"

    def test_unknown_task_is_404(self, register: Register) -> None:
        agent = register()
        assert_problem(agent.complete(str(uuid.uuid4())), 404)

    def test_a_task_never_delivered_is_409(
        self, operator: httpx.Client, register: Register
    ) -> None:
        agent = register()
        task_id = create_task(operator, agent)
        assert_problem(agent.complete(task_id), 409)
        assert view(operator, task_id)["status"] == "pending"

    @pytest.mark.parametrize("success", [True, False])
    def test_a_cancelled_task_is_409(
        self, operator: httpx.Client, register: Register, success: bool
    ) -> None:
        agent = register()
        task_id = delivered_task(operator, agent)
        assert operator.post(f"/api/v1/tasks/{task_id}/cancel").status_code == 200
        assert_problem(agent.complete(task_id, success=success, logs=LOGS), 409)
        stored = view(operator, task_id)
        assert (stored["status"], stored["logs"]) == ("cancelled", [])

    def test_a_timed_out_task_is_409(
        self, stack: Stack, operator: httpx.Client, register: Register
    ) -> None:
        agent = register()
        task_id = delivered_task(operator, agent)
        set_task_status(stack, task_id, "timed_out")
        assert_problem(agent.complete(task_id), 409)
        assert view(operator, task_id)["status"] == "timed_out"

    def test_malformed_report_is_422(self, operator: httpx.Client, register: Register) -> None:
        agent = register()
        task_id = delivered_task(operator, agent)
        path = f"/api/v1/agents/{agent.id}/tasks/{task_id}/complete"
        assert_problem(agent.http.post(path, json={"result": {}}), 422)
        assert_problem(agent.http.post(path, json={"success": True, "logs": [{}]}), 422)
        assert view(operator, task_id)["status"] == "assigned"

    @pytest.mark.parametrize("racers", [2, 10])
    def test_concurrent_completions_with_different_outcomes_settle_on_one(
        self, stack: Stack, operator: httpx.Client, register: Register, racers: int
    ) -> None:
        agent = register()
        task_id = delivered_task(operator, agent)
        barrier = threading.Barrier(racers)
        outcomes: dict[int, tuple[bool, int]] = {}

        def complete(index: int) -> None:
            success = index % 2 == 0
            with httpx.Client(
                base_url=stack.base_url,
                verify=stack.ssl_context(agent.cert_file, agent.key_file),
                headers={"Authorization": f"Bearer {agent.token}"},
                timeout=30,
            ) as client:
                client.get("/healthz")  # handshake done before the start line
                barrier.wait(timeout=10)
                response = client.post(
                    f"/api/v1/agents/{agent.id}/tasks/{task_id}/complete",
                    json={
                        "success": success,
                        "logs": [
                            {"timestamp": "2026-01-10T14:23:45Z", "message": f"racer {index}"}
                        ],
                    },
                )
            outcomes[index] = (success, response.status_code)

        threads = [threading.Thread(target=complete, args=(i,)) for i in range(racers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert len(outcomes) == racers

        stored = view(operator, task_id)
        assert stored["status"] in ("succeeded", "failed")
        winner = stored["status"] == "succeeded"
        for index, (success, status_code) in sorted(outcomes.items()):
            expected = 200 if success == winner else 409
            assert status_code == expected, (index, success, stored["status"], outcomes)
        # Only the one completion that changed the task wrote its logs.
        assert len(stored["logs"]) == 1
        racer = int(stored["logs"][0]["message"].split()[1])
        assert (racer % 2 == 0) == winner


class TestCancelTask:
    """POST /api/v1/tasks/{taskId}/cancel."""

    @pytest.mark.parametrize("delivered", [False, True], ids=["pending", "assigned"])
    def test_cancels_an_unfinished_task_once(
        self, operator: httpx.Client, register: Register, delivered: bool
    ) -> None:
        agent = register()
        task_id = delivered_task(operator, agent) if delivered else create_task(operator, agent)
        response = operator.post(f"/api/v1/tasks/{task_id}/cancel")
        assert response.status_code == 200, response.text
        assert response.json() == {"taskId": task_id, "status": "cancelled"}
        stored = view(operator, task_id)
        assert stored["status"] == "cancelled"
        assert stored["completedAt"] is not None
        assert_problem(operator.post(f"/api/v1/tasks/{task_id}/cancel"), 409)

    @pytest.mark.parametrize("success", [True, False])
    def test_a_finished_task_is_409(
        self, operator: httpx.Client, register: Register, success: bool
    ) -> None:
        agent = register()
        task_id = delivered_task(operator, agent)
        assert agent.complete(task_id, success=success).status_code == 200
        assert_problem(operator.post(f"/api/v1/tasks/{task_id}/cancel"), 409)
        assert view(operator, task_id)["status"] == ("succeeded" if success else "failed")

    def test_unknown_task_is_404(self, operator: httpx.Client) -> None:
        assert_problem(operator.post(f"/api/v1/tasks/{uuid.uuid4()}/cancel"), 404)

    def test_a_cancelled_task_is_no_longer_delivered(
        self, operator: httpx.Client, register: Register
    ) -> None:
        agent = register()
        cancelled = create_task(operator, agent, priority=5)
        kept = create_task(operator, agent)
        assert operator.post(f"/api/v1/tasks/{cancelled}/cancel").status_code == 200
        heartbeat = agent.heartbeat()
        assert heartbeat.status_code == 200, heartbeat.text
        assert [t["taskId"] for t in heartbeat.json()["tasks"]] == [kept]
        assert [t["taskId"] for t in agent.poll().json()["tasks"]] == [kept]

    def test_needs_the_admin_token(
        self, stack: Stack, operator: httpx.Client, register: Register
    ) -> None:
        agent = register()
        task_id = create_task(operator, agent)
        assert_problem(agent.http.post(f"/api/v1/tasks/{task_id}/cancel"), 401)
        response = httpx.post(
            f"{stack.base_url}/api/v1/tasks/{task_id}/cancel", verify=stack.ssl_context()
        )
        assert_problem(response, 401)
        assert view(operator, task_id)["status"] == "pending"


class TestGetTask:
    """GET /api/v1/tasks/{taskId} (operators)."""

    FIELDS = frozenset(
        {
            # CONTRACT.md
            "taskId",
            "agentId",
            "taskType",
            "status",
            "priority",
            "createdAt",
            "assignedAt",
            "completedAt",
            "progress",
            "result",
            "logs",
            "error",
            # and what an operator also needs to read a task
            "dispatchId",
            "timeout",
            "payload",
            "startedAt",
            "progressMessage",
        }
    )

    def test_has_the_contract_fields_and_never_the_credentials(
        self, operator: httpx.Client, register: Register
    ) -> None:
        agent = register()
        task_id = create_task(operator, agent, credentials=CREDENTIALS, priority=3)
        stages = [operator.get(f"/api/v1/tasks/{task_id}")]
        (delivered,) = agent.poll().json()["tasks"]
        assert delivered["credentials"] == CREDENTIALS  # the agent does get them
        stages.append(operator.get(f"/api/v1/tasks/{task_id}"))
        assert agent.complete(task_id, result={"ok": True}, logs=LOGS).status_code == 200
        stages.append(operator.get(f"/api/v1/tasks/{task_id}"))
        for response in stages:
            assert response.status_code == 200, response.text
            assert set(response.json()) == self.FIELDS
            assert SECRET not in response.text
            assert "credentials" not in response.text.lower()
        body = stages[-1].json()
        assert body["taskId"] == task_id
        assert body["agentId"] == agent.id
        assert body["taskType"] == "docker.pull"
        assert (body["status"], body["priority"]) == ("succeeded", 3)
        assert body["dispatchId"] is None
        assert body["progress"] is None
        for field in ("createdAt", "assignedAt", "completedAt"):
            assert body[field].endswith("Z"), body
        assert body["createdAt"] <= body["assignedAt"] <= body["completedAt"]

    def test_credentials_stay_out_of_the_list_too(
        self, operator: httpx.Client, register: Register
    ) -> None:
        agent = register()
        create_task(operator, agent, credentials=CREDENTIALS)
        response = operator.get("/api/v1/tasks")
        assert response.status_code == 200
        assert SECRET not in response.text

    def test_unknown_task_is_404(self, operator: httpx.Client) -> None:
        assert_problem(operator.get(f"/api/v1/tasks/{uuid.uuid4()}"), 404)

    def test_needs_the_admin_token(self, operator: httpx.Client, register: Register) -> None:
        agent = register()
        task_id = create_task(operator, agent, credentials=CREDENTIALS)
        response = agent.http.get(f"/api/v1/tasks/{task_id}")
        assert_problem(response, 401)
        assert SECRET not in response.text


class TestListTasks:
    """GET /api/v1/tasks?agentId=&status= (operators)."""

    def test_filters_by_agent_and_status(self, operator: httpx.Client, register: Register) -> None:
        first, second = register(), register()
        done = delivered_task(operator, first)
        assert first.complete(done).status_code == 200
        waiting = create_task(operator, first)
        other = create_task(operator, second)

        def listed(**params: str) -> set[str]:
            response = operator.get("/api/v1/tasks", params=params)
            assert response.status_code == 200, response.text
            return {task["taskId"] for task in response.json()}

        assert listed() == {done, waiting, other}
        assert listed(agentId=first.id) == {done, waiting}
        assert listed(agentId=second.id) == {other}
        assert listed(status="pending") == {waiting, other}
        assert listed(status="succeeded") == {done}
        assert listed(agentId=first.id, status="pending") == {waiting}
        assert listed(agentId=second.id, status="succeeded") == set()
        assert listed(agentId=str(uuid.uuid4())) == set()
        (summary,) = operator.get("/api/v1/tasks", params={"status": "succeeded"}).json()
        assert summary["agentId"] == first.id
        assert summary["status"] == "succeeded"
        assert summary["taskType"] == "docker.pull"

    def test_pages_through_the_link_header(
        self, operator: httpx.Client, register: Register
    ) -> None:
        agent = register()
        created = [create_task(operator, agent) for _ in range(5)]
        seen: list[str] = []
        url: str | None = "/api/v1/tasks?limit=2"
        pages = 0
        while url is not None:
            response = operator.get(url)
            assert response.status_code == 200, response.text
            page = [task["taskId"] for task in response.json()]
            assert 1 <= len(page) <= 2
            seen += page
            pages += 1
            link = response.links.get("next")
            url = link["url"] if link else None
            assert pages <= 5
        assert pages == 3
        assert seen == list(reversed(created))  # newest first, none twice

    def test_filters_apply_on_every_page(self, operator: httpx.Client, register: Register) -> None:
        agent, other = register(), register()
        mine = [create_task(operator, agent) for _ in range(3)]
        for _ in range(2):
            create_task(operator, other)
        first = operator.get("/api/v1/tasks", params={"agentId": agent.id, "limit": 2})
        assert first.status_code == 200
        second = operator.get(first.links["next"]["url"])
        assert "next" not in second.links
        assert [t["taskId"] for t in first.json() + second.json()] == list(reversed(mine))

    @pytest.mark.parametrize(
        "params",
        [
            {"status": "finished"},
            {"agentId": "not-a-uuid"},
            {"limit": "0"},
            {"cursor": "!!not-a-cursor!!"},
        ],
    )
    def test_bad_query_is_422(self, operator: httpx.Client, params: dict[str, str]) -> None:
        assert_problem(operator.get("/api/v1/tasks", params=params), 422)

    def test_needs_the_admin_token(self, stack: Stack) -> None:
        response = httpx.get(f"{stack.base_url}/api/v1/tasks", verify=stack.ssl_context())
        assert_problem(response, 401)
