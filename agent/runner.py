"""The agent's main loop.

`run_agent(options)` registers on first start (or reuses the state
directory), then runs until SIGTERM/SIGINT:

- heartbeats every `heartbeatInterval` with real resource usage, starting
  the tasks the answer hands over and applying `certificateRenewal`;
- the task stream, reconnected with exponential backoff and jitter; while it
  is down, `GET /agents/{id}/tasks` every `taskPollInterval` instead;
- one supervised asyncio task per server task: progress and log lines go
  over the stream when it is up (rate-limited below the server's limit),
  and every line the server has not confirmed goes with the completion;
- outcomes that could not be delivered are kept in the state directory and
  retried, also after a restart; a task that was running when the agent
  died is reported as interrupted, never silently dropped or re-run.

On SIGTERM the agent takes no new task, gives running tasks `shutdown_grace`
seconds to finish, kills what is left (reported as failed), then exits. A
second signal skips the grace.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import random
import signal
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent import recovery
from agent.client import (
    AgentClient,
    AgentError,
    CredentialsRefused,
    ServerUnavailable,
    TaskGone,
    TaskStream,
    register,
)
from agent.executors import Executors
from agent.executors.base import Outcome, Task
from agent.lost_tasks import INTERRUPTED, never_started, settle_interrupted
from agent.resources import ResourceProbe
from agent.signatures import LogDigest, TaskSignatures
from agent.state import Identity, StateDir

log = logging.getLogger("stella.agent")

# The server allows 50 messages a second with bursts of 200: stay well below.
STREAM_RATE, STREAM_BURST = 20.0, 80
MAX_LOG_LINES = 5000  # per completion body (the server takes up to 10,000)
MAX_COMPLETION_LOG_BYTES = 512 * 1024  # the server's default body limit is 1 MiB
MAX_ERROR = 4000  # the server takes up to 4,096 characters


@dataclass
class Options:
    server: str
    state_dir: Path
    name: str
    token: str | None = field(default=None, repr=False)
    capabilities: list[str] = field(default_factory=list)
    labels: dict[str, str] = field(default_factory=dict)
    ca_file: Path | None = None
    allow_shell: bool = False
    shutdown_grace: float = 30.0
    backoff_max: float = 60.0


def backoff_delay(attempt: int, *, base: float = 1.0, cap: float = 60.0) -> float:
    """Exponential backoff with jitter: between half and all of min(cap, base * 2^attempt)."""
    ceiling = min(cap, base * 2 ** min(attempt, 30))
    return random.uniform(ceiling / 2, ceiling)  # noqa: S311 - jitter, not a secret


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat()


class _Bucket:
    """A token bucket: `rate` per second on average, bursts up to `burst`."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate, self.burst = rate, float(burst)
        self.tokens, self.stamp = float(burst), time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


@dataclass
class _Line:
    timestamp: str
    level: str
    message: str
    sent_on: TaskStream | None = None

    def wire(self) -> dict[str, str]:
        return {"timestamp": self.timestamp, "level": self.level, "message": self.message}


