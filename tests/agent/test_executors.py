"""agent/executors: docker, compose and shell through real child processes.

`docker` is a fake executable on PATH (tests/agent/helpers.py) that records
its argv and stdin, so these tests see exactly what the agent runs.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from agent.executors import Executors
from agent.executors.base import Outcome, Task
from tests.agent.helpers import FakeDocker, alive, install_fake_docker, kill_quietly

DIGEST = "sha256:" + "ab" * 32
PASSWORD = "s3cr3t-registry-pa55"


class Recorder:
    """A Reporter that keeps what it is told."""

    def __init__(self) -> None:
        self.progress_seen: list[tuple[int | None, str | None]] = []
        self.lines: list[tuple[str, str]] = []

    async def progress(self, percent: int | None, message: str | None = None) -> None:
        self.progress_seen.append((percent, message))

    async def log(self, level: str, message: str) -> None:
        self.lines.append((level, message))


@pytest.fixture
def docker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeDocker:
    fake = install_fake_docker(tmp_path)
    monkeypatch.setenv("PATH", f"{fake.bin_dir}:/usr/bin:/bin")
    monkeypatch.delenv("FAKE_DOCKER_SLEEP", raising=False)
    monkeypatch.delenv("FAKE_DOCKER_FAIL", raising=False)
    return fake


def task(task_type: str, payload: dict[str, Any], **fields: Any) -> Task:
    return Task(task_id="t-1", task_type=task_type, payload=payload, **fields)


def execute(job: Task, *, allow_shell: bool = False) -> tuple[Outcome, Recorder]:
    recorder = Recorder()
    outcome = asyncio.run(Executors.default(allow_shell=allow_shell).execute(job, recorder))
    return outcome, recorder


CREDENTIALS = {"registry.username": "deployer", "registry.password": PASSWORD}


class TestDockerPull:
    def test_pulls_by_digest_with_the_password_on_stdin_only(self, docker: FakeDocker) -> None:
        outcome, recorder = execute(
            task(
                "docker.pull",
                {"image": "registry.example.com/team/app", "tag": "v2", "digest": DIGEST},
                credentials=CREDENTIALS,
            )
        )
        assert outcome.success, outcome.error
        assert outcome.result == {
            "image": f"registry.example.com/team/app@{DIGEST}",
            "imageId": "sha256:" + "1" * 64,
        }
        login, pull, inspect = docker.calls()
        assert login["argv"] == [
            "login",
            "--username",
            "deployer",
            "--password-stdin",
            "registry.example.com",
        ]
        assert login["stdin"] == PASSWORD + "\n"
        assert pull["argv"] == ["pull", f"registry.example.com/team/app@{DIGEST}"]
        assert inspect["argv"][:2] == ["image", "inspect"]
        for call in docker.calls():
            assert PASSWORD not in " ".join(call["argv"])
        assert all(PASSWORD not in message for _, message in recorder.lines)
        # Logged in to a private, throwaway DOCKER_CONFIG, removed afterwards.
        config = login["config"]
        assert config is not None
        assert {call["config"] for call in docker.calls()} == {config}
        assert not Path(config).exists()
        assert ("info", "a1b2c3: Pull complete") in recorder.lines
        assert recorder.progress_seen[-1][0] == 100

    def test_pulls_a_tag_without_logging_in(self, docker: FakeDocker) -> None:
        outcome, _ = execute(task("docker.pull", {"image": "nginx", "tag": "1.27"}))
        assert outcome.success
        calls = docker.calls()
        assert [call["argv"][0] for call in calls] == ["pull", "image"]
        assert calls[0]["argv"] == ["pull", "nginx:1.27"]
        assert calls[0]["config"] is None

    def test_docker_hub_is_the_default_registry(self, docker: FakeDocker) -> None:
        execute(task("docker.pull", {"image": "team/app"}, credentials=CREDENTIALS))
        assert docker.calls()[0]["argv"][-1] == "docker.io"

    def test_a_failed_pull_fails_the_task(
        self, docker: FakeDocker, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("FAKE_DOCKER_FAIL", "pull")
        outcome, recorder = execute(task("docker.pull", {"image": "nginx"}))
        assert not outcome.success
        assert (
            outcome.error
            == "docker pull nginx failed (exit 1): Error response from daemon: pull failed"
        )
        assert ("warning", "Error response from daemon: pull failed") in recorder.lines

    @pytest.mark.parametrize(
        ("payload", "error"),
        [
            ({"image": "--help"}, "is not an image name"),
            ({"image": "nginx", "digest": "md5:abc"}, "is not sha256:<64 hex digits>"),
            ({"image": "nginx@sha256:abc"}, "give a digest in payload.digest"),
            ({}, "payload.image is required"),
        ],
    )
    def test_a_bad_reference_fails_before_docker_runs(
        self, docker: FakeDocker, payload: dict[str, Any], error: str
    ) -> None:
        outcome, _ = execute(task("docker.pull", payload))
        assert not outcome.success
        assert outcome.error is not None
        assert error in outcome.error
        assert docker.calls() == []

    def test_half_a_credential_is_refused(self, docker: FakeDocker) -> None:
        outcome, _ = execute(
            task("docker.pull", {"image": "nginx"}, credentials={"registry.password": PASSWORD})
        )
        assert outcome.error == "credentials need both registry.username and registry.password"


class TestTimeoutAndCancel:
    def test_a_timeout_kills_the_child(
        self, docker: FakeDocker, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("FAKE_DOCKER_SLEEP", "60")
        started = time.monotonic()
        try:
            outcome, _ = execute(task("docker.pull", {"image": "nginx"}, timeout=1))
            assert time.monotonic() - started < 10
            assert not outcome.success
            assert outcome.error == "timed out after 1 s; the task's process was killed"
            [pid] = docker.pids_started()
            assert not alive(pid)
        finally:
            kill_quietly(docker.pids_started())

    def test_cancellation_kills_the_child_and_propagates(
        self, docker: FakeDocker, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("FAKE_DOCKER_SLEEP", "60")

        async def scenario() -> None:
            running = asyncio.create_task(
                Executors.default(allow_shell=False).execute(
                    task("docker.run", {"image": "nginx"}), Recorder()
                )
            )
            while not docker.pids_started():
                await asyncio.sleep(0.05)
            running.cancel()
            with pytest.raises(asyncio.CancelledError):
                await running

        try:
            asyncio.run(scenario())
            [pid] = docker.pids_started()
            assert not alive(pid)
        finally:
            kill_quietly(docker.pids_started())


class TestDockerRun:
    def test_runs_detached_with_env_from_a_file(self, docker: FakeDocker) -> None:
        outcome, _ = execute(
            task(
                "docker.run",
                {
                    "image": "app",
                    "digest": DIGEST,
                    "name": "web",
                    "env": {"API_KEY": "not-in-argv"},
                    "ports": ["8080:80"],
                    "command": ["serve", "--port", "80"],
                },
            )
        )
        assert outcome.success, outcome.error
        assert outcome.result == {"image": f"app@{DIGEST}", "containerId": "c0ffee" * 4}
        [run] = docker.calls()
        argv = run["argv"]
        assert argv[0] == "run"
        assert "--detach" in argv
        assert argv[argv.index("--name") + 1] == "web"
        assert argv[argv.index("--publish") + 1] == "8080:80"
        assert argv[-4:] == [f"app@{DIGEST}", "serve", "--port", "80"]
        assert "not-in-argv" not in " ".join(argv)
        assert "--env-file" in argv

    def test_a_failed_foreground_run_reports_the_exit_code(
        self, docker: FakeDocker, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("FAKE_DOCKER_FAIL", "run")
        outcome, _ = execute(task("docker.run", {"image": "app", "detach": False}))
        assert not outcome.success
        assert outcome.result == {"image": "app", "exitCode": 1}


class TestComposeUp:
    def test_brings_up_inline_content(self, docker: FakeDocker) -> None:
        outcome, recorder = execute(
            task(
                "compose.up",
                {"project": "shop", "content": "services: {}\n", "services": ["web"]},
            )
        )
        assert outcome.success, outcome.error
        [call] = docker.calls()
        argv = call["argv"]
        assert argv[:3] == ["compose", "--project-name", "shop"]
        assert argv[5:] == ["up", "--detach", "--", "web"]
        assert ("warning", "Container web-1  Started") in recorder.lines

    def test_needs_a_file_or_content(self, docker: FakeDocker) -> None:
        outcome, _ = execute(task("compose.up", {"project": "shop"}))
        assert outcome.error == "compose.up needs exactly one of payload.file and payload.content"


class TestTypes:
    def test_an_unknown_type_fails_clearly(self) -> None:
        outcome, _ = execute(task("k8s.apply", {}))
        assert not outcome.success
        assert outcome.error == (
            "unknown task type 'k8s.apply'; this agent runs compose.up, docker.pull, docker.run"
        )

    def test_shell_is_refused_unless_allowed(self) -> None:
        outcome, _ = execute(task("shell.exec", {"command": "true"}))
        assert outcome.error == "shell.exec is disabled on this agent (start it with --allow-shell)"

    def test_shell_runs_when_allowed(self) -> None:
        outcome, recorder = execute(
            task("shell.exec", {"command": "echo hello; echo oops >&2"}), allow_shell=True
        )
        assert outcome.success
        assert outcome.result == {"exitCode": 0}
        assert ("info", "hello") in recorder.lines
        assert ("warning", "oops") in recorder.lines

    def test_a_failing_command_fails_the_task(self) -> None:
        outcome, _ = execute(
            task("shell.exec", {"command": ["sh", "-c", "exit 3"]}), allow_shell=True
        )
        assert not outcome.success
        assert outcome.result == {"exitCode": 3}
        assert outcome.error is not None
        assert outcome.error.startswith("command exited with 3")
