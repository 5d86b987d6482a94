"""`stella simulate` against the real stack, and its statistics.

The simulator runs as a subprocess with no STELLA_* variables: it knows the
server only through its command line (URL, CA file, admin token or token file).
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from agent.client import CredentialsRefused
from agent.labels import parse_labels
from agent.simulate import (
    Histogram,
    SimAgent,
    SimOptions,
    Simulation,
    SimulationError,
    Stats,
    read_token_file,
)
from tests.conftest import ADMIN_TOKEN, Stack, mint_token
from tests.processes import STELLA


@dataclass
class Simulator:
    process: subprocess.Popen[bytes]
    stdout: Path
    stderr: Path

    def wait(self, timeout: float) -> dict[str, Any]:
        """Wait for the exit; the --json summary."""
        try:
            code = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            raise AssertionError(f"simulate did not stop:\n{self.stderr.read_text()}") from None
        assert code == 0, f"exit {code}:\n{self.stderr.read_text()}\n{self.stdout.read_text()}"
        summary: dict[str, Any] = json.loads(self.stdout.read_text())
        return summary

    def kill(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)


@pytest.fixture
def start_simulator(tmp_path: Path) -> Iterator[Any]:
    started: list[Simulator] = []

    def _start(*args: str, env: dict[str, str] | None = None) -> Simulator:
        clean = {k: v for k, v in os.environ.items() if not k.startswith("STELLA_")}
        stdout, stderr = tmp_path / f"sim-{len(started)}.out", tmp_path / f"sim-{len(started)}.err"
        with stdout.open("wb") as out, stderr.open("wb") as err:
            process = subprocess.Popen(
                [STELLA, "simulate", *args, "--json"],
                env={**clean, **(env or {})},
                stdout=out,
                stderr=err,
                start_new_session=True,
            )
        simulator = Simulator(process, stdout, stderr)
        started.append(simulator)
        return simulator

    yield _start
    for simulator in started:
        simulator.kill()


def online_agents(operator: httpx.Client, capability: str) -> list[dict[str, Any]]:
    response = operator.get(
        "/api/v1/agents", params={"capability": capability, "status": "online", "limit": 1000}
    )
    assert response.status_code == 200, response.text
    agents: list[dict[str, Any]] = response.json()
    return agents


def wait_online(operator: httpx.Client, capability: str, count: int, sim: Simulator) -> None:
    deadline = time.monotonic() + 15
    while len(online_agents(operator, capability)) < count:
        assert sim.process.poll() is None, sim.stderr.read_text()
        assert time.monotonic() < deadline, sim.stderr.read_text()
        time.sleep(0.1)


def dispatch_and_wait(operator: httpx.Client, capability: str, count: int) -> list[dict[str, Any]]:
    """A selector dispatch to `capability`; the finished views of its `count` tasks."""
    response = operator.post(
        "/api/v1/tasks",
        json={
            "taskType": "docker.pull",
            "payload": {"image": "sim"},
            "target": {"capability": capability},
        },
    )
    assert response.status_code == 202, response.text
    dispatch_id = response.json()["dispatchId"]
    deadline = time.monotonic() + 15
    while True:
        view = operator.get(f"/api/v1/dispatches/{dispatch_id}").json()
        if view["status"] == "done":
            break
        assert time.monotonic() < deadline, view
        time.sleep(0.1)
    task_ids = [task["taskId"] for task in view["tasks"]]
    assert len(task_ids) == count, view
    finished: list[dict[str, Any]] = []
    for task_id in task_ids:
        while True:
            task = operator.get(f"/api/v1/tasks/{task_id}").json()
            if task["status"] not in ("pending", "assigned", "running"):
                finished.append(task)
                break
            assert time.monotonic() < deadline, task
            time.sleep(0.05)
    return finished


@pytest.mark.slow
def test_twenty_agents_register_heartbeat_and_complete_a_dispatch(
    stack: Stack, operator: httpx.Client, start_simulator: Any
) -> None:
    simulator = start_simulator(
        "--server", stack.base_url, "--ca", str(stack.ca_file),
        "--agents", "20", "--duration", "6", "--heartbeat-interval", "1",
        "--capability", "simcap", "--label", "site=sim", "--name-prefix", "sim-",
        "--report-every", "1",
        env={"STELLA_ADMIN_TOKEN": ADMIN_TOKEN},
    )  # fmt: skip
    wait_online(operator, "simcap", 20, simulator)

    tasks = dispatch_and_wait(operator, "simcap", 20)

    assert {task["status"] for task in tasks} == {"succeeded"}, tasks
    assert all(task["result"] == {"simulated": True} for task in tasks)
    summary = simulator.wait(timeout=20)
    agents = online_agents(operator, "simcap")
    assert len(agents) == 20
    assert sorted(agent["name"] for agent in agents) == sorted(f"sim-{i}" for i in range(1, 21))
    assert all(agent["labels"] == {"site": "sim"} for agent in agents)
    assert summary["agents"] == summary["registered"] == 20
    assert summary["registrationFailed"] == summary["registrationPending"] == 0
    assert summary["stopped"] == 0
    beats = summary["heartbeats"]
    assert beats["ok"] > 0
    assert beats["sent"] == beats["ok"] + beats["failed"]
    # About 6 s at 1 s ± 10 % per agent: 5 rounds each, at least 2 on a loaded machine.
    assert beats["ok"] >= 20 * 2, summary
    assert 0 < beats["latencyMs"]["p50"] <= beats["latencyMs"]["p99"] <= beats["latencyMs"]["max"]
    assert summary["tasks"] == {"received": 20, "completed": 20, "failed": 0, "unfinished": 0}
    assert summary["errors"] == 0, summary["errorKinds"]
    live = simulator.stderr.read_text()
    assert "agents 20/20 registered" in live
    assert "tasks 20 received 20 completed" in live


@pytest.mark.slow
def test_stream_delivery_token_file_and_a_deleted_agent(
    stack: Stack, operator: httpx.Client, start_simulator: Any, tmp_path: Path
) -> None:
    """Heartbeats every 60 s: only the task stream can deliver during the run; stopped by
    SIGINT (Ctrl-C) rather than --duration."""
    token_file = tmp_path / "tokens"
    token_file.write_text("# minted for the test\n" + "".join(
        f"{mint_token(operator)}\n" for _ in range(3)
    ))  # fmt: skip
    simulator = start_simulator(
        "--server", stack.base_url, "--ca", str(stack.ca_file), "--token-file", str(token_file),
        "--agents", "3", "--heartbeat-interval", "60", "--stream",
        "--report-every", "0.3",
        "--task-seconds", "0.2", "--capability", "streamcap", "--name-prefix", "st-",
    )  # fmt: skip
    wait_online(operator, "streamcap", 3, simulator)
    deadline = time.monotonic() + 10
    while "streams 3" not in simulator.stderr.read_text():
        assert time.monotonic() < deadline, simulator.stderr.read_text()
        time.sleep(0.1)

    # Direct dispatches: created by the web process, pushed to the open streams at once.
    agent_ids = [agent["id"] for agent in online_agents(operator, "streamcap")]
    task_ids = []
    for agent_id in agent_ids:
        response = operator.post(
            "/api/v1/tasks",
            json={
                "taskType": "docker.pull",
                "payload": {"image": "s"},
                "target": {"agentId": agent_id},
            },
        )
        assert response.status_code == 201, response.text
        task_ids.append(response.json()["tasks"][0]["taskId"])
    deadline = time.monotonic() + 10
    for task_id in task_ids:
        while (task := operator.get(f"/api/v1/tasks/{task_id}").json())["status"] != "succeeded":
            assert task["status"] in ("pending", "assigned", "running"), task
            assert time.monotonic() < deadline, (task, simulator.stderr.read_text())
            time.sleep(0.05)
        assert task["result"] == {"simulated": True}

    deleted = agent_ids[0]
    assert operator.delete(f"/api/v1/agents/{deleted}").status_code == 200
    deadline = time.monotonic() + 10
    while "1 stopped)" not in simulator.stderr.read_text():
        assert time.monotonic() < deadline, simulator.stderr.read_text()
        time.sleep(0.1)
    # No --duration: it runs until Ctrl-C, then prints its summary and exits 0.
    simulator.process.send_signal(signal.SIGINT)
    summary = simulator.wait(timeout=20)

    assert summary["registered"] == 3
    assert summary["stopped"] == 1, summary
    assert summary["tasks"]["completed"] == 3
    assert summary["streamConnects"] >= 3
    assert summary["heartbeats"]["ok"] == 3  # the first round only
    # The stream noticed the delete (4401) and stopped that agent, nothing else failed.
    assert summary["errorKinds"] == {"task stream closed: 4401 agent deleted": 1}, summary


def test_statistics_and_inputs(tmp_path: Path) -> None:
    histogram = Histogram()
    for millis in range(1, 101):
        histogram.record(millis / 1000)
    p50, p99 = histogram.quantile(0.5), histogram.quantile(0.99)
    assert p50 is not None
    assert p99 is not None
    assert 0.050 <= p50 <= 0.050 * 1.03
    assert 0.099 <= p99 <= 0.100
    assert Histogram().quantile(0.5) is None

    stats = Stats(agents=2)
    stats.heartbeat(0.01, ok=True)
    stats.heartbeat(0.5, ok=False)
    summary = stats.summary()
    assert summary["heartbeats"]["sent"] == 2
    assert summary["heartbeats"]["failed"] == 1
    assert summary["heartbeats"]["latencyMs"]["max"] == 10.0
    assert "2 sent 1 ok 1 failed" in stats.line()
    assert "(-)" in stats.line()  # the window was reset by the previous line

    assert parse_labels(["a=b", "c=d=e"]) == {"a": "b", "c": "d=e"}
    with pytest.raises(ValueError, match="'nope' is not key=value"):
        parse_labels(["nope"])
    tokens = tmp_path / "tokens"
    tokens.write_text("# comment\none\n\ntwo\nthree\n")
    assert read_token_file(tokens, 2) == ["one", "two"]
    with pytest.raises(SimulationError, match="holds 3 token"):
        read_token_file(tokens, 4)


def test_heartbeats_retry_transient_errors_deliver_tasks_and_stop_on_401() -> None:
    """One agent's loop against a scripted server: 503, 503, tasks, ..., 401."""
    answers = iter([503, 503, 200, 200, 401])
    completed: list[str] = []

    def server(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/heartbeat"):
            status = next(answers)
            tasks = [{"taskId": "t-1", "taskType": "x", "payload": {}}] if status == 200 else []
            return httpx.Response(status, json={"tasks": tasks})
        assert request.url.path == "/api/v1/agents/a-1/tasks/t-1/complete"
        assert json.loads(request.content) == {"success": True, "result": {"simulated": True}}
        completed.append("t-1")
        return httpx.Response(200, json={"acknowledged": True})

    async def scenario() -> Stats:
        options = SimOptions(server="https://sim.invalid", agents=1, admin_token="unused")
        simulation = Simulation(options, out=io.StringIO())
        agent = SimAgent(simulation, 1)
        agent.agent_id, agent.interval = "a-1", 0.05
        agent.http = httpx.AsyncClient(
            base_url=options.server, transport=httpx.MockTransport(server)
        )
        try:
            with pytest.raises(CredentialsRefused, match="heartbeat 401"):
                await agent._heartbeat_loop()
            await asyncio.gather(*agent.handlers)
        finally:
            await agent.aclose()
            await simulation.aclose()
        return simulation.stats

    stats = asyncio.run(scenario())
    assert (stats.heartbeats_sent, stats.heartbeats_ok, stats.heartbeats_failed) == (5, 2, 3)
    # The same task in two answers is taken and completed once.
    assert (stats.tasks_received, stats.tasks_completed) == (1, 1)
    assert completed == ["t-1"]
    assert stats.errors == {"heartbeat 503": 2}
