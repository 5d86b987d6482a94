"""The operator's agent endpoints: list, get, update (PUT) and delete."""

from __future__ import annotations

import ssl
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from tests.agents.helpers import NEXT_LINK, assert_problem, load_cert, race, set_agent
from tests.conftest import ADMIN_TOKEN, AgentClient, Stack, dispatch

SEED_FIELDS = {"id", "name", "version", "status", "capabilities", "lastHeartbeat", "resourceUsage"}


def _names(response: httpx.Response) -> list[str]:
    assert response.status_code == 200, response.text
    return [agent["name"] for agent in response.json()]


class TestListAgents:
    def test_seed_fields_and_labels(
        self, register: Callable[..., AgentClient], operator: httpx.Client
    ) -> None:
        agent = register("a1", capabilities=["docker"], labels={"dc": "us-east-1"})
        agent.heartbeat(resourceUsage={"cpu": 15.5, "memory": 45.2})
        response = operator.get("/api/v1/agents")
        assert response.status_code == 200, response.text
        (listed,) = response.json()
        assert set(listed) >= SEED_FIELDS | {"labels"}
        assert listed["id"] == agent.id
        assert listed["name"] == "a1"
        assert listed["version"] == "1.0.0"
        assert listed["status"] == "online"
        assert listed["capabilities"] == ["docker"]
        assert listed["labels"] == {"dc": "us-east-1"}
        assert listed["resourceUsage"] == {"cpu": 15.5, "memory": 45.2}
        assert listed["lastHeartbeat"].endswith("Z")

    def test_empty_fleet(self, operator: httpx.Client) -> None:
        response = operator.get("/api/v1/agents")
        assert response.status_code == 200
        assert response.json() == []
        assert "link" not in response.headers

    def test_status_filter(
        self, stack: Stack, register: Callable[..., AgentClient], operator: httpx.Client
    ) -> None:
        """online / degraded (unhealthy heartbeat) / offline (as the sweep sets it)."""
        register("a-online")
        assert register("b-degraded").heartbeat(status="unhealthy").status_code == 200
        set_agent(stack, register("c-offline").id, status="offline")
        for status, expected in [
            ("online", ["a-online"]),
            ("degraded", ["b-degraded"]),
            ("offline", ["c-offline"]),
        ]:
            assert _names(operator.get("/api/v1/agents", params={"status": status})) == expected

    def test_capability_filter_matches_whole_capabilities(
        self, register: Callable[..., AgentClient], operator: httpx.Client
    ) -> None:
        register("a1", capabilities=["docker", "compose"])
        register("a2", capabilities=["ssh"])
        register("a3", capabilities=["docker"])
        register("a4", capabilities=[])

        def names(capability: str) -> list[str]:
            return _names(operator.get("/api/v1/agents", params={"capability": capability}))

        assert names("docker") == ["a1", "a3"]
        assert names("ssh") == ["a2"]
        assert names("dock") == []
        assert names("winrm") == []

    def test_label_filters_are_anded(
        self, register: Callable[..., AgentClient], operator: httpx.Client
    ) -> None:
        register("a1", labels={"dc": "us-east-1", "role": "deploy"})
        register("a2", labels={"dc": "us-east-1", "role": "build"})
        register("a3", labels={"dc": "eu-west-1", "role": "deploy"})
        register("a4", labels={"expr": "a=b"})

        def names(*labels: str) -> list[str]:
            return _names(operator.get("/api/v1/agents", params={"label": list(labels)}))

        assert names("dc=us-east-1") == ["a1", "a2"]
        assert names("dc=us-east-1", "role=deploy") == ["a1"]
        assert names("role=deploy") == ["a1", "a3"]
        assert names("dc=us-east-1", "role=none") == []
        assert names("dc=us") == []
        assert names("expr=a=b") == ["a4"]

    def test_filters_combine(
        self, register: Callable[..., AgentClient], operator: httpx.Client
    ) -> None:
        register("a1", capabilities=["docker"], labels={"dc": "us"})
        register("a2", capabilities=["docker"], labels={"dc": "us"}).heartbeat(status="busy")
        register("a3", capabilities=["ssh"], labels={"dc": "us"})
        register("a4", capabilities=["docker"], labels={"dc": "eu"})
        params = {"status": "online", "capability": "docker", "label": "dc=us"}
        assert _names(operator.get("/api/v1/agents", params=params)) == ["a1"]
        params["status"] = "degraded"
        assert _names(operator.get("/api/v1/agents", params=params)) == ["a2"]

    @pytest.mark.parametrize(
        "params",
        [
            {"status": "healthy"},
            {"status": "ONLINE"},
            {"label": "dc"},
            {"label": "=us"},
            {"limit": 0},
            {"limit": 1001},
            {"limit": "many"},
        ],
    )
    def test_bad_query_is_422(self, operator: httpx.Client, params: dict[str, Any]) -> None:
        assert_problem(operator.get("/api/v1/agents", params=params), 422)

    def test_pages_follow_the_link_header(
        self, register: Callable[..., AgentClient], operator: httpx.Client, stack: Stack
    ) -> None:
        """limit=2 over 5 agents: pages of 2, 2, 1; each agent once, in name order."""
        for name in ["e5", "c3", "a1", "d4", "b2"]:
            register(name)
        url: str | None = "/api/v1/agents?limit=2"
        pages: list[list[str]] = []
        while url is not None:
            response = operator.get(url)
            pages.append(_names(response))
            match = NEXT_LINK.search(response.headers.get("link", ""))
            url = match.group(1) if match else None
            if url is not None:
                assert url.startswith(stack.base_url)
                assert "limit=2" in url
        assert pages == [["a1", "b2"], ["c3", "d4"], ["e5"]]

    def test_pages_keep_the_filters(
        self, register: Callable[..., AgentClient], operator: httpx.Client
    ) -> None:
        for index in range(4):
            register(f"a{index}", capabilities=["docker" if index % 2 else "ssh"])
        first = operator.get("/api/v1/agents", params={"capability": "docker", "limit": 1})
        assert _names(first) == ["a1"]
        match = NEXT_LINK.search(first.headers["link"])
        assert match is not None
        second = operator.get(match.group(1))
        assert _names(second) == ["a3"]
        assert "link" not in second.headers

    @pytest.mark.parametrize("cursor", ["!!!", "_w", "bm90LWpzb24", "eyJhIjoxfQ", "WzEsMl0"])
    def test_bad_cursor_is_422(self, operator: httpx.Client, cursor: str) -> None:
        """Not base64, not UTF-8, not JSON, not a list, a list of the wrong length."""
        assert_problem(operator.get("/api/v1/agents", params={"cursor": cursor}), 422)

    def test_operator_token_required(
        self, stack: Stack, register: Callable[..., AgentClient]
    ) -> None:
        """Anonymous callers and agents (even with mTLS and their JWT) get 401."""
        agent = register("a1")
        with httpx.Client(base_url=stack.base_url, verify=stack.ssl_context()) as anonymous:
            assert_problem(anonymous.get("/api/v1/agents"), 401)
            wrong = {"Authorization": "Bearer nope"}
            assert_problem(anonymous.get("/api/v1/agents", headers=wrong), 401)
        assert_problem(agent.http.get("/api/v1/agents"), 401)


