"""Every answer names its request id, and the tasks a request creates keep it."""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable

import httpx
from sqlmodel import Session, select

from app.models import Dispatch, Task
from tests.conftest import AgentClient, Stack
from tests.dispatch.test_router import wait_done


def test_a_callers_id_is_echoed_and_kept_by_the_task_it_created(
    stack: Stack, operator: httpx.Client, register: Callable[..., AgentClient]
) -> None:
    agent = register()
    response = operator.post(
        "/api/v1/tasks",
        json={
            "taskType": "docker.pull",
            "payload": {"image": "a"},
            "target": {"agentId": agent.id},
        },
        headers={"X-Request-ID": "deploy-4711.abc"},
    )
    assert response.status_code == 201, response.text
    assert response.headers["X-Request-ID"] == "deploy-4711.abc"
    task_id = uuid.UUID(response.json()["tasks"][0]["taskId"])
    with Session(stack.runtime.engine) as session:
        task = session.exec(select(Task).where(Task.id == task_id)).one()
    assert task.request_id == "deploy-4711.abc"


def test_an_id_is_made_where_none_or_an_unsafe_one_is_given(
    operator: httpx.Client, register: Callable[..., AgentClient]
) -> None:
    agent = register()
    made = operator.get("/api/v1/agents").headers["X-Request-ID"]
    assert re.fullmatch(r"[0-9a-f]{32}", made)
    replaced = operator.get("/api/v1/agents", headers={"X-Request-ID": 'x" injected=1'})
    assert re.fullmatch(r"[0-9a-f]{32}", replaced.headers["X-Request-ID"])
    # Problems and the heartbeat fast lane answer with one too.
    assert operator.get("/api/v1/tasks/not-a-uuid").headers["X-Request-ID"]
    beat = agent.heartbeat()
    assert beat.json() == {"tasks": []}
    assert re.fullmatch(r"[0-9a-f]{32}", beat.headers["X-Request-ID"])


def test_a_selector_dispatch_keeps_the_id_in_every_task_it_fans_out(
    stack: Stack, operator: httpx.Client, register: Callable[..., AgentClient]
) -> None:
    agents = [register(capabilities=["docker"]) for _ in range(2)]
    for agent in agents:
        assert agent.heartbeat().status_code == 200
    response = operator.post(
        "/api/v1/tasks",
        json={"taskType": "docker.pull", "payload": {}, "target": {"capability": "docker"}},
        headers={"X-Request-ID": "fanout-1"},
    )
    assert response.status_code == 202, response.text
    dispatch_id = uuid.UUID(response.json()["dispatchId"])
    wait_done(operator, str(dispatch_id), timeout=30)
    with Session(stack.runtime.engine) as session:
        rows = session.exec(select(Task).where(Task.dispatch_id == dispatch_id)).all()
        dispatch_row = session.get(Dispatch, dispatch_id)
    assert len(rows) == 2
    assert {row.request_id for row in rows} == {"fanout-1"}
    assert dispatch_row is not None
    assert dispatch_row.request_id == "fanout-1"
