"""Outcome unknown end to end: the real agent killed mid `docker.run`, restarted, reports.

A server with STELLA_OUTCOME_UNKNOWN on and a one-second heartbeat; the agent
is `stella agent run` with the fake docker (tests/agent/helpers.py), whose
`run` creates its container before it sleeps, as the daemon would. The
offline sweep is called directly, as beat would call it.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from app.cli.main import cli
from app.db import transaction
from app.sweeps import service as sweeps
from tests.agent.helpers import AgentRunner, install_fake_docker
from tests.agent.test_end_to_end import wait_task
from tests.conftest import Stack, mint_token, operator_client, start_stack, truncate

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def lossy_stack(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    yield from start_stack(
        tmp_path_factory.mktemp("outcome-unknown"),
        database_url,
        worker=False,
        outcome_unknown=True,
        heartbeat_interval=1,
        offline_after_missed=2,
    )


@pytest.fixture
def operator(lossy_stack: Stack) -> Iterator[httpx.Client]:
    truncate(lossy_stack.runtime)
    with operator_client(lossy_stack) as client:
        yield client


@pytest.fixture
def agent(lossy_stack: Stack, tmp_path: Path) -> Iterator[AgentRunner]:
    runner = AgentRunner(
        lossy_stack.base_url, lossy_stack.ca_file, tmp_path, install_fake_docker(tmp_path)
    )
    yield runner
    runner.close()


def sweep_until_offline(stack: Stack, agent_id: str, timeout: float = 15) -> None:
    """Run the offline sweep as beat would, until it marks the agent."""
    deadline = time.monotonic() + timeout
    while True:
        with transaction(stack.runtime.engine) as session:
            marked = sweeps.mark_offline(
                session=session, settings=stack.settings, notifier=stack.runtime.notifier
            )
        if uuid.UUID(agent_id) in marked:
            return
        assert time.monotonic() < deadline, "the agent was never marked offline"
        time.sleep(0.5)


def docker_calls(agent: AgentRunner, command: str) -> list[dict[str, Any]]:
    return [call for call in agent.fake.calls() if call["argv"][0] == command]


def test_an_agent_killed_mid_docker_run_turns_unknown_into_the_real_outcome(
    lossy_stack: Stack, operator: httpx.Client, agent: AgentRunner, tmp_path: Path
) -> None:
    first = agent.start(token=mint_token(operator), FAKE_DOCKER_SLEEP="60")
    first.wait_for("task stream connected")
    response = operator.post(
        "/api/v1/tasks",
        json={
            "taskType": "docker.run",
            "payload": {"image": "team/web", "tag": "1.4.2"},
            "timeout": 120,
            "target": {"agentId": agent.agent_id},
        },
    )
    assert response.status_code == 201, response.text
    task_id = response.json()["tasks"][0]["taskId"]
    wait_task(operator, task_id, {"running"})
    deadline = time.monotonic() + 10
    while not agent.fake.pids_started():  # docker run is under way: the container exists
        assert time.monotonic() < deadline, first.output()
        time.sleep(0.05)
    first.kill()  # SIGKILL mid-run: no report

    sweep_until_offline(lossy_stack, agent.agent_id)
    lost = operator.get(f"/api/v1/tasks/{task_id}").json()
    assert lost["status"] == "unknown", lost
    listed = operator.get("/api/v1/tasks", params={"status": "unknown"}).json()
    assert [item["taskId"] for item in listed] == [task_id]

    second = agent.start()
    second.wait_for("task stream connected")
    view = wait_task(operator, task_id, {"succeeded", "failed"})

    # The real outcome, read from the container the run left, not re-run.
    assert view["status"] == "succeeded", view
    assert view["result"] == {"containerId": "c0ffee" * 4}
    assert view["error"] is None
    assert any("not re-run" in line["message"] for line in view["logs"])
    [run] = docker_calls(agent, "run")
    assert f"stella.task={task_id}" in run["argv"]
    assert len(docker_calls(agent, "ps")) == 1
    assert operator.get(f"/api/v1/agents/{agent.agent_id}").json()["status"] == "online"
    assert operator.get("/api/v1/tasks", params={"status": "unknown"}).json() == []
    time.sleep(1.5)  # heartbeats and polls meanwhile hand nothing out again
    assert len(docker_calls(agent, "run")) == 1
    assert "never started" not in second.output()

    # The settled outcome is signed like any other: a receipt that verifies offline.
    answer = operator.get(f"/api/v1/tasks/{task_id}/receipt")
    assert answer.status_code == 200, answer.text
    document = answer.json()
    assert document["receipt"]["outcome"] == "succeeded"
    assert document["receipt"]["startedAt"] < document["receipt"]["finishedAt"]
    saved = tmp_path / "receipt.json"
    saved.write_text(json.dumps(document))
    verified = CliRunner().invoke(cli, ["receipts", "verify", str(saved)])
    assert verified.exit_code == 0, verified.output
    assert verified.output.startswith("valid: ")