class TestGetAgent:
    def test_operator_sees_full_detail(
        self, register: Callable[..., AgentClient], operator: httpx.Client
    ) -> None:
        agent = register("a1", capabilities=["docker"], labels={"dc": "us"})
        assert dispatch(operator, {"agentId": agent.id}).status_code == 201
        assert agent.heartbeat(status="busy", runningTasks=1).status_code == 200
        assert dispatch(operator, {"agentId": agent.id}).status_code == 201
        response = operator.get(f"/api/v1/agents/{agent.id}")
        assert response.status_code == 200, response.text
        detail = response.json()
        assert set(detail) >= SEED_FIELDS | {"labels", "certificate", "runningTasks", "openTasks"}
        assert detail["id"] == agent.id
        assert detail["status"] == "degraded"
        assert detail["reportedStatus"] == "busy"
        assert detail["labels"] == {"dc": "us"}
        assert detail["runningTasks"] == 1
        assert detail["openTasks"] == 2
        issued = agent.registration["certificate"]
        assert detail["certificate"] == {
            "serial": format(load_cert(issued["cert"]).serial_number, "x"),
            "expiresAt": issued["expiresAt"],
        }

    def test_agent_may_read_itself(self, register: Callable[..., AgentClient]) -> None:
        agent = register("a1")
        response = agent.http.get(f"/api/v1/agents/{agent.id}")
        assert response.status_code == 200, response.text
        assert response.json()["name"] == "a1"

    def test_agent_may_not_read_another(self, register: Callable[..., AgentClient]) -> None:
        agent, other = register("a1"), register("a2")
        body = assert_problem(agent.http.get(f"/api/v1/agents/{other.id}"), 403)
        assert "a2" not in str(body)

    def test_anonymous_is_401(self, stack: Stack, register: Callable[..., AgentClient]) -> None:
        agent = register("a1")
        with httpx.Client(base_url=stack.base_url, verify=stack.ssl_context()) as anonymous:
            assert_problem(anonymous.get(f"/api/v1/agents/{agent.id}"), 401)

    def test_unknown_id_is_404(self, operator: httpx.Client) -> None:
        assert_problem(operator.get(f"/api/v1/agents/{uuid.uuid4()}"), 404)

    def test_non_uuid_id_is_422(self, operator: httpx.Client) -> None:
        assert_problem(operator.get("/api/v1/agents/not-a-uuid"), 422)


