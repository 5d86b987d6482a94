"""`docker.pull` and `docker.run`, through the docker CLI.

docker.pull payload: `image`, and `digest` (pulled as `image@sha256:…`) or
`tag`; optional `registry` (else the image's registry host). Result:
`image` (the reference pulled) and `imageId`.

docker.run payload: the same image fields, plus optional `name`, `command`
(list of strings), `env` (object; passed through a 0600 env file, not argv),
`ports` (list, as `-p` takes them), `pull` (`always`, `missing`, `never`) and
`detach` (default true). Result: `containerId`, and `exitCode` when not
detached. Each container is labelled `stella.task=<task id>`, so that an
agent restarted mid-run can find what its run left (`find_run`).
"""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from agent.executors._docker_cli import (
    docker_session,
    image_reference,
    login,
    string_list,
    text_field,
)
from agent.executors.base import Executor, Outcome, Reporter, Task, TaskFailed, run_process

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
PORT_RE = re.compile(
    r"^[0-9A-Za-z.:\[\]]+(?:-[0-9]+)?(?::[0-9]+(?:-[0-9]+)?)?(?:/(?:tcp|udp|sctp))?$"
)
ENV_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
PULL_POLICIES = ("always", "missing", "never")
TASK_LABEL, DETACH_LABEL = "stella.task", "stella.detach"
EXITED_RE = re.compile(r"^Exited \((-?[0-9]+)\)")


class DockerPull(Executor):
    task_type = "docker.pull"

    async def run(self, task: Task, report: Reporter) -> Outcome:
        reference = image_reference(task.payload)
        with docker_session(task) as session:
            await report.progress(5, "starting")
            await login(session, task, report)
            await report.progress(10, f"pulling {reference}")
            pulled = await run_process([session.docker, "pull", reference], report, env=session.env)
            if pulled.returncode != 0:
                raise TaskFailed(
                    f"docker pull {reference} failed (exit {pulled.returncode}): {pulled.tail(1)}"
                )
            await report.progress(90, "inspecting")
            result: dict[str, Any] = {"image": reference}
            inspected = await run_process(
                [session.docker, "image", "inspect", "--format", "{{.Id}}", reference],
                _Quiet(),
                env=session.env,
            )
            if inspected.returncode == 0 and inspected.output:
                result["imageId"] = inspected.output[-1].strip()
        await report.progress(100, f"pulled {reference}")
        return Outcome.ok(result)


class DockerRun(Executor):
    task_type = "docker.run"

    async def run(self, task: Task, report: Reporter) -> Outcome:
        reference = image_reference(task.payload)
        detach, name, ports, pull, command, env = _run_options(task.payload)
        with docker_session(task) as session, tempfile.TemporaryDirectory() as scratch:
            await report.progress(5, "starting")
            await login(session, task, report)
            cidfile = Path(scratch) / "container.id"
            argv = [session.docker, "run", "--cidfile", str(cidfile)]
            argv += ["--label", f"{TASK_LABEL}={task.task_id}"]
            argv += ["--label", f"{DETACH_LABEL}={str(detach).lower()}"]
            if detach:
                argv.append("--detach")
            if name is not None:
                argv += ["--name", name]
            if env:
                env_file = Path(scratch) / "env"
                env_file.touch(mode=0o600)
                env_file.write_text("".join(f"{key}={value}\n" for key, value in env.items()))
                argv += ["--env-file", str(env_file)]
            for port in ports:
                argv += ["--publish", port]
            if pull is not None:
                argv += ["--pull", pull]
            # Everything after the image is the container's own command line.
            argv += [reference, *command]
            await report.progress(20, f"running {reference}")
            ran = await run_process(argv, report, env=session.env)
            container_id = cidfile.read_text().strip() if cidfile.exists() else None
        result: dict[str, Any] = {"image": reference}
        if container_id is None and detach and ran.output:
            container_id = ran.output[-1].strip()
        if container_id:
            result["containerId"] = container_id
        if not detach:
            result["exitCode"] = ran.returncode
        if ran.returncode != 0:
            raise TaskFailed(
                f"docker run {reference} failed (exit {ran.returncode}): {ran.tail(1)}", result
            )
        await report.progress(100, "container started" if detach else "container finished")
        return Outcome.ok(result)


