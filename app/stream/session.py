"""One agent's task stream: what it is sent, and what it may send.

Server → agent: `task_assigned` for every pending task on connect and for
each new one as it is created; `task_cancelled` on cancel and timeout;
`error` for a message it could not accept; `synced` answering a `sync`.
Agent → server: `task_progress`, `task_log`, and `sync` (a barrier: its
answer means every earlier message was stored, e.g. before completing).

Every wake-up (an event, a resync after a pub/sub gap, or the periodic
re-check every `taskPollInterval`, see `app.stream.recheck`) claims from
the database, so a lost notification delays a task and never loses it.

A web process holds thousands of these, mostly idle, so each is kept
small: the connection's own task reads the agent's messages, one more
task writes what the hub and the re-check wake it for, and nothing else
is kept per stream (no timer: the re-check is one task per process).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from typing import Any

from pydantic import ValidationError
from sqlalchemy.exc import DBAPIError
from starlette.concurrency import run_in_threadpool
from starlette.websockets import WebSocket, WebSocketDisconnect

from app.db import transaction
from app.errors import StellaError
from app.metrics.instruments import TASK_STREAMS_OPEN, observe_deliveries
from app.runtime import Runtime
from app.stream.claims import AgentGone, ClaimBatcher
from app.stream.hub import RESYNC, Hub, StreamItem, Subscription
from app.stream.recheck import Recheck
from app.stream.schemas import (
    StreamError,
    Sync,
    Synced,
    TaskAssigned,
    TaskCancelledMessage,
    TaskLogMessage,
    TaskProgress,
    agent_message,
    outgoing,
)
from app.tasks import service as tasks_service
from app.tasks.schemas import LogLine

log = logging.getLogger(__name__)

# Close codes: 4401 credentials refused or agent deleted, 4403 another
# agent's stream, 1008 too many messages, 1009 message too big, 1011 a
# server fault, 1013 the database is unavailable (reconnect later).
CLOSE_UNAUTHORIZED = 4401
CLOSE_FORBIDDEN = 4403
CLOSE_POLICY = 1008
CLOSE_TOO_BIG = 1009
CLOSE_INTERNAL_ERROR = 1011
CLOSE_TRY_LATER = 1013


class _RateLimit:
    """A token bucket: `rate` messages a second on average, bursts up to `burst`."""

    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: int) -> None:
        self.rate, self.burst = rate, float(burst)
        self.tokens, self.stamp = float(burst), time.monotonic()

    def allow(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


class TaskStream:
    __slots__ = ("_limit", "_send_lock", "agent_id", "runtime", "websocket")

    def __init__(self, websocket: WebSocket, runtime: Runtime, agent_id: uuid.UUID) -> None:
        self.websocket = websocket
        self.runtime = runtime
        self.agent_id = agent_id
        self._send_lock = asyncio.Lock()
        settings = runtime.settings
        self._limit = _RateLimit(settings.stream_messages_per_second, settings.stream_burst)

    async def run(self, hub: Hub, recheck: Recheck, claims: ClaimBatcher) -> None:
        """Serve the stream until the agent leaves, is deleted, or misbehaves."""
        subscription = await hub.subscribe(self.agent_id)
        recheck.add(subscription)
        TASK_STREAMS_OPEN.inc()
        writer = asyncio.create_task(self._write_loop(subscription, claims))
        try:
            await self._read_loop()
        except DBAPIError:
            log.warning("task stream of %s: database unavailable", self.agent_id)
            await self._close(CLOSE_TRY_LATER, "database unavailable; reconnect later")
        except (WebSocketDisconnect, RuntimeError):
            pass  # the agent left, or the writer closed the stream, while we were sending
        finally:
            TASK_STREAMS_OPEN.dec()
            recheck.discard(subscription)
            subscription.close()
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await writer

    async def _write_loop(self, subscription: Subscription, claims: ClaimBatcher) -> None:
        """Claim and push on connect and on every wake-up; close the stream when it must end.

        Closing makes the reader's `receive` return a disconnect, which ends `run`.
        """
        try:
            await self._deliver_pending(claims)
            while True:
                await self._handle(await subscription.queue.get(), claims)
        except AgentGone:
            await self._close(CLOSE_UNAUTHORIZED, "agent deleted")
        except DBAPIError:
            log.warning("task stream of %s: database unavailable", self.agent_id)
            await self._close(CLOSE_TRY_LATER, "database unavailable; reconnect later")
        except (WebSocketDisconnect, RuntimeError):
            pass  # the agent left while we were sending
        except Exception:
            log.exception("task stream of %s failed", self.agent_id)
            await self._close(CLOSE_INTERNAL_ERROR, "internal error; reconnect later")

    async def _handle(self, item: StreamItem, claims: ClaimBatcher) -> None:
        if item == RESYNC:
            await self._deliver_pending(claims)
            return
        assert not isinstance(item, str)
        if item.kind == "task_created":
            await self._deliver_pending(claims)
        elif item.kind == "task_cancelled" and item.task_id is not None:
            await self._send(TaskCancelledMessage(task_id=item.task_id))
        elif item.kind == "agent_deleted":
            raise AgentGone

    async def _deliver_pending(self, claims: ClaimBatcher) -> None:
        # Claimed together with whatever other streams of this process claim now.
        while True:
            deliveries = await claims.claim(self.agent_id)
            for delivery in deliveries:
                await self._send(TaskAssigned(task=delivery))
                observe_deliveries("stream", [delivery.created])
                tasks_service.log_delivered("stream", self.agent_id, [delivery])
            if len(deliveries) < tasks_service.CLAIM_BATCH:
                return

    async def _read_loop(self) -> None:
        limit = self.runtime.settings.stream_max_message_bytes
        while True:
            message = await self.websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            raw: Any = (
                message.get("text") if message.get("text") is not None else message.get("bytes")
            )
            if raw is None:
                continue
            if len(raw) > limit:
                await self._close(CLOSE_TOO_BIG, f"message over {limit} bytes")
                return
            if not self._limit.allow():
                await self._close(CLOSE_POLICY, "too many messages; slow down")
                return
            await self._accept(raw)

    async def _accept(self, raw: str | bytes) -> None:
        try:
            parsed = agent_message.validate_json(raw)
        except ValidationError as exc:
            first = exc.errors(include_input=False)[0] if exc.errors() else {"msg": "invalid"}
            where = ".".join(str(part) for part in first.get("loc", ()))
            # This message quotes the unknown tag, i.e. the agent's input: never echo it.
            what = "unknown type" if first.get("type") == "union_tag_invalid" else first["msg"]
            await self._send(
                StreamError(detail=f"invalid message: {where + ': ' if where else ''}{what}")
            )
            return
        if isinstance(parsed, Sync):
            # Messages are applied one at a time, in order: all earlier ones are stored.
            await self._send(Synced(sync_id=parsed.sync_id))
            return
        try:
            await run_in_threadpool(self._apply, parsed)
        except StellaError as exc:
            await self._send(StreamError(detail=exc.detail))

    def _apply(self, message: TaskProgress | TaskLogMessage) -> None:
        with transaction(self.runtime.engine) as session:
            if isinstance(message, TaskProgress):
                tasks_service.record_progress(
                    session=session,
                    agent_id=self.agent_id,
                    task_id=message.task_id,
                    progress=message.progress,
                    message=message.message,
                )
            else:
                tasks_service.append_agent_log(
                    session=session,
                    settings=self.runtime.settings,
                    agent_id=self.agent_id,
                    task_id=message.task_id,
                    line=LogLine(
                        timestamp=message.timestamp, level=message.level, message=message.message
                    ),
                )

    async def _send(
        self, message: TaskAssigned | TaskCancelledMessage | StreamError | Synced
    ) -> None:
        async with self._send_lock:
            await self.websocket.send_json(outgoing(message))

    async def _close(self, code: int, reason: str) -> None:
        with contextlib.suppress(RuntimeError, WebSocketDisconnect):
            async with self._send_lock:
                await self.websocket.close(code=code, reason=reason)
