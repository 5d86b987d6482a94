"""What an executor is, and the one way executors run child processes.

An executor turns a task into an `Outcome`. It reports as it goes through a
`Reporter` (progress and log lines) and raises `TaskFailed` with a clear
message when the task cannot succeed. Timeouts and cancellation arrive as
`asyncio.CancelledError`: `run_process` then kills the child's whole process
group before letting the cancellation go on.

Usage::

    class Echo(Executor):
        task_type = "echo"

        async def run(self, task: Task, report: Reporter) -> Outcome:
            await report.log("info", "hello")
            return Outcome.ok({"echoed": task.payload})
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

# How long a child gets between SIGTERM and SIGKILL.
KILL_GRACE = 5.0
# Log lines longer than this are cut (the server takes up to 64 KiB per line).
MAX_LINE = 8 * 1024


@dataclass(frozen=True)
class Task:
    """A task as the server hands it over (heartbeat, stream or poll)."""

    task_id: str
    task_type: str
    payload: dict[str, Any]
    credentials: dict[str, Any] = field(default_factory=dict, repr=False)
    timeout: int = 300
    priority: int = 0

    @classmethod
    def from_wire(cls, data: Mapping[str, Any]) -> Task:
        return cls(
            task_id=str(data["taskId"]),
            task_type=str(data["taskType"]),
            payload=dict(data.get("payload") or {}),
            credentials=dict(data.get("credentials") or {}),
            timeout=int(data.get("timeout") or 300),
            priority=int(data.get("priority") or 0),
        )

    def secrets(self) -> list[str]:
        """Every credential value, to be kept out of logs and errors.

        Values under 4 characters are left alone: masking every "a" in a log
        would destroy it and protect nothing.
        """
        values = [str(value) for value in self.credentials.values()]
        return sorted((value for value in values if len(value) >= 4), key=len, reverse=True)


@dataclass(frozen=True)
class Outcome:
    success: bool
    result: dict[str, Any] | None = None
    error: str | None = None

    @classmethod
    def ok(cls, result: dict[str, Any] | None = None) -> Outcome:
        return cls(success=True, result=result or {})

    @classmethod
    def failed(cls, error: str, result: dict[str, Any] | None = None) -> Outcome:
        return cls(success=False, result=result, error=error)


class TaskFailed(Exception):
    """The task cannot succeed; the message is what the operator reads."""

    def __init__(self, message: str, result: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.result = result


class Reporter(Protocol):
    """Where an executor's progress and log lines go (the runner streams them)."""

    async def progress(self, percent: int | None, message: str | None = None) -> None: ...

    async def log(self, level: str, message: str) -> None: ...


class Executor(ABC):
    task_type: str

    @abstractmethod
    async def run(self, task: Task, report: Reporter) -> Outcome:
        """Run the task; raise `TaskFailed` for a clear failure."""


@dataclass(frozen=True)
class ProcessResult:
    returncode: int
    output: list[str]

    def tail(self, lines: int = 5) -> str:
        return "\n".join(self.output[-lines:])


async def run_process(
    argv: Sequence[str],
    report: Reporter,
    *,
    stdin: bytes | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    keep: int = 200,
) -> ProcessResult:
    """Run `argv`, logging each output line; kill its process group if cancelled.

    `stdin` is written then closed (how secrets reach a child: never argv).
    Standard error lines are logged as warnings. The last `keep` lines are
    returned with the exit code.
    """
    process = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=dict(env) if env is not None else None,
        cwd=cwd,
        start_new_session=True,  # its own group, so a kill reaches its children too
    )
    output: list[str] = []

    async def pump(stream: asyncio.StreamReader | None, level: str) -> None:
        if stream is None:
            return
        while True:
            raw = await stream.readline()
            if not raw:
                return
            line = raw.decode(errors="replace").rstrip("\r\n")[:MAX_LINE]
            output.append(line)
            del output[:-keep]
            await report.log(level, line)

    try:
        if stdin is not None and process.stdin is not None:
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                process.stdin.write(stdin)
                await process.stdin.drain()
            process.stdin.close()
        await asyncio.gather(pump(process.stdout, "info"), pump(process.stderr, "warning"))
        returncode = await process.wait()
    except BaseException:
        await _kill_group(process)
        raise
    return ProcessResult(returncode=returncode, output=output)


async def _kill_group(process: asyncio.subprocess.Process) -> None:
    """SIGTERM the child's group, then SIGKILL whatever is left after the grace."""
    if process.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    with contextlib.suppress(TimeoutError, asyncio.CancelledError):
        await asyncio.shield(asyncio.wait_for(process.wait(), KILL_GRACE))
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.shield(process.wait())
