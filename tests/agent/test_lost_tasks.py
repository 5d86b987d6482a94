"""agent/lost_tasks.py and `docker.run`'s `find_run`: what a restarted agent reports.

With the fake docker of tests/agent/helpers.py, whose `run` keeps the
container it creates and whose `ps` lists them by label.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest

from agent.executors import Executors
from agent.executors.base import Outcome, Task
from agent.executors.docker import _judge, find_run
from agent.lost_tasks import INTERRUPTED, NEVER_STARTED, interrupted_outcome, settle_interrupted
from agent.state import StateDir
from tests.agent.helpers import FakeDocker, install_fake_docker
from tests.agent.test_runner import ScriptedClient, build, run_until, wire_task

CONTAINER = "c0ffee" * 4


@pytest.fixture
def docker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeDocker:
    fake = install_fake_docker(tmp_path)
    monkeypatch.setenv("PATH", f"{fake.bin_dir}:/usr/bin:/bin")
    monkeypatch.delenv("FAKE_DOCKER_SLEEP", raising=False)
    monkeypatch.delenv("FAKE_DOCKER_FAIL", raising=False)
    return fake


class _Quiet:
    async def progress(self, percent: int | None, message: str | None = None) -> None:
        return None

    async def log(self, level: str, message: str) -> None:
        return None


def docker_run(task_id: str, *, detach: bool = True) -> Outcome:
    job = Task(task_id=task_id, task_type="docker.run", payload={"image": "web", "detach": detach})
    return asyncio.run(Executors.default(allow_shell=False).execute(job, _Quiet()))


def test_a_run_labels_its_container_and_is_found_by_it(docker: FakeDocker) -> None:
    assert docker_run("task-1").success
    [run] = docker.calls()
    assert run["argv"][run["argv"].index("--label") + 1] == "stella.task=task-1"

    assert asyncio.run(find_run("task-1")) == Outcome.ok({"containerId": CONTAINER})
    missing = asyncio.run(find_run("task-2"))
    assert missing is not None
    assert not missing.success
    assert missing.error is not None
    assert "no container is labelled with this task" in missing.error


@pytest.mark.parametrize(
    ("state", "status", "detached", "success", "result"),
    [
        ("running", "Up 3 minutes", True, True, {}),
        ("exited", "Exited (137) 1 minute ago", True, True, {}),  # started: the run succeeded
        ("created", "Created", True, False, {}),
        ("exited", "Exited (0) 2 seconds ago", False, True, {"exitCode": 0}),
        ("exited", "Exited (3) 2 seconds ago", False, False, {"exitCode": 3}),
        ("running", "Up 3 minutes", False, False, {}),  # nobody waits for its exit code
    ],
)
def test_the_container_decides(
    state: str, status: str, detached: bool, success: bool, result: dict[str, int]
) -> None:
    outcome = _judge("abc", state, status, detached=detached)
    assert outcome.success is success
    assert outcome.result == {"containerId": "abc", **result}
    if not success:
        assert outcome.error


def test_without_docker_the_interruption_is_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no docker here
    outcome = asyncio.run(interrupted_outcome("task-1", "docker.run"))
    assert outcome == {"success": False, "error": INTERRUPTED, "logs": []}


def test_settle_gives_each_interrupted_task_its_outcome_once(
    tmp_path: Path, docker: FakeDocker
) -> None:
    run_id, pull_id, done_id = (str(uuid.uuid4()) for _ in range(3))
    assert docker_run(run_id).success  # the container a killed agent's run left
    state = StateDir(tmp_path / "state")
    state.ensure()
    state.hold_task(run_id, "docker.run")
    state.hold_task(pull_id, "docker.pull")
    kept = {"success": True, "result": {"x": 1}, "logs": []}
    state.finish_task(done_id, kept)

    asyncio.run(settle_interrupted(state))

    held = {task_id: record["outcome"] for task_id, record in state.held_tasks().items()}
    assert held[done_id] == kept
    assert held[pull_id] == {"success": False, "error": INTERRUPTED, "logs": []}
    run = held[run_id]
    assert (run["success"], run["result"]) == (True, {"containerId": CONTAINER})
    assert "not re-run" in run["logs"][0]["message"]
    assert [call["argv"][0] for call in docker.calls()] == ["run", "ps"]

    asyncio.run(settle_interrupted(state))  # settled already: docker is not asked again
    assert len(docker.calls()) == 2


def test_an_unknown_task_never_started_here_is_reported_not_run(tmp_path: Path) -> None:
    client = ScriptedClient()
    runner, state = build(tmp_path, client)
    lost = {**wire_task("never"), "status": "unknown"}
    held = {**wire_task("held"), "status": "unknown"}
    state.finish_task(held["taskId"], {"success": True, "result": {"x": 2}, "logs": []})
    client.open = [lost, held]

    async def scenario() -> None:
        await (await run_until(runner, lambda: len(client.completions) == 2))

    asyncio.run(scenario())
    outcomes = dict(client.completions)
    assert outcomes[lost["taskId"]] == {"success": False, "error": NEVER_STARTED, "logs": []}
    assert outcomes[held["taskId"]] == {"success": True, "result": {"x": 2}, "logs": []}
    assert state.held_tasks() == {}
