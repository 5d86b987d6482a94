"""Executors by task type, and `execute`, which applies the rules common to all.

Usage::

    executors = Executors.default(allow_shell=False)
    outcome = await executors.execute(task, reporter)

`execute` never raises for a task's own failure: an unknown or disabled
type, a `TaskFailed`, a timeout (the child is killed) or an unexpected
error all become a failed `Outcome` with a clear `error`. Only cancellation
(the server cancelled the task, or the agent is stopping) propagates.
"""

from __future__ import annotations

import asyncio
import logging

from agent.executors.base import Executor, Outcome, Reporter, Task, TaskFailed
from agent.executors.compose import ComposeUp
from agent.executors.docker import DockerPull, DockerRun
from agent.executors.shell import ShellExec

log = logging.getLogger(__name__)

__all__ = ["Executor", "Executors", "Outcome", "Reporter", "Task", "TaskFailed"]


class Executors:
    """The task types this agent runs, and those it refuses on purpose."""

    def __init__(self, executors: list[Executor], disabled: dict[str, str] | None = None) -> None:
        self.by_type = {executor.task_type: executor for executor in executors}
        self.disabled = disabled or {}

    @classmethod
    def default(cls, *, allow_shell: bool) -> Executors:
        executors: list[Executor] = [DockerPull(), DockerRun(), ComposeUp()]
        disabled: dict[str, str] = {}
        if allow_shell:
            executors.append(ShellExec())
        else:
            disabled["shell.exec"] = (
                "shell.exec is disabled on this agent (start it with --allow-shell)"
            )
        return cls(executors, disabled)

    async def execute(self, task: Task, report: Reporter) -> Outcome:
        executor = self.by_type.get(task.task_type)
        if executor is None:
            refusal = self.disabled.get(task.task_type) or (
                f"unknown task type {task.task_type!r}; this agent runs "
                f"{', '.join(sorted(self.by_type))}"
            )
            return Outcome.failed(refusal)
        try:
            async with asyncio.timeout(task.timeout) as deadline:
                return await executor.run(task, report)
        except TaskFailed as exc:
            return Outcome.failed(str(exc), exc.result)
        except TimeoutError:
            if deadline.expired():
                return Outcome.failed(
                    f"timed out after {task.timeout} s; the task's process was killed"
                )
            log.exception("task %s (%s) failed", task.task_id, task.task_type)
            return Outcome.failed("internal error: a timeout inside the executor")
        except Exception as exc:  # a bug in an executor must not take the agent down
            log.exception("task %s (%s) failed", task.task_id, task.task_type)
            return Outcome.failed(f"internal error: {type(exc).__name__}: {exc}")
