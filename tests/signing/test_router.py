"""Signed tasks on every delivery path, the key endpoint, and receipts through the API.

Against the real TLS server of the `stack` fixture (SQLite and PostgreSQL), with
agents registered through the API.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import httpx
import pytest
from sqlalchemy import update
from sqlmodel import col

from agent.signatures import b64url
from app.cli.receipts import check
from app.models import Task
from tests.conftest import AgentClient, Stack, dispatch
from tests.signing.helpers import make_receipt, signature_holds
from tests.stream.helpers import StreamAgent, open_stream, receive
from tests.tasks.helpers import CREDENTIALS, SECRET, Register, create_task, delivered_task

PROBLEM = "application/problem+json"


def keys_of(agent: AgentClient) -> list[dict[str, Any]]:
    keys: list[dict[str, Any]] = agent.registration["taskSigningKeys"]
    return keys


class TestSigningKeys:
    def test_registration_and_the_key_endpoint_publish_the_current_keys(
        self, stack: Stack, operator: httpx.Client, register: Register
    ) -> None:
        agent, other = register(), register()
        published = stack.runtime.task_keys.published()
        assert keys_of(agent) == published
        assert {"kid", "alg", "publicKey", "activatesAt"} <= set(published[-1])
        response = agent.http.get(f"/api/v1/agents/{agent.id}/task-signing-keys")
        assert response.status_code == 200, response.text
        assert response.json() == {"keys": published}
        # Only over the agent's own credentials.
        assert other.http.get(f"/api/v1/agents/{agent.id}/task-signing-keys").status_code == 403
        response = operator.get(f"/api/v1/agents/{agent.id}/task-signing-keys")
        assert response.status_code == 401
        assert response.headers["content-type"].startswith(PROBLEM)


class TestSignedDeliveries:
    def test_heartbeat_and_poll_hand_over_signed_tasks(
        self, operator: httpx.Client, register: Register
    ) -> None:
        agent = register()
        first = create_task(
            operator,
            agent,
            payload={"image": "a", "n": 1.0, "big": 1e20, "tiny": 1.5e-7, "é": ["✓", None]},
            credentials=CREDENTIALS,
        )
        (task,) = agent.heartbeat().json()["tasks"]
        assert task["taskId"] == first
        assert signature_holds(task, agent.id, keys_of(agent))
        # The credentials are not what is signed: none of it is in the signature's input.
        assert SECRET not in str(task["signature"])
        assert signature_holds({**task, "credentials": None}, agent.id, keys_of(agent))
        second = create_task(operator, agent, payload={"image": "b"}, timeout=77)
        polled = {t["taskId"]: t for t in agent.poll().json()["tasks"]}
        assert set(polled) == {first, second}
        assert all(signature_holds(t, agent.id, keys_of(agent)) for t in polled.values())

    def test_the_stream_hands_over_signed_tasks(
        self, stack: Stack, operator: httpx.Client, register: Register
    ) -> None:
        agent = register()
        streamer = StreamAgent(agent.id, agent.token, agent.cert_file, agent.key_file)

        async def scenario() -> dict[str, Any]:
            async with open_stream(stack.base_url, stack.ca_file, streamer) as websocket:
                await asyncio.to_thread(create_task, operator, agent, payload={"image": "s"})
                message = await receive(websocket)
                assert message["type"] == "task_assigned"
                task: dict[str, Any] = message["task"]
                return task

        task = asyncio.run(scenario())
        assert signature_holds(task, agent.id, keys_of(agent))

    def test_a_fan_out_task_is_signed_by_the_worker(
        self, operator: httpx.Client, register: Register
    ) -> None:
        agent = register(capabilities=["signed-fanout"])
        response = dispatch(operator, {"capability": "signed-fanout"})
        assert response.status_code == 202, response.text
        deadline = time.monotonic() + 30
        while not (tasks := agent.poll().json()["tasks"]):
            assert time.monotonic() < deadline, "the fan-out made no task"
            time.sleep(0.1)
        assert signature_holds(tasks[0], agent.id, keys_of(agent))

    def test_a_row_altered_after_signing_no_longer_verifies(
        self, stack: Stack, operator: httpx.Client, register: Register
    ) -> None:
        agent, other = register(), register()
        task_id = create_task(operator, agent, payload={"image": "myapp"})
        with stack.runtime.engine.begin() as connection:
            connection.execute(
                update(Task)
                .where(col(Task.id) == uuid.UUID(task_id))
                .values(payload={"image": "evil"})
            )
        (task,) = agent.poll().json()["tasks"]
        assert task["payload"] == {"image": "evil"}
        assert not signature_holds(task, agent.id, keys_of(agent))
        restored = {**task, "payload": {"image": "myapp"}}
        assert signature_holds(restored, agent.id, keys_of(agent))
        # Bound to its agent too: the same task handed to another does not verify.
        assert not signature_holds(restored, other.id, keys_of(agent))


def _key(agent: AgentClient) -> str:
    key: str = agent.registration["certificate"]["key"]
    return key


class TestReceipts:
    def test_a_receipt_is_kept_and_served_for_offline_checking(
        self, stack: Stack, operator: httpx.Client, register: Register
    ) -> None:
        agent = register()
        task_id = delivered_task(operator, agent)
        result = {"imageId": "sha256:abc", "size": 12.0}
        receipt = make_receipt(_key(agent), task_id=task_id, agent_id=agent.id, result=result)
        response = agent.complete(task_id, result=result, receipt=receipt)
        assert response.status_code == 200, response.text
        # The same completion again: acknowledged, the first receipt kept.
        assert agent.complete(task_id, result=result, receipt=receipt).status_code == 200

        response = operator.get(f"/api/v1/tasks/{task_id}/receipt")
        assert response.status_code == 200, response.text
        document = response.json()
        assert document["taskId"] == task_id
        assert document["agentId"] == agent.id
        assert document["receipt"]["outcome"] == "succeeded"
        assert (document["signed"], document["signature"]) == (
            receipt["signed"],
            receipt["signature"],
        )
        assert document["algorithm"] == "ES256"
        assert document["certificate"] == agent.registration["certificate"]["cert"]
        assert document["caCertificate"] == stack.ca_file.read_text()
        assert check(document)["outcome"] == "succeeded"

    def test_no_receipt_is_accepted_as_from_a_seed_agent_and_served_as_404(
        self, operator: httpx.Client, register: Register
    ) -> None:
        agent = register()
        task_id = delivered_task(operator, agent)
        assert agent.complete(task_id).status_code == 200
        response = operator.get(f"/api/v1/tasks/{task_id}/receipt")
        assert response.status_code == 404
        assert response.headers["content-type"].startswith(PROBLEM)
        assert operator.get(f"/api/v1/tasks/{uuid.uuid4()}/receipt").status_code == 404

    def test_the_receipt_endpoint_is_for_operators(
        self, stack: Stack, register: Register, operator: httpx.Client
    ) -> None:
        agent = register()
        task_id = delivered_task(operator, agent)
        response = httpx.get(
            f"{stack.base_url}/api/v1/tasks/{task_id}/receipt", verify=stack.ssl_context()
        )
        assert response.status_code == 401
        assert response.headers["content-type"].startswith(PROBLEM)

    @pytest.mark.parametrize(
        "bad",
        [
            "another key",
            "other outcome",
            "other result",
            "other task",
            "other agent",
            "wrong algorithm",
            "altered bytes",
            "not base64",
            "not a receipt",
            "nested deep",
        ],
    )
    def test_a_bad_receipt_is_refused_and_the_task_stays_open(
        self, operator: httpx.Client, register: Register, bad: str
    ) -> None:
        agent, other = register(), register()
        task_id = delivered_task(operator, agent)
        result = {"ok": True}
        key = _key(agent)
        fields: dict[str, Any] = {"task_id": task_id, "agent_id": agent.id, "result": result}
        receipt: dict[str, Any]
        if bad == "another key":
            receipt = make_receipt(_key(other), **fields)
        elif bad == "other outcome":
            receipt = make_receipt(key, outcome="failed", **fields)
        elif bad == "other result":
            receipt = make_receipt(key, **{**fields, "result": {"ok": False}})
        elif bad == "other task":
            receipt = make_receipt(key, **{**fields, "task_id": str(uuid.uuid4())})
        elif bad == "other agent":
            receipt = make_receipt(key, **{**fields, "agent_id": other.id})
        elif bad == "wrong algorithm":
            receipt = make_receipt(key, alg="EdDSA", **fields)
        elif bad == "altered bytes":
            good = make_receipt(key, **fields)
            receipt = {**good, "signed": make_receipt(key, outcome="failed", **fields)["signed"]}
        elif bad == "not base64":
            receipt = {**make_receipt(key, **fields), "signature": "not base64!"}
        elif bad == "nested deep":
            receipt = make_receipt(key, **fields) | {"signed": b64url(b"[" * 6000)}
        else:
            receipt = make_receipt(key, **fields) | {"signed": "bm90IGpzb24"}
        response = agent.complete(task_id, result=result, receipt=receipt)
        assert response.status_code == 422, response.text
        assert response.headers["content-type"].startswith(PROBLEM)
        assert "receipt" in response.json()["detail"]
        view = operator.get(f"/api/v1/tasks/{task_id}").json()
        assert view["status"] == "assigned"
        assert operator.get(f"/api/v1/tasks/{task_id}/receipt").status_code == 404
