"""Signed tasks and receipts with the real agent process against a real server.

Tasks are altered the way an attacker with write access to the database would:
the row is written after (or without) the server's signature. The agent must
refuse them before any executor runs, and say so in the task's error.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.cli.receipts import check
from app.db import transaction
from app.tasks import service as tasks_service
from tests.agent.helpers import AgentRunner, install_fake_docker
from tests.agent.test_end_to_end import CREDENTIALS, dispatch_pull, wait_task
from tests.conftest import Stack, mint_token

pytestmark = pytest.mark.slow

STELLA = str(Path(sys.executable).with_name("stella"))


@pytest.fixture
def agent(stack: Stack, tmp_path: Path, operator: httpx.Client) -> Iterator[AgentRunner]:
    runner = AgentRunner(stack.base_url, stack.ca_file, tmp_path, install_fake_docker(tmp_path))
    process = runner.start(token=mint_token(operator))
    process.wait_for("task stream connected")
    yield runner
    runner.close()


def pinned_kids(agent: AgentRunner) -> list[str]:
    keys = json.loads((agent.state_dir / "task-signing-keys.json").read_text())["keys"]
    return [key["kid"] for key in keys]


def receipt(operator: httpx.Client, task_id: str) -> dict[str, Any]:
    response = operator.get(f"/api/v1/tasks/{task_id}/receipt")
    assert response.status_code == 200, response.text
    document: dict[str, Any] = response.json()
    return document


def plant_task(stack: Stack, agent_id: str, image: str, **change: Any) -> str:
    """A task written straight into the database: signed, then altered by `change`."""
    task = tasks_service.new_task(
        settings=stack.settings,
        cipher=stack.runtime.cipher,
        agent_id=uuid.UUID(agent_id),
        task_type="docker.pull",
        payload={"image": image},
        credentials=None,
        timeout=60,
        priority=0,
        task_keys=stack.runtime.task_keys,
    )
    for name, value in change.items():
        setattr(task, name, value)
    with transaction(stack.runtime.engine) as session:
        session.add(task)
        tasks_service.notify_created(
            session=session,
            notifier=stack.runtime.notifier,
            agent_id=task.agent_id,
            task_id=task.id,
        )
    return str(task.id)


def test_a_signed_task_runs_and_its_receipt_verifies_offline(
    agent: AgentRunner, stack: Stack, operator: httpx.Client
) -> None:
    assert pinned_kids(agent) == [key["kid"] for key in stack.runtime.task_keys.published()]
    task_id = dispatch_pull(operator, agent.agent_id, "team/signed")
    view = wait_task(operator, task_id, {"succeeded", "failed"})
    assert view["status"] == "succeeded", view
    document = receipt(operator, task_id)
    fields = check(document)
    assert (fields["taskId"], fields["agentId"], fields["outcome"]) == (
        task_id,
        agent.agent_id,
        "succeeded",
    )
    assert fields["resultDigest"].startswith("sha256:")
    assert fields["startedAt"] <= fields["finishedAt"]
    assert CREDENTIALS["registry.password"] not in json.dumps(document)


def test_an_altered_unsigned_or_unknown_key_task_is_refused_and_not_run(
    agent: AgentRunner, stack: Stack, operator: httpx.Client
) -> None:
    altered = plant_task(stack, agent.agent_id, "team/app", payload={"image": "evil/miner"})
    unsigned = plant_task(stack, agent.agent_id, "team/unsigned", signature=None)
    forged = plant_task(
        stack,
        agent.agent_id,
        "team/forged",
        signature={"alg": "Ed25519", "kid": "not-a-server-key", "value": "AAAA"},
    )
    errors = {}
    for task_id in (altered, unsigned, forged):
        view = wait_task(operator, task_id, {"succeeded", "failed"})
        assert view["status"] == "failed", view
        errors[task_id] = view["error"]
        # The refusal is the agent's signed statement too.
        assert check(receipt(operator, task_id))["outcome"] == "failed"
    assert (
        errors[altered]
        == "task signature invalid: the task does not match its signature (altered?)"
    )
    assert errors[unsigned] == "task signature invalid: the task is unsigned"
    assert errors[forged].startswith("task signature invalid: signed by key 'not-a-server-key'")
    assert agent.fake.calls() == []  # no executor ran

    # The agent still runs what the server did sign.
    task_id = dispatch_pull(operator, agent.agent_id, "team/after")
    assert wait_task(operator, task_id, {"succeeded", "failed"})["status"] == "succeeded"


def test_a_rotation_keeps_an_agent_registered_before_it_working(
    agent: AgentRunner, stack: Stack, operator: httpx.Client
) -> None:
    before = pinned_kids(agent)
    env = {key: value for key, value in os.environ.items() if not key.startswith("STELLA_")}
    rotated = subprocess.run(
        [STELLA, "keys", "rotate-task-signing", "--retire-after", "3600"],
        env={**env, "STELLA_DATA_DIR": str(stack.settings.data_dir)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert rotated.returncode == 0, rotated.stderr
    new_kid = stack.runtime.task_keys.signing_key().kid
    assert new_kid not in before
    assert new_kid in rotated.stdout

    task_id = dispatch_pull(operator, agent.agent_id, "team/rotated")
    view = wait_task(operator, task_id, {"succeeded", "failed"})
    assert view["status"] == "succeeded", view
    # Learnt over its own mutual-TLS channel; the old keys stay until they retire.
    assert new_kid in pinned_kids(agent)
    assert set(before) <= set(pinned_kids(agent))
