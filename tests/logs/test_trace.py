"""One request id finds a dispatch in every process's logs, and no secret is in any of them.

Real processes: `stella serve --tls`, a Celery worker on Redis, and a real
agent (`stella agent run`) holding its task stream. An operator dispatches
to a selector with its own `X-Request-ID`; the web process logs the call and
the delivery on the stream, the worker the fan-out (the id reached it in the
job's message header and in the dispatch row), and the completion is logged
under it too. Every line of every log is one JSON object.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ADMIN_TOKEN, free_port, mint_token
from tests.faults.test_web_restart import Web, runner, wait_task
from tests.processes import StellaProcess, start_worker
from tests.stream.helpers import shared_backend

pytestmark = pytest.mark.slow

REQUEST_ID = "deploy-4711.trace"
CANARY = "canary-7f3a9c0e5b21d84f"


def json_lines(process: StellaProcess) -> list[dict[str, Any]]:
    """Every line of the process's output, each parsed as one JSON object."""
    lines = []
    for raw in process.output().splitlines():
        if raw.strip():
            try:
                lines.append(json.loads(raw))
            except json.JSONDecodeError as exc:
                raise AssertionError(f"not a JSON log line: {raw!r}") from exc
    return lines


def traced(lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [line for line in lines if line.get("request_id") == REQUEST_ID]


@pytest.fixture
def web(tmp_path: Path) -> Iterator[Web]:
    with shared_backend(tmp_path, "trace", heartbeat_interval=1) as backend:
        server = Web(backend, free_port(), tmp_path)
        server.start()
        worker = start_worker(backend.settings, tmp_path / "worker.log", name="trace")
        server.worker = worker  # type: ignore[attr-defined]
        try:
            yield server
        finally:
            worker.stop()
            if server.process is not None:
                server.process.stop()


def test_a_dispatch_is_followed_by_its_request_id_across_processes(
    web: Web, tmp_path: Path
) -> None:
    agent = runner(web, tmp_path, "traced")
    try:
        with web.operator() as operator:
            token = mint_token(operator)
            process = agent.start(token=token)
            process.wait_for("task stream connected", timeout=60)
            response = operator.post(
                "/api/v1/tasks",
                json={
                    "taskType": "docker.pull",
                    "payload": {"image": "registry.local/app:1"},
                    "credentials": {"password": CANARY},
                    "timeout": 60,
                    "target": {"capability": "docker"},
                },
                headers={"X-Request-ID": REQUEST_ID},
            )
            assert response.status_code == 202, response.text
            assert response.headers["X-Request-ID"] == REQUEST_ID
            dispatch_id = response.json()["dispatchId"]
            deadline = time.monotonic() + 30
            while not (tasks := operator.get(f"/api/v1/dispatches/{dispatch_id}").json()["tasks"]):
                assert time.monotonic() < deadline
                time.sleep(0.1)
        task_id = tasks[0]["taskId"]
        outcome = wait_task(web, task_id, {"succeeded", "failed"}, timeout=60)["status"]
        time.sleep(0.5)  # the completion's log line follows its answer

        assert web.process is not None
        web_lines = json_lines(web.process)
        worker_lines = json_lines(web.worker)  # type: ignore[attr-defined]
        assert {line["service"] for line in web_lines} == {"web"}
        assert {line["service"] for line in worker_lines} == {"worker"}

        in_web = traced(web_lines)
        messages = {line["msg"] for line in in_web}
        assert "dispatch accepted" in messages, in_web
        access = [line for line in in_web if line["logger"] == "uvicorn.access"]
        assert any(line["path"] == "/api/v1/tasks" and line["status"] == 202 for line in access)
        delivered = [line for line in in_web if line["msg"] == "task delivered"]
        assert [(line["task_id"], line["via"]) for line in delivered] == [(task_id, "stream")]
        completed = [line for line in in_web if line["msg"] == "task completed"]
        assert [(line["task_id"], line["status"]) for line in completed] == [(task_id, outcome)]

        in_worker = traced(worker_lines)
        expanded = [line for line in in_worker if line["msg"] == "dispatch expanded"]
        assert [(line["dispatch_id"], line["tasks"]) for line in expanded] == [(dispatch_id, 1)]
        # Celery's own line on the job's outcome: the id came in the message header.
        assert any(
            line["logger"].startswith("celery") and "succeeded" in line["msg"] for line in in_worker
        ), in_worker

        everything = web.process.output() + web.worker.output()  # type: ignore[attr-defined]
        for secret in (CANARY, ADMIN_TOKEN, token):
            assert secret not in everything
    finally:
        agent.close()
