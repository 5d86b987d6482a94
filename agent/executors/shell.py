"""`shell.exec`: run a command on the agent's host. Enabled only by `--allow-shell`.

Payload: `command`, a string (run by `/bin/sh -c`) or a list of strings (run
directly); optional `cwd` and `env` (added to the agent's environment).
Result: `exitCode`; a non-zero exit fails the task.
"""

from __future__ import annotations

import os
from typing import Any

from agent.executors._docker_cli import text_field
from agent.executors.base import Executor, Outcome, Reporter, Task, TaskFailed, run_process


class ShellExec(Executor):
    task_type = "shell.exec"

    async def run(self, task: Task, report: Reporter) -> Outcome:
        command: Any = task.payload.get("command")
        if isinstance(command, str) and command:
            argv = ["/bin/sh", "-c", command]
        elif (
            isinstance(command, list) and command and all(isinstance(part, str) for part in command)
        ):
            argv = list(command)
        else:
            raise TaskFailed("payload.command must be a string or a non-empty list of strings")
        cwd = text_field(task.payload, "cwd")
        extra: Any = task.payload.get("env") or {}
        if not isinstance(extra, dict) or not all(
            isinstance(key, str) and isinstance(value, str) for key, value in extra.items()
        ):
            raise TaskFailed("payload.env must be an object of strings")
        await report.progress(5, "running")
        try:
            ran = await run_process(argv, report, env={**os.environ, **extra}, cwd=cwd)
        except (FileNotFoundError, NotADirectoryError, PermissionError) as exc:
            raise TaskFailed(f"cannot run the command: {exc}") from exc
        result = {"exitCode": ran.returncode}
        if ran.returncode != 0:
            raise TaskFailed(f"command exited with {ran.returncode}: {ran.tail(1)}", result)
        await report.progress(100, "done")
        return Outcome.ok(result)
