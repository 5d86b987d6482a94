"""Helpers shared by the task and dispatch tests: create, deliver and read tasks."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import httpx
from sqlalchemy import update
from sqlmodel import col

from app.models import Agent, Task
from tests.conftest import AgentClient, Stack, dispatch

SECRET = "s3cr3t-registry-password-7c41e9"
CREDENTIALS: dict[str, object] = {"registry.username": "deployer", "registry.password": SECRET}
LOGS = [
    {"timestamp": "2026-01-10T14:23:45.000Z", "level": "info", "message": "Pulling image..."},
    {"timestamp": "2026-01-10T14:23:47.000Z", "level": "warning", "message": "Slow layer"},
    {"timestamp": "2026-01-10T14:23:50.000Z", "level": "info", "message": "Image pulled"},
]
Register = Callable[..., AgentClient]


def create_task(operator: httpx.Client, agent: AgentClient, **body: Any) -> str:
    """A task for `agent` through the API; its id."""
    response = dispatch(operator, {"agentId": agent.id}, **body)
    assert response.status_code == 201, response.text
    task_id: str = response.json()["tasks"][0]["taskId"]
    return task_id


def delivered_task(operator: httpx.Client, agent: AgentClient, **body: Any) -> str:
    """A task already handed to `agent` (assigned) by a poll."""
    task_id = create_task(operator, agent, **body)
    response = agent.poll()
    assert response.status_code == 200, response.text
    assert task_id in [task["taskId"] for task in response.json()["tasks"]]
    return task_id


def set_agent_status(stack: Stack, agent: AgentClient, status: str) -> None:
    with stack.runtime.engine.begin() as connection:
        connection.execute(
            update(Agent).where(col(Agent.id) == uuid.UUID(agent.id)).values(status=status)
        )


def set_task_status(stack: Stack, task_id: str, status: str) -> None:
    with stack.runtime.engine.begin() as connection:
        connection.execute(
            update(Task).where(col(Task.id) == uuid.UUID(task_id)).values(status=status)
        )


def view(operator: httpx.Client, task_id: str) -> dict[str, Any]:
    response = operator.get(f"/api/v1/tasks/{task_id}")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body
