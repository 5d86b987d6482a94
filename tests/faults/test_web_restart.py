"""The web process killed under open task streams, then started again.

Two real agents (`stella agent run`) hold streams to `stella serve --tls`;
one is in the middle of a task when the web process is killed outright
(SIGKILL: no goodbye, no flush). Once it is back on the same address, both
agents reconnect by themselves, the interrupted task's completion and logs
arrive, and a new task reaches the other agent. Nothing an agent held is
lost.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.agent.helpers import AgentRunner, install_fake_docker
from tests.conftest import ADMIN_TOKEN, free_port, mint_token
from tests.processes import StellaProcess
from tests.stream.helpers import SharedBackend, client_context, shared_backend, wait_healthy

pytestmark = pytest.mark.slow

TASK_SECONDS = 4  # the interrupted task outlives the web process's absence
DOWN_SECONDS = 2


@dataclass
class Web:
    backend: SharedBackend
    port: int
    tmp: Path
    process: StellaProcess | None = None

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def ca_file(self) -> Path:
        return self.backend.settings.resolved_pki_dir / "ca.pem"

    def start(self) -> None:
        log = self.tmp / "web.log"
        args = ("serve", "--tls", "--port", str(self.port))
        self.process = StellaProcess(*args, env=self.backend.env, log=log).start()
        wait_healthy(self.url, self.ca_file, self.process, timeout=60)

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()

    def operator(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.url,
            verify=client_context(self.ca_file),
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
            timeout=10,
        )


@pytest.fixture
def web(tmp_path: Path) -> Iterator[Web]:
    with shared_backend(tmp_path, "webrestart", heartbeat_interval=1) as backend:
        server = Web(backend, free_port(), tmp_path)
        server.start()
        try:
            yield server
        finally:
            if server.process is not None:
                server.process.stop()


def dispatch_pull(operator: httpx.Client, agent_id: str, image: str) -> str:
    response = operator.post(
        "/api/v1/tasks",
        json={
            "taskType": "docker.pull",
            "payload": {"image": image},
            "timeout": 120,
            "target": {"agentId": agent_id},
        },
    )
    assert response.status_code == 201, response.text
    task_id: str = response.json()["tasks"][0]["taskId"]
    return task_id


def wait_task(web: Web, task_id: str, statuses: set[str], timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        with web.operator() as operator:
            view: dict[str, Any] = operator.get(f"/api/v1/tasks/{task_id}").json()
        if view["status"] in statuses:
            return view
        assert time.monotonic() < deadline, f"task stuck in {view['status']}: {view}"
        time.sleep(0.2)


def wait_connections(process: StellaProcess, count: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while process.output().count("task stream connected") < count:
        assert time.monotonic() < deadline, process.output()
        time.sleep(0.1)


def runner(web: Web, tmp: Path, name: str) -> AgentRunner:
    (tmp / name).mkdir()
    return AgentRunner(web.url, web.ca_file, tmp / name, install_fake_docker(tmp / name), name=name)


def test_agents_reconnect_and_nothing_they_held_is_lost(web: Web, tmp_path: Path) -> None:
    busy, idle = runner(web, tmp_path, "busy"), runner(web, tmp_path, "idle")
    try:
        with web.operator() as operator:
            busy_process = busy.start(
                token=mint_token(operator), FAKE_DOCKER_SLEEP=str(TASK_SECONDS)
            )
            idle_process = idle.start(token=mint_token(operator))
            wait_connections(busy_process, 1, 30)
            wait_connections(idle_process, 1, 30)
            held = dispatch_pull(operator, busy.agent_id, "team/held")
        deadline = time.monotonic() + 15
        while not busy.fake.pids_started():  # the task is running on the agent
            assert time.monotonic() < deadline, busy_process.output()
            time.sleep(0.05)

        web.kill()
        time.sleep(DOWN_SECONDS)
        web.start()

        wait_connections(busy_process, 2, 30)
        wait_connections(idle_process, 2, 30)
        view = wait_task(web, held, {"succeeded", "failed"}, timeout=60)
        assert view["status"] == "succeeded", view
        messages = [line["message"] for line in view["logs"]]
        assert "a1b2c3: Pull complete" in messages, messages

        with web.operator() as operator:
            after = dispatch_pull(operator, idle.agent_id, "team/after")
        assert wait_task(web, after, {"succeeded", "failed"}, timeout=30)["status"] == "succeeded"
        for process in (busy_process, idle_process):
            assert process.process is not None
            assert process.process.poll() is None, process.output()
            assert "Traceback" not in process.output()
    finally:
        busy.close()
        idle.close()
