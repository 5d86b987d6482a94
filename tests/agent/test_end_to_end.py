"""The real agent process (`stella agent run`) against a real server and worker.

The agent is started as a subprocess with a fake `docker` on PATH (see
helpers.py) and no STELLA_* variables, so it knows only what its command line
and state directory tell it.
"""

from __future__ import annotations

import contextlib
import json
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509

from tests.agent.helpers import AgentRunner, alive, install_fake_docker, kill_quietly
from tests.conftest import Stack, mint_token, operator_client, start_stack

pytestmark = pytest.mark.slow

DIGEST = "sha256:" + "cd" * 32
PASSWORD = "e2e-registry-pa55word"
CREDENTIALS = {"registry.username": "deployer", "registry.password": PASSWORD}


@pytest.fixture
def agent(stack: Stack, tmp_path: Path) -> Iterator[AgentRunner]:
    runner = AgentRunner(stack.base_url, stack.ca_file, tmp_path, install_fake_docker(tmp_path))
    yield runner
    runner.close()


def dispatch_pull(operator: httpx.Client, agent_id: str, image: str) -> str:
    response = operator.post(
        "/api/v1/tasks",
        json={
            "taskType": "docker.pull",
            "payload": {"image": image, "digest": DIGEST},
            "credentials": CREDENTIALS,
            "timeout": 120,
            "target": {"agentId": agent_id},
        },
    )
    assert response.status_code == 201, response.text
    task_id: str = response.json()["tasks"][0]["taskId"]
    return task_id


def pem_serial(path: Path) -> int:
    return x509.load_pem_x509_certificate(path.read_bytes()).serial_number


