"""agent/runner.py: the main loop against a scripted client (no server).

The end-to-end tests cover the real wire; these pin the loop's own rules:
polling while the stream is down, one run per task whatever the channel,
outcomes kept until acknowledged, interrupted tasks reported on restart,
renewals, and stopping when the credentials are refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from agent.client import AgentClient, CredentialsRefused, ServerUnavailable, TaskStream
from agent.executors import Executors
from agent.executors.base import Executor, Outcome, Reporter, Task
from agent.runner import Options, Runner, TaskReporter, backoff_delay
from agent.state import Identity, StateDir
from tests.agent.helpers import certificate_for


class Echo(Executor):
    task_type = "echo"

    async def run(self, task: Task, report: Reporter) -> Outcome:
        await report.progress(50, "half way")
        await report.log("info", f"echo {task.payload.get('text')}")
        return Outcome.ok({"text": task.payload.get("text")})


class ScriptedClient(AgentClient):
    """The agent's client with the server replaced by a script (the stream is always down)."""

    def __init__(self) -> None:  # no super(): no server, no TLS
        self.heartbeat_answers: list[dict[str, Any] | Exception] = []
        self.open: list[dict[str, Any]] = []
        self.completions: list[tuple[str, dict[str, Any]]] = []
        self.complete_failures = 0
        self.stream_attempts = 0
        self.reloads = 0

    async def heartbeat(self, body: dict[str, Any]) -> dict[str, Any]:
        if self.heartbeat_answers:
            answer = self.heartbeat_answers.pop(0)
            if isinstance(answer, Exception):
                raise answer
            return answer
        return {"tasks": []}

    async def open_tasks(self) -> list[dict[str, Any]]:
        done = {task_id for task_id, _ in self.completions}
        return [task for task in self.open if task["taskId"] not in done]

    async def complete(self, task_id: str, body: dict[str, Any]) -> None:
        if self.complete_failures:
            self.complete_failures -= 1
            raise ServerUnavailable("connection refused")
        self.completions.append((task_id, body))

    @contextlib.asynccontextmanager
    async def stream(self) -> AsyncIterator[TaskStream]:
        self.stream_attempts += 1
        raise ServerUnavailable("stream refused")
        yield  # pragma: no cover

    def reload_tls(self) -> None:
        self.reloads += 1

    async def aclose(self) -> None:
        return None


def wire_task(text: str = "hi", task_type: str = "echo") -> dict[str, Any]:
    return {
        "taskId": str(uuid.uuid4()),
        "taskType": task_type,
        "payload": {"text": text},
        "timeout": 30,
        "priority": 0,
    }


def make_state(tmp_path: Path) -> tuple[StateDir, Identity]:
    state = StateDir(tmp_path / "state")
    state.ensure()
    key = state.load_or_create_key()
    identity = state.save_registration(
        server="https://stella.invalid",
        name="edge-1",
        registration={
            "agentId": str(uuid.uuid4()),
            "token": "jwt",
            # Fast loops for the test; the heartbeat stays out of the way.
            "config": {"heartbeatInterval": 3600, "taskPollInterval": 0.05},
            "certificate": {"cert": certificate_for(key), "ca": certificate_for(key)},
        },
    )
    return state, identity


async def run_until(
    runner: Runner, done: Callable[[], bool], *, timeout: float = 10
) -> Awaitable[int]:
    """Start the runner, wait for `done()`, ask it to stop; its run() to await."""
    running = asyncio.create_task(runner.run())
    deadline = asyncio.get_running_loop().time() + timeout
    while not done():
        assert not running.done(), "the runner stopped early"
        assert asyncio.get_running_loop().time() < deadline, "condition never met"
        await asyncio.sleep(0.02)
    runner.request_stop()
    return running


def build(
    tmp_path: Path, client: ScriptedClient, *, backoff_max: float = 60
) -> tuple[Runner, StateDir]:
    state, identity = make_state(tmp_path)
    options = Options(
        server="https://stella.invalid",
        state_dir=state.path,
        name="edge-1",
        backoff_max=backoff_max,
    )
    runner = Runner(
        options=options,
        identity=identity,
        state=state,
        client=client,
        executors=Executors([Echo()]),
    )
    return runner, state


def test_polls_while_the_stream_is_down_and_completes_with_all_logs(tmp_path: Path) -> None:
    client = ScriptedClient()
    task = wire_task("polled")
    client.open = [task]
    runner, state = build(tmp_path, client)

    async def scenario() -> int:
        return await (await run_until(runner, lambda: bool(client.completions)))

    assert asyncio.run(scenario()) == 0
    [(task_id, body)] = client.completions
    assert task_id == task["taskId"]
    assert body["success"] is True
    assert body["result"] == {"text": "polled"}
    # Nothing went over a stream, so every line travels with the completion.
    assert [line["message"] for line in body["logs"]] == ["echo polled"]
    assert client.stream_attempts >= 1
    assert state.held_tasks() == {}


def test_a_task_from_two_channels_runs_once(tmp_path: Path) -> None:
    client = ScriptedClient()
    task = wire_task("twice")
    client.open = [task]
    client.heartbeat_answers = [{"tasks": [task]}]
    runner, _ = build(tmp_path, client)

    async def scenario() -> None:
        running = await run_until(runner, lambda: bool(client.completions))
        await asyncio.sleep(0.3)  # more polls go by
        await running

    asyncio.run(scenario())
    assert [task_id for task_id, _ in client.completions] == [task["taskId"]]