class TaskReporter:
    """An executor's `Reporter`: streams what it can, keeps every line until confirmed."""

    def __init__(self, runner: Runner, task: Task) -> None:
        self.runner = runner
        self.task = task
        self.secrets = task.secrets()
        self.lines: list[_Line] = []
        self.dropped = 0
        self.log_digest = LogDigest()  # every line, for the signed receipt

    def redact(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, "***")
        return text

    async def progress(self, percent: int | None, message: str | None = None) -> None:
        body: dict[str, Any] = {"type": "task_progress", "taskId": self.task.task_id}
        if percent is not None:
            body["progress"] = max(0, min(100, int(percent)))
        if message is not None:
            body["message"] = self.redact(message)[:1000]
        await self.runner.stream_send(body)

    async def log(self, level: str, message: str) -> None:
        line = _Line(timestamp=now_iso(), level=level[:16] or "info", message=self.redact(message))
        self.lines.append(line)
        self.log_digest.add(line.wire())
        if len(self.lines) > MAX_LOG_LINES:
            del self.lines[0]
            self.dropped += 1
        stream = await self.runner.stream_send(
            {"type": "task_log", "taskId": self.task.task_id, **line.wire()}
        )
        line.sent_on = stream

    async def unconfirmed(self) -> list[dict[str, str]]:
        """The lines the server may not have: all but those a stream sync confirmed."""
        stream = self.runner.stream
        streamed = stream is not None and any(line.sent_on is stream for line in self.lines)
        if streamed and stream is not None and await stream.sync():
            self.lines = [line for line in self.lines if line.sent_on is not stream]
        # The newest lines that fit the completion body (the server caps body size).
        lines: list[dict[str, str]] = []
        budget = MAX_COMPLETION_LOG_BYTES
        for line in reversed(self.lines):
            budget -= len(line.message.encode()) + 100
            if budget < 0:
                break
            lines.append(line.wire())
        lines.reverse()
        dropped = self.dropped + len(self.lines) - len(lines)
        if dropped:
            note = f"[{dropped} earlier log lines dropped by the agent]"
            lines.insert(0, {"timestamp": now_iso(), "level": "warning", "message": note})
        return lines