def wait_task(
    operator: httpx.Client, task_id: str, statuses: set[str], timeout: float = 30
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        view: dict[str, Any] = operator.get(f"/api/v1/tasks/{task_id}").json()
        if view["status"] in statuses:
            return view
        assert time.monotonic() < deadline, f"task stuck in {view['status']}: {view}"
        time.sleep(0.1)


def test_registers_runs_a_pull_and_reports_it(
    agent: AgentRunner, stack: Stack, operator: httpx.Client
) -> None:
    process = agent.start(token=mint_token(operator))
    process.wait_for("task stream connected")

    detail = operator.get(f"/api/v1/agents/{agent.agent_id}").json()
    assert detail["status"] == "online"
    assert detail["capabilities"] == ["docker"]
    assert detail["labels"] == {"site": "lab"}
    for path in agent.state_dir.iterdir():
        if path.is_file():
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path

    task_id = dispatch_pull(operator, agent.agent_id, "registry.example.com/team/app")
    view = wait_task(operator, task_id, {"succeeded", "failed"})

    assert view["status"] == "succeeded", view
    assert view["result"] == {
        "image": f"registry.example.com/team/app@{DIGEST}",
        "imageId": "sha256:" + "1" * 64,
    }
    assert view["progress"] == 100
    messages = [line["message"] for line in view["logs"]]
    assert "logging in to registry.example.com" in messages
    assert messages.count("a1b2c3: Pull complete") == 1  # streamed once, not repeated
    login, pull, _ = agent.fake.calls()
    assert login["stdin"] == PASSWORD + "\n"
    assert pull["argv"] == ["pull", f"registry.example.com/team/app@{DIGEST}"]
    for call in agent.fake.calls():
        assert PASSWORD not in " ".join(call["argv"])
    assert PASSWORD not in process.output()
    assert PASSWORD not in json.dumps(view)

    # The heartbeat carries real usage figures.
    deadline = time.monotonic() + 10
    while not operator.get(f"/api/v1/agents/{agent.agent_id}").json()["resourceUsage"]:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    usage = operator.get(f"/api/v1/agents/{agent.agent_id}").json()["resourceUsage"]
    assert set(usage) == {"cpu", "memory", "disk"}

    # A type this agent does not run fails clearly instead of hanging.
    response = operator.post(
        "/api/v1/tasks",
        json={"taskType": "k8s.apply", "payload": {}, "target": {"agentId": agent.agent_id}},
    )
    assert response.status_code == 201, response.text
    unknown = wait_task(operator, response.json()["tasks"][0]["taskId"], {"succeeded", "failed"})
    assert unknown["status"] == "failed"
    assert unknown["error"].startswith("unknown task type 'k8s.apply'; this agent runs")

    # SIGTERM with nothing running: a clean exit.
    process.stop()
    assert process.process is not None
    assert process.process.returncode == 0, process.output()
    assert "agent stopped" in process.output()


def test_a_restart_reuses_the_identity_and_reports_the_interrupted_task(
    agent: AgentRunner, stack: Stack, operator: httpx.Client
) -> None:
    first = agent.start(token=mint_token(operator), FAKE_DOCKER_SLEEP="60")
    first.wait_for("task stream connected")
    agent_id = agent.agent_id
    task_id = dispatch_pull(operator, agent_id, "team/slow")
    wait_task(operator, task_id, {"running"})
    deadline = time.monotonic() + 10
    while not agent.fake.pids_started():
        assert time.monotonic() < deadline, first.output()
        time.sleep(0.05)
    first.kill()  # SIGKILL: no goodbye, no report

    # No token this time: the state directory is the identity.
    second = agent.start()
    second.wait_for("task stream connected")
    assert f"reusing identity {agent_id}" in second.output()
    assert agent.agent_id == agent_id
    view = wait_task(operator, task_id, {"succeeded", "failed"})
    assert view["status"] == "failed"
    assert view["error"].startswith("interrupted: the agent stopped while this task ran")

    # And it still works: a new task on the same identity.
    kill_quietly(agent.fake.pids_started())
    again = dispatch_pull(operator, agent_id, "team/fast")
    assert wait_task(operator, again, {"succeeded", "failed"})["status"] == "succeeded"


def test_sigterm_kills_a_task_past_the_grace_and_reports_it(
    agent: AgentRunner, stack: Stack, operator: httpx.Client
) -> None:
    process = agent.start(token=mint_token(operator), FAKE_DOCKER_SLEEP="60")
    process.wait_for("task stream connected")
    task_id = dispatch_pull(operator, agent.agent_id, "team/slow")
    wait_task(operator, task_id, {"running"})
    deadline = time.monotonic() + 10
    while not agent.fake.pids_started():
        assert time.monotonic() < deadline, process.output()
        time.sleep(0.05)

    process.stop()  # SIGTERM; --shutdown-grace 1

    assert process.process is not None
    assert process.process.returncode == 0, process.output()
    view = wait_task(operator, task_id, {"succeeded", "failed"}, timeout=5)
    assert view["status"] == "failed"
    assert view["error"] == (
        "the agent was stopped before the task finished; its process was killed"
    )
    assert "waiting" in [line["message"] for line in view["logs"]]
    [pid] = agent.fake.pids_started()
    assert not alive(pid)


def test_a_cancelled_task_kills_its_process(
    agent: AgentRunner, stack: Stack, operator: httpx.Client
) -> None:
    process = agent.start(token=mint_token(operator), FAKE_DOCKER_SLEEP="60")
    process.wait_for("task stream connected")
    task_id = dispatch_pull(operator, agent.agent_id, "team/slow")
    wait_task(operator, task_id, {"running"})
    deadline = time.monotonic() + 10
    while not agent.fake.pids_started():
        assert time.monotonic() < deadline, process.output()
        time.sleep(0.05)

    response = operator.post(f"/api/v1/tasks/{task_id}/cancel")
    assert response.status_code == 200, response.text

    [pid] = agent.fake.pids_started()
    deadline = time.monotonic() + 15
    while alive(pid):
        assert time.monotonic() < deadline, process.output()
        time.sleep(0.05)
    process.wait_for(f"task {task_id} cancelled")
    assert operator.get(f"/api/v1/tasks/{task_id}").json()["status"] == "cancelled"


def test_certificate_renewals_are_applied_and_used(
    stack: Stack, database_url: str, tmp_path: Path
) -> None:
    """A server whose certificates live 60 s with a 60 s window renews at every heartbeat."""
    serve = contextlib.contextmanager(start_stack)
    with (
        serve(
            tmp_path / "renewing",
            database_url,
            worker=False,
            cert_ttl=60,
            cert_renewal_window=60,
            heartbeat_interval=1,
        ) as renewing,
        operator_client(renewing) as operator,
    ):
        runner = AgentRunner(
            renewing.base_url, renewing.ca_file, tmp_path, install_fake_docker(tmp_path)
        )
        try:
            process = runner.start(token=mint_token(operator))
            process.wait_for("task stream connected")
            first_serial = operator.get(f"/api/v1/agents/{runner.agent_id}").json()["certificate"][
                "serial"
            ]
            cert_file = runner.state_dir / "cert.pem"
            # Renewed at every heartbeat (1 s): the file moves past what we just read.
            deadline = time.monotonic() + 15
            while format(pem_serial(cert_file), "x") == first_serial:
                assert time.monotonic() < deadline, process.output()
                time.sleep(0.1)
            # Logged just after the file is replaced: wait for it, not only for the file.
            process.wait_for("certificate renewed")
            assert stat.S_IMODE(cert_file.stat().st_mode) == 0o600

            # Calls made after the renewal, with the new certificate, still pass.
            task_id = dispatch_pull(operator, runner.agent_id, "team/app")
            assert wait_task(operator, task_id, {"succeeded", "failed"})["status"] == "succeeded"
            detail = operator.get(f"/api/v1/agents/{runner.agent_id}").json()
            assert detail["status"] == "online"
            assert detail["certificate"]["serial"] != first_serial
            assert "renewal not applied" not in process.output()
        finally:
            runner.close()


def test_a_deleted_agent_stops_with_a_clear_error(
    agent: AgentRunner, stack: Stack, operator: httpx.Client
) -> None:
    process = agent.start(token=mint_token(operator))
    process.wait_for("task stream connected")

    assert operator.delete(f"/api/v1/agents/{agent.agent_id}").status_code == 200

    assert process.process is not None
    assert process.process.wait(timeout=20) == 2, process.output()
    # Whichever call noticed first (stream 4401, heartbeat or poll 401), it is fatal.
    assert "ERROR stella.agent: agent stopped:" in process.output()
    assert "Traceback" not in process.output()


def test_a_dropped_stream_is_reconnected_and_no_line_is_lost(
    stack: Stack, database_url: str, tmp_path: Path
) -> None:
    """A server that allows 2 stream messages closes the agent's stream (1008) mid-task."""
    serve = contextlib.contextmanager(start_stack)
    with (
        serve(
            tmp_path / "strict",
            database_url,
            worker=False,
            stream_messages_per_second=0.5,
            stream_burst=2,
        ) as strict,
        operator_client(strict) as operator,
    ):
        runner = AgentRunner(
            strict.base_url, strict.ca_file, tmp_path, install_fake_docker(tmp_path)
        )
        try:
            process = runner.start(token=mint_token(operator))
            process.wait_for("task stream connected")
            task_id = dispatch_pull(operator, runner.agent_id, "team/app")
            view = wait_task(operator, task_id, {"succeeded", "failed"})

            assert view["status"] == "succeeded", view
            messages = [line["message"] for line in view["logs"]]
            for expected in ("Login Succeeded", "a1b2c3: Pull complete"):
                assert expected in messages
            process.wait_for("task stream closed: 1008")
            # Reconnected after a backoff (the stream may be cut again: the limit is tiny).
            deadline = time.monotonic() + 15
            while process.output().count("task stream connected") < 2:
                assert time.monotonic() < deadline, process.output()
                time.sleep(0.1)
        finally:
            runner.close()