def test_an_undelivered_outcome_is_kept_and_retried(tmp_path: Path) -> None:
    client = ScriptedClient()
    client.open = [wire_task("retry")]
    client.complete_failures = 2
    runner, state = build(tmp_path, client)

    async def scenario() -> None:
        await (await run_until(runner, lambda: bool(client.completions)))

    asyncio.run(scenario())
    assert len(client.completions) == 1
    assert state.held_tasks() == {}


def test_a_restart_reports_interrupted_and_stored_outcomes(tmp_path: Path) -> None:
    client = ScriptedClient()
    runner, state = build(tmp_path, client)
    interrupted, finished = str(uuid.uuid4()), str(uuid.uuid4())
    state.hold_task(interrupted, "docker.run")
    state.finish_task(finished, {"success": True, "result": {"x": 1}, "logs": []})

    async def scenario() -> None:
        await (await run_until(runner, lambda: len(client.completions) == 2))

    asyncio.run(scenario())
    outcomes = dict(client.completions)
    assert outcomes[finished] == {"success": True, "result": {"x": 1}, "logs": []}
    assert outcomes[interrupted]["success"] is False
    assert outcomes[interrupted]["error"].startswith("interrupted: the agent stopped")
    assert state.held_tasks() == {}


def test_a_renewal_for_our_key_is_applied(tmp_path: Path) -> None:
    client = ScriptedClient()
    runner, state = build(tmp_path, client)
    renewed = certificate_for(state.load_or_create_key(), cn="renewed")
    client.heartbeat_answers = [{"tasks": [], "certificateRenewal": {"cert": renewed}}]

    async def scenario() -> None:
        await (await run_until(runner, lambda: client.reloads == 1))

    asyncio.run(scenario())
    assert state.cert_file.read_text() == renewed


def test_a_renewal_for_another_key_is_refused(tmp_path: Path) -> None:
    client = ScriptedClient()
    runner, state = build(tmp_path, client)
    before = state.cert_file.read_text()
    stranger = certificate_for(ec.generate_private_key(ec.SECP256R1()))
    client.heartbeat_answers = [{"tasks": [], "certificateRenewal": {"cert": stranger}}]
    client.open = [wire_task("after")]

    async def scenario() -> None:
        await (await run_until(runner, lambda: bool(client.completions)))

    asyncio.run(scenario())
    assert state.cert_file.read_text() == before
    assert client.reloads == 0


def test_refused_credentials_stop_the_agent(tmp_path: Path) -> None:
    client = ScriptedClient()
    client.heartbeat_answers = [CredentialsRefused("heartbeat: 401 agent deleted")]
    runner, _ = build(tmp_path, client)
    assert asyncio.run(asyncio.wait_for(runner.run(), 10)) == 2
    assert runner.fatal == "heartbeat: 401 agent deleted"


def test_the_stream_is_retried_until_it_connects(tmp_path: Path) -> None:
    client = ScriptedClient()
    runner, _ = build(tmp_path, client, backoff_max=0.05)

    async def scenario() -> None:
        await (await run_until(runner, lambda: client.stream_attempts >= 4))

    asyncio.run(scenario())


def test_an_oversized_log_is_trimmed_to_the_newest_lines(tmp_path: Path) -> None:
    client = ScriptedClient()
    runner, _ = build(tmp_path, client)
    reporter = TaskReporter(runner, Task.from_wire(wire_task()))

    async def scenario() -> list[dict[str, str]]:
        for number in range(2000):
            await reporter.log("info", f"{number:04d} " + "x" * 1000)
        return await reporter.unconfirmed()

    lines = asyncio.run(scenario())
    assert sum(len(line["message"]) for line in lines) < 600 * 1024
    assert lines[0]["message"].startswith("[")
    assert "dropped by the agent" in lines[0]["message"]
    assert lines[-1]["message"].startswith("1999 ")


class Slow(Executor):
    task_type = "slow"

    async def run(self, task: Task, report: Reporter) -> Outcome:
        await asyncio.sleep(float(task.payload["seconds"]))
        return Outcome.ok({"slept": task.payload["seconds"]})


@pytest.mark.parametrize(
    ("seconds", "success"), [(0.3, True), (30, False)], ids=["finishes", "killed"]
)
def test_stopping_finishes_or_reports_running_tasks(
    tmp_path: Path, seconds: float, success: bool
) -> None:
    client = ScriptedClient()
    client.open = [{**wire_task(task_type="slow"), "payload": {"seconds": seconds}}]
    state, identity = make_state(tmp_path)
    runner = Runner(
        options=Options(
            server="https://stella.invalid", state_dir=state.path, name="e", shutdown_grace=1
        ),
        identity=identity,
        state=state,
        client=client,
        executors=Executors([Slow()]),
    )

    async def scenario() -> int:
        return await (await run_until(runner, lambda: bool(runner.executing)))

    assert asyncio.run(scenario()) == 0
    [(_, body)] = client.completions
    assert body["success"] is success
    if not success:
        assert body["error"] == (
            "the agent was stopped before the task finished; its process was killed"
        )


@pytest.mark.parametrize("attempt", [0, 1, 3, 10, 100])
def test_backoff_grows_with_jitter_up_to_the_cap(attempt: int) -> None:
    ceiling = min(60.0, 2.0**attempt)
    delays = {backoff_delay(attempt) for _ in range(50)}
    assert all(ceiling / 2 <= delay <= ceiling for delay in delays)
    assert len(delays) > 1  # jittered
