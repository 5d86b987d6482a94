"""`compose.up`: `docker compose up --detach` for one project.

Payload: `project` (required), and either `file` (a compose file on the
agent) or `content` (the compose YAML itself, written to a private
temporary file); optional `services` (list), `pull` (`always`, `missing`,
`never`) and `directory` (the working directory). Registry credentials, if
any, are used as for docker.pull. Result: `project` and `services`.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

from agent.executors._docker_cli import docker_session, login, string_list, text_field
from agent.executors.base import Executor, Outcome, Reporter, Task, TaskFailed, run_process

PROJECT_RE = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
SERVICE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
PULL_POLICIES = ("always", "missing", "never")


class ComposeUp(Executor):
    task_type = "compose.up"

    async def run(self, task: Task, report: Reporter) -> Outcome:
        payload = task.payload
        project = text_field(payload, "project", required=True)
        assert project is not None
        if not PROJECT_RE.match(project):
            raise TaskFailed(f"payload.project {project!r}: lowercase letters, digits, - and _")
        file, content = text_field(payload, "file"), text_field(payload, "content")
        if (file is None) == (content is None):
            raise TaskFailed("compose.up needs exactly one of payload.file and payload.content")
        services = string_list(payload, "services")
        for service in services:
            if not SERVICE_RE.match(service):
                raise TaskFailed(f"payload.services entry {service!r} is not a service name")
        pull = text_field(payload, "pull")
        if pull is not None and pull not in PULL_POLICIES:
            raise TaskFailed(f"payload.pull must be one of {', '.join(PULL_POLICIES)}")
        directory = text_field(payload, "directory")
        if directory is not None and not Path(directory).is_dir():
            raise TaskFailed(f"payload.directory {directory!r} is not a directory on this agent")
        if file is not None and not Path(directory or ".", file).is_file():
            raise TaskFailed(f"payload.file {file!r} is not a file on this agent")

        with docker_session(task) as session, tempfile.TemporaryDirectory() as scratch:
            await report.progress(5, "starting")
            await login(session, task, report)
            if content is not None:
                compose_file = Path(scratch) / "compose.yaml"
                compose_file.touch(mode=0o600)
                compose_file.write_text(content)
                file = str(compose_file)
            assert file is not None
            argv = [session.docker, "compose", "--project-name", project, "--file", file]
            argv += ["up", "--detach"]
            if pull is not None:
                argv += ["--pull", pull]
            if services:
                argv += ["--", *services]
            await report.progress(20, f"bringing up {project}")
            ran = await run_process(argv, report, env=session.env, cwd=directory)
        if ran.returncode != 0:
            raise TaskFailed(
                f"docker compose up for {project} failed (exit {ran.returncode}): {ran.tail(1)}"
            )
        await report.progress(100, f"{project} is up")
        return Outcome.ok({"project": project, "services": services})