class TestUpdateAgent:
    def test_replaces_labels_and_capabilities(
        self, register: Callable[..., AgentClient], operator: httpx.Client
    ) -> None:
        """The seed's PUT: given fields replaced as given (not merged), others unchanged."""
        agent = register("a1", capabilities=["docker", "compose"], labels={"dc": "us", "x": "1"})
        response = operator.put(
            f"/api/v1/agents/{agent.id}",
            json={"labels": {"datacenter": "us-west-2"}, "capabilities": ["docker", "ssh"]},
        )
        assert response.status_code == 200, response.text
        updated = response.json()
        assert updated["labels"] == {"datacenter": "us-west-2"}
        assert updated["capabilities"] == ["docker", "ssh"]
        assert updated["name"] == "a1"
        assert updated["version"] == "1.0.0"
        assert operator.get(f"/api/v1/agents/{agent.id}").json() == updated

    def test_missing_fields_stay_unchanged(
        self, register: Callable[..., AgentClient], operator: httpx.Client
    ) -> None:
        agent = register("a1", capabilities=["docker"], labels={"dc": "us"})
        operator.put(f"/api/v1/agents/{agent.id}", json={"labels": {"dc": "eu"}})
        detail = operator.put(f"/api/v1/agents/{agent.id}", json={}).json()
        assert detail["labels"] == {"dc": "eu"}
        assert detail["capabilities"] == ["docker"]
        detail = operator.put(f"/api/v1/agents/{agent.id}", json={"capabilities": []}).json()
        assert detail["capabilities"] == []
        assert detail["labels"] == {"dc": "eu"}

    def test_rename(self, register: Callable[..., AgentClient], operator: httpx.Client) -> None:
        agent = register("a1")
        response = operator.put(f"/api/v1/agents/{agent.id}", json={"name": "renamed"})
        assert response.status_code == 200, response.text
        assert [a["name"] for a in operator.get("/api/v1/agents").json()] == ["renamed"]

    def test_rename_to_a_taken_name_is_409(
        self, register: Callable[..., AgentClient], operator: httpx.Client
    ) -> None:
        agent = register("a1", labels={"keep": "me"})
        register("a2")
        response = operator.put(
            f"/api/v1/agents/{agent.id}", json={"name": "a2", "labels": {"new": "x"}}
        )
        assert_problem(response, 409)
        detail = operator.get(f"/api/v1/agents/{agent.id}").json()
        assert detail["name"] == "a1"
        assert detail["labels"] == {"keep": "me"}

    @pytest.mark.parametrize(
        "body",
        [
            {"label": {"dc": "us"}},
            {"status": "offline"},
            {"labels": {"dc": 1}},
            {"capabilities": "docker"},
            {"name": "has space"},
        ],
    )
    def test_bad_body_is_422(
        self, register: Callable[..., AgentClient], operator: httpx.Client, body: dict[str, Any]
    ) -> None:
        """Unknown fields (typos) and invalid values are refused."""
        agent = register("a1")
        assert_problem(operator.put(f"/api/v1/agents/{agent.id}", json=body), 422)

    def test_updates_racing_the_delete_get_200_or_404(
        self, stack: Stack, register: Callable[..., AgentClient], operator: httpx.Client
    ) -> None:
        """A PUT that read the agent just before a DELETE removed it is 404, never a 500."""
        headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        for round_ in range(3):
            agent = register(f"a{round_}")

            def call(index: int, agent_id: str = agent.id) -> int:
                with httpx.Client(
                    base_url=stack.base_url, verify=stack.ssl_context(), headers=headers
                ) as client:
                    if index == 0:
                        return client.delete(f"/api/v1/agents/{agent_id}").status_code
                    body = {"labels": {"n": str(index)}}
                    return client.put(f"/api/v1/agents/{agent_id}", json=body).status_code

            statuses = race(17, call)
            assert statuses[0] == 200
            assert set(statuses[1:]) <= {200, 404}, statuses
            assert operator.get(f"/api/v1/agents/{agent.id}").status_code == 404

    def test_unknown_id_is_404(self, operator: httpx.Client) -> None:
        assert_problem(operator.put(f"/api/v1/agents/{uuid.uuid4()}", json={"labels": {}}), 404)

    def test_operator_only(self, register: Callable[..., AgentClient]) -> None:
        """An agent cannot relabel itself."""
        agent = register("a1")
        assert_problem(agent.http.put(f"/api/v1/agents/{agent.id}", json={"labels": {}}), 401)