class Runner:
    """One registered agent at work; see the module docstring."""

    def __init__(
        self,
        *,
        options: Options,
        identity: Identity,
        state: StateDir,
        client: AgentClient,
        executors: Executors,
    ) -> None:
        self.options = options
        self.identity = identity
        self.state = state
        self.client = client
        self.executors = executors
        config = identity.config
        self.heartbeat_interval = float(config.get("heartbeatInterval") or 30)
        self.poll_interval = float(config.get("taskPollInterval") or 5)
        self.probe = ResourceProbe(disk_path=state.path)
        self.stream: TaskStream | None = None
        self.running: dict[str, asyncio.Task[None]] = {}
        self.executing: set[str] = set()  # running, and not yet reporting
        self.cancel_reasons: dict[str, str] = {}
        self.unreported: dict[str, dict[str, Any]] = {}
        self.stopping = asyncio.Event()  # take no new task
        self.closed = asyncio.Event()  # stop the loops
        self.fatal: str | None = None
        self.grace = options.shutdown_grace
        self._bucket = _Bucket(STREAM_RATE, STREAM_BURST)
        self.signatures = TaskSignatures(state, identity.agent_id, client.task_signing_keys)

    # --- entry --------------------------------------------------------------------------

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.request_stop, signum)
        log.info("agent %s (%s) starting", self.identity.name, self.identity.agent_id)
        loops = [
            asyncio.create_task(self._guard(self._heartbeat_loop()), name="heartbeat"),
            asyncio.create_task(self._guard(self._stream_loop()), name="stream"),
            asyncio.create_task(self._guard(self._poll_loop()), name="poll"),
            asyncio.create_task(self._guard(self._report_loop()), name="reports"),
        ]
        try:
            await self._guard(self._resume())
            await self.stopping.wait()
            await self._drain()
        finally:
            self.closed.set()
            for task in loops:
                task.cancel()
            await asyncio.gather(*loops, return_exceptions=True)
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(signum)
            await self.client.aclose()
        if self.fatal:
            log.error("agent stopped: %s", self.fatal)
            return 2
        log.info("agent stopped")
        return 0

    def request_stop(self, signum: int | None = None) -> None:
        if self.stopping.is_set():
            log.warning("second signal: killing running tasks now")
            self.grace = 0
            for task_id, task in self.running.items():
                self.cancel_reasons.setdefault(task_id, "shutdown")
                task.cancel()
            return
        name = signal.Signals(signum).name if signum else "request"
        log.info("%s: stopping, no new tasks", name)
        self.stopping.set()

    def _die(self, reason: str) -> None:
        """Credentials refused: nothing can succeed any more (the agent was deleted?)."""
        self.fatal = reason
        for task_id, task in self.running.items():
            self.cancel_reasons[task_id] = "server"
            task.cancel()
        self.stopping.set()

    async def _guard(self, loop: Coroutine[Any, Any, None]) -> None:
        try:
            await loop
        except CredentialsRefused as exc:
            self._die(str(exc))
        except Exception as exc:
            # A loop that died quietly would leave a process that looks alive and
            # does nothing: stop instead, so that a supervisor restarts the agent.
            log.exception("internal error")
            self._die(f"internal error: {type(exc).__name__}: {exc}")

    async def _sleep(self, event: asyncio.Event, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), seconds)

    # --- restart ------------------------------------------------------------------------

    async def _resume(self) -> None:
        """Report what the previous run left, then pick up the tasks the server says we hold."""
        for task_id, record in self.state.held_tasks().items():
            outcome = record.get("outcome")
            if outcome is None:
                outcome = {"success": False, "error": INTERRUPTED, "logs": []}
                self.state.finish_task(task_id, outcome)
                log.warning("task %s was interrupted by a restart; reporting it", task_id)
            if "receipt" not in outcome and isinstance(record.get("startedAt"), str):
                # Settled after a restart (agent/lost_tasks.py): signed now, as any outcome.
                outcome["receipt"] = self.signatures.receipt(
                    task_id=task_id,
                    body=outcome,
                    logs=LogDigest.of(outcome.get("logs")),
                    started_at=record["startedAt"],
                    finished_at=now_iso(),
                )
                self.state.finish_task(task_id, outcome)
            self.unreported[task_id] = outcome
        await self._flush_reports()
        await self._poll_quietly()

    # --- loops --------------------------------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        while not self.closed.is_set():
            await recovery.renew_if_lapsed(self)  # a certificate that lapsed while we ran
            body: dict[str, Any] = {
                "status": "healthy",
                "resourceUsage": self.probe.sample(),
                "runningTasks": len(self.running),
            }
            if self.options.capabilities:  # none given: keep what the server has
                body["capabilities"] = self.options.capabilities
            try:
                answer = await self.client.heartbeat(body)
            except CredentialsRefused:
                raise
            except AgentError as exc:
                log.warning("heartbeat failed: %s", exc)
            else:
                for task in answer.get("tasks") or []:
                    self.accept(task)
                renewal = answer.get("certificateRenewal")
                if renewal:
                    self._renew(renewal)
            await self._sleep(self.closed, self.heartbeat_interval)

    def _renew(self, renewal: dict[str, Any]) -> None:
        try:
            self.state.replace_certificate(str(renewal["cert"]))
        except Exception as exc:  # a bad renewal must not stop the agent; the old cert still works
            log.error("certificate renewal not applied: %s", exc)
            return
        self.client.reload_tls()
        log.info("certificate renewed; valid until %s", renewal.get("expiresAt"))

    async def _stream_loop(self) -> None:
        attempt = 0
        while not self.closed.is_set():
            try:
                async with self.client.stream() as stream:
                    self.stream = stream
                    attempt = 0
                    log.info("task stream connected")
                    # Tasks assigned while we were away are not re-sent on connect.
                    await self._poll_quietly()
                    if await self._read_stream(stream):
                        return
            except ServerUnavailable as exc:
                log.warning("task stream unavailable (polling instead): %s", exc)
            finally:
                self.stream = None
            delay = backoff_delay(attempt, cap=self.options.backoff_max)
            attempt += 1
            log.info("task stream: reconnecting in %.1f s", delay)
            await self._sleep(self.closed, delay)

    async def _read_stream(self, stream: TaskStream) -> bool:
        """Dispatch the stream's messages; True when the agent is closing."""
        reader = asyncio.create_task(stream.run(self._on_message))
        closer = asyncio.create_task(self.closed.wait())
        try:
            await asyncio.wait({reader, closer}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            closer.cancel()
            if not reader.done():
                reader.cancel()
            # Always retrieve the reader's end, so no exception goes unseen.
            with contextlib.suppress(asyncio.CancelledError, ServerUnavailable):
                await reader
        if reader.cancelled():
            return True
        reader.result()  # CredentialsRefused ends the agent; anything else reconnects
        return self.closed.is_set()

    async def _poll_loop(self) -> None:
        while not self.closed.is_set():
            await self._sleep(self.closed, self.poll_interval)
            if self.stream is None and not self.stopping.is_set():
                await self._poll_quietly()

    async def _report_loop(self) -> None:
        while not self.closed.is_set():
            await self._sleep(self.closed, self.poll_interval)
            await self._flush_reports()

    async def _poll_quietly(self) -> None:
        try:
            await self._poll_once()
        except CredentialsRefused:
            raise
        except AgentError as exc:
            log.warning("poll failed: %s", exc)

    async def _poll_once(self) -> None:
        held_before = set(self.running)
        tasks = await self.client.open_tasks()
        still_open = {str(task.get("taskId")) for task in tasks}
        for task in tasks:
            self.accept(task)
        for task_id in held_before - still_open:
            # Cancelled or timed out while the stream was down.
            self.cancel(task_id, "the server no longer lists it as open")

    async def _on_message(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        if kind == "task_assigned" and isinstance(message.get("task"), dict):
            self.accept(message["task"])
        elif kind == "task_cancelled":
            self.cancel(str(message.get("taskId")), "cancelled by the server")
        elif kind == "error":
            log.warning("the server refused a stream message: %s", message.get("detail"))

    async def stream_send(self, message: dict[str, Any]) -> TaskStream | None:
        """Send on the stream if it is up and the rate allows; the stream used, or None."""
        stream = self.stream
        if stream is None or not self._bucket.take():
            return None
        return stream if await stream.send(message) else None

    # --- tasks --------------------------------------------------------------------------

    def accept(self, data: dict[str, Any]) -> None:
        """Start a task handed over by any channel, once."""
        try:
            task = Task.from_wire(data)
        except (KeyError, TypeError, ValueError):
            log.warning("ignoring a malformed task from the server")
            return
        if task.task_id in self.running or task.task_id in self.unreported:
            return
        if data.get("status") == "unknown":  # lost, and no record of it here: never started
            self.unreported[task.task_id] = never_started()
            return
        if self.stopping.is_set():
            return  # stays assigned: the next start picks it up
        log.info("task %s (%s) started", task.task_id, task.task_type)
        self.state.hold_task(task.task_id, task.task_type)
        self.running[task.task_id] = asyncio.create_task(
            self._supervise(task, data), name=f"task-{task.task_id}"
        )

    def cancel(self, task_id: str, why: str) -> None:
        running = self.running.get(task_id)
        if running is not None and task_id in self.executing:
            log.info("task %s: %s; killing it", task_id, why)
            self.cancel_reasons[task_id] = "server"
            running.cancel()

    async def _supervise(self, task: Task, wire: dict[str, Any]) -> None:
        reporter = TaskReporter(self, task)
        started_at = now_iso()
        try:
            self.executing.add(task.task_id)
            try:
                # Never run a task the server did not sign as it is (agent/signatures.py).
                refused = await self.signatures.problem(wire)
                outcome = (
                    Outcome.failed(refused)
                    if refused
                    else await self.executors.execute(task, reporter)
                )
            except asyncio.CancelledError:
                if self.cancel_reasons.get(task.task_id) == "server":
                    self.state.release_task(task.task_id)
                    log.info("task %s cancelled", task.task_id)
                    return
                outcome = Outcome.failed(
                    "the agent was stopped before the task finished; its process was killed"
                )
            finally:
                self.executing.discard(task.task_id)
            finished_at = now_iso()
            body: dict[str, Any] = {"success": outcome.success}
            if outcome.result is not None:
                body["result"] = outcome.result
            if outcome.error is not None:
                body["error"] = reporter.redact(outcome.error)[:MAX_ERROR]
            body["logs"] = await reporter.unconfirmed()
            body["receipt"] = self.signatures.receipt(
                task_id=task.task_id,
                body=body,
                logs=reporter.log_digest,
                started_at=started_at,
                finished_at=finished_at,
            )
            log.info(
                "task %s %s%s",
                task.task_id,
                "succeeded" if outcome.success else "failed",
                f": {body['error']}" if "error" in body else "",
            )
            self.state.finish_task(task.task_id, body)
            self.unreported[task.task_id] = body
            await self._report(task.task_id)
        finally:
            self.running.pop(task.task_id, None)
            self.cancel_reasons.pop(task.task_id, None)

    async def _report(self, task_id: str) -> None:
        body = self.unreported.get(task_id)
        if body is None:
            return
        try:
            await self.client.complete(task_id, body)
        except TaskGone as exc:
            log.warning("task %s: completion refused for good: %s", task_id, exc)
        except ServerUnavailable as exc:
            log.warning("task %s: completion not delivered, will retry: %s", task_id, exc)
            return
        except CredentialsRefused as exc:
            self._die(str(exc))
            return
        except AgentError as exc:
            if body.get("logs"):
                # Perhaps the logs made the body too large: the outcome matters more.
                log.warning(
                    "task %s: completion rejected (%s); retrying without logs", task_id, exc
                )
                self.unreported[task_id] = {**body, "logs": []}
                await self._report(task_id)
                return
            if "receipt" in body:
                # A receipt the server refused: the outcome matters more than the evidence.
                log.warning(
                    "task %s: completion rejected (%s); retrying without its receipt", task_id, exc
                )
                self.unreported[task_id] = {k: v for k, v in body.items() if k != "receipt"}
                await self._report(task_id)
                return
            log.error("task %s: completion rejected: %s", task_id, exc)
        self.unreported.pop(task_id, None)
        self.state.release_task(task_id)

    async def _flush_reports(self) -> None:
        for task_id in list(self.unreported):
            if task_id not in self.running:
                await self._report(task_id)

    async def _drain(self) -> None:
        """Let running tasks finish for up to the grace, kill the rest, report all."""
        if self.running:
            log.info("waiting up to %.0f s for %d running task(s)", self.grace, len(self.running))
            _, late = await asyncio.wait(set(self.running.values()), timeout=self.grace)
            for task_id, task in list(self.running.items()):
                if task in late:
                    self.cancel_reasons.setdefault(task_id, "shutdown")
                    task.cancel()
            if late:
                await asyncio.wait(late)
        await self._flush_reports()


async def bootstrap(options: Options, state: StateDir) -> Identity:
    """The saved identity, or a new one: key generated here, CSR sent, key kept."""
    state.ensure()
    if options.ca_file is not None:
        state.pin_server_ca(options.ca_file.read_bytes())
    identity = state.load()
    if identity is not None:
        log.info("reusing identity %s from %s", identity.agent_id, state.path)
        return identity
    if not options.token:
        raise AgentError(f"{state.path} holds no identity yet: --token is required to register")
    if not state.server_ca_file.exists():
        log.warning("no --ca given: verifying the server against the system trust store")
    key = state.load_or_create_key()
    body = {
        "name": options.name,
        "capabilities": options.capabilities,
        "labels": options.labels,
        "csr": state.csr_pem(key, options.name),
    }
    server_ca = state.server_ca_file if state.server_ca_file.exists() else None
    registration = await register(
        server=options.server, token=options.token, body=body, server_ca=server_ca
    )
    if registration.get("certificate", {}).get("key"):
        log.warning("the server sent a private key despite our CSR; it is not kept")
    TaskSignatures.pin(state, registration.get("taskSigningKeys"))  # before agent.json commits
    identity = state.save_registration(
        server=options.server, name=options.name, registration=registration
    )
    log.info("registered as agent %s", identity.agent_id)
    return identity


async def run_agent(options: Options) -> int:
    """Register or resume, then work until stopped; the process exit code."""
    state = StateDir(options.state_dir)
    try:
        identity = await bootstrap(options, state)
        # Expired while the agent was away: re-certified by proof of possession.
        identity = await recovery.ensure_certificate(options, state, identity)
    except (AgentError, OSError, ValueError) as exc:
        log.error("cannot start: %s", exc)
        return 2
    await settle_interrupted(state)  # before any task is taken: agent/lost_tasks.py
    client = AgentClient(server=options.server, identity=identity, state=state)
    runner = Runner(
        options=options,
        identity=identity,
        state=state,
        client=client,
        executors=Executors.default(allow_shell=options.allow_shell),
    )
    return await runner.run()