async def find_run(task_id: str) -> Outcome | None:
    """What a `docker.run` interrupted by an agent restart did, judged by its container.

    None when docker cannot tell (no CLI, an error); see `_judge`.
    """
    docker = shutil.which("docker")
    if docker is None:
        return None
    form = f'{{{{.ID}}}}\t{{{{.State}}}}\t{{{{.Status}}}}\t{{{{.Label "{DETACH_LABEL}"}}}}'
    listed = await run_process(
        [docker, "ps", "--all", "--no-trunc", "--filter", f"label={TASK_LABEL}={task_id}",
         "--format", form],
        _Quiet(),
    )  # fmt: skip
    if listed.returncode != 0:
        return None
    rows = [line.split("\t") for line in listed.output if line.strip()]
    if not rows:
        return Outcome.failed(
            "interrupted: the agent stopped while this task ran, and no container is labelled "
            "with this task (never created, or removed since); it was not re-run"
        )
    container_id, state, status, detached = (rows[0] + ["", "", ""])[:4]
    return _judge(container_id, state, status, detached=detached == "true")


def _judge(container_id: str, state: str, status: str, *, detached: bool) -> Outcome:
    """The outcome the run would have reported, from its container as docker shows it.

    A detached run succeeded once its container started (as `docker run
    --detach` says so then), whatever the container did since; a foreground
    run ends with its container's exit code, and one still running has nobody
    waiting for that code. A container created and never started failed.
    """
    result: dict[str, Any] = {"containerId": container_id}
    started = state in ("running", "paused", "restarting", "exited")
    if detached and started:
        return Outcome.ok(result)
    exited = EXITED_RE.match(status)
    if not detached and state == "exited" and exited is not None:
        result["exitCode"] = int(exited.group(1))
        if result["exitCode"] == 0:
            return Outcome.ok(result)
        return Outcome.failed(
            f"container {container_id} exited with code {result['exitCode']}", result
        )
    return Outcome.failed(
        f"interrupted: the agent stopped while this task ran; its container {container_id} "
        f"is {state or 'in an unknown state'} ({status}), unattended; it was not re-run",
        result,
    )


def _run_options(
    payload: dict[str, Any],
) -> tuple[bool, str | None, list[str], str | None, list[str], dict[str, str]]:
    detach = payload.get("detach", True)
    if not isinstance(detach, bool):
        raise TaskFailed("payload.detach must be true or false")
    name = text_field(payload, "name")
    if name is not None and not NAME_RE.match(name):
        raise TaskFailed(f"payload.name {name!r} is not a container name")
    ports = string_list(payload, "ports")
    for port in ports:
        if not PORT_RE.match(port):
            raise TaskFailed(f"payload.ports entry {port!r} is not a port mapping")
    pull = text_field(payload, "pull")
    if pull is not None and pull not in PULL_POLICIES:
        raise TaskFailed(f"payload.pull must be one of {', '.join(PULL_POLICIES)}")
    return detach, name, ports, pull, string_list(payload, "command"), _env(payload)


def _env(payload: dict[str, Any]) -> dict[str, str]:
    value = payload.get("env")
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise TaskFailed("payload.env must be an object of strings")
    env: dict[str, str] = {}
    for key, item in value.items():
        if not isinstance(key, str) or not ENV_KEY_RE.match(key):
            raise TaskFailed(f"payload.env key {key!r} is not a variable name")
        if not isinstance(item, str | int | float) or "\n" in str(item):
            raise TaskFailed(f"payload.env.{key} must be a single-line string")
        env[key] = str(item)
    return env


class _Quiet:
    """A reporter for commands whose output is a value, not a log."""

    async def progress(self, percent: int | None, message: str | None = None) -> None:
        return None

    async def log(self, level: str, message: str) -> None:
        return None