class TestDeleteAgent:
    def test_deleted_agent_is_gone_and_locked_out(
        self, register: Callable[..., AgentClient], operator: httpx.Client
    ) -> None:
        """{"deleted": true}; then 404 for operators and 401 for its still-valid credentials."""
        agent = register("a1")
        assert agent.heartbeat().status_code == 200
        response = operator.delete(f"/api/v1/agents/{agent.id}")
        assert response.status_code == 200, response.text
        assert response.json() == {"deleted": True}
        assert_problem(operator.get(f"/api/v1/agents/{agent.id}"), 404)
        assert operator.get("/api/v1/agents").json() == []
        assert_problem(agent.heartbeat(), 401)
        assert_problem(agent.poll(), 401)
        assert_problem(agent.http.get(f"/api/v1/agents/{agent.id}"), 401)

    def test_unfinished_tasks_are_cancelled(
        self, register: Callable[..., AgentClient], operator: httpx.Client
    ) -> None:
        agent = register("a1")
        delivered = dispatch(operator, {"agentId": agent.id}).json()["tasks"][0]["taskId"]
        assert agent.heartbeat().status_code == 200
        pending = dispatch(operator, {"agentId": agent.id}).json()["tasks"][0]["taskId"]
        assert operator.delete(f"/api/v1/agents/{agent.id}").status_code == 200
        for task_id in (delivered, pending):
            task = operator.get(f"/api/v1/tasks/{task_id}")
            assert task.status_code == 200, task.text
            assert task.json()["status"] == "cancelled"
            assert task.json()["completedAt"] is not None

    def test_finished_tasks_stay_as_history(
        self, register: Callable[..., AgentClient], operator: httpx.Client
    ) -> None:
        agent = register("a1")
        task_id = dispatch(operator, {"agentId": agent.id}).json()["tasks"][0]["taskId"]
        agent.heartbeat()
        assert agent.complete(task_id).status_code == 200
        operator.delete(f"/api/v1/agents/{agent.id}")
        assert operator.get(f"/api/v1/tasks/{task_id}").json()["status"] == "succeeded"

    def test_other_agents_are_untouched(
        self, register: Callable[..., AgentClient], operator: httpx.Client
    ) -> None:
        agent, other = register("a1"), register("a2")
        operator.delete(f"/api/v1/agents/{agent.id}")
        assert other.heartbeat().status_code == 200
        assert [a["name"] for a in operator.get("/api/v1/agents").json()] == ["a2"]

    def test_heartbeats_racing_the_delete_get_200_or_401(
        self, stack: Stack, register: Callable[..., AgentClient], operator: httpx.Client
    ) -> None:
        """A heartbeat authenticated just before a DELETE removed the agent is 401, never 500."""
        for round_ in range(3):
            agent = register(f"a{round_}")
            context = stack.ssl_context(agent.cert_file, agent.key_file)
            headers = {"Authorization": f"Bearer {agent.token}"}

            def call(
                index: int,
                agent: AgentClient = agent,
                context: ssl.SSLContext = context,
                headers: dict[str, str] = headers,
            ) -> int:
                if index == 0:
                    return operator.delete(f"/api/v1/agents/{agent.id}").status_code
                with httpx.Client(base_url=stack.base_url, verify=context, headers=headers) as c:
                    path = f"/api/v1/agents/{agent.id}/heartbeat"
                    return c.post(path, json={"status": "healthy"}).status_code

            statuses = race(17, call)
            assert statuses[0] == 200
            assert set(statuses[1:]) <= {200, 401}, statuses
            assert_problem(agent.heartbeat(), 401)

    def test_delete_twice_is_404(
        self, register: Callable[..., AgentClient], operator: httpx.Client
    ) -> None:
        agent = register("a1")
        assert operator.delete(f"/api/v1/agents/{agent.id}").status_code == 200
        assert_problem(operator.delete(f"/api/v1/agents/{agent.id}"), 404)

    def test_operator_only(self, register: Callable[..., AgentClient]) -> None:
        agent = register("a1")
        assert_problem(agent.http.delete(f"/api/v1/agents/{agent.id}"), 401)
        assert agent.heartbeat().status_code == 200
