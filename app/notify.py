"""The notifier: wakes whoever delivers an agent's tasks when they change.

Services call it after commit (see `app.db.after_commit`). A notification
only says "look again": the database is the truth, so a lost notification
delays a task and never loses it (streams also re-read on a timer).

- `LocalNotifier`: listeners in this process; the single-node fallback.
- `RedisNotifier`: publishes to Redis pub/sub (STELLA_REDIS_URL), one channel
  per agent, so a task created in any web process or worker reaches the
  stream of whichever web process the agent is connected to. The receiving
  side is `app.stream.hub.RedisHub`.
"""

from __future__ import annotations

import json
import logging
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol

import redis

log = logging.getLogger(__name__)

EventKind = Literal["task_created", "task_cancelled", "agent_deleted"]


@dataclass(frozen=True)
class AgentEvent:
    kind: EventKind
    agent_id: uuid.UUID
    task_id: uuid.UUID | None = None

    def encode(self) -> str:
        return json.dumps(
            {"kind": self.kind, "taskId": str(self.task_id) if self.task_id else None}
        )

    @classmethod
    def decode(cls, agent_id: uuid.UUID, data: str | bytes) -> AgentEvent:
        body = json.loads(data)
        task_id = body.get("taskId")
        return cls(
            kind=body["kind"], agent_id=agent_id, task_id=uuid.UUID(task_id) if task_id else None
        )


def agent_channel(prefix: str, agent_id: uuid.UUID) -> str:
    """The pub/sub channel of one agent's events."""
    return f"{prefix}stella:agent:{agent_id}"


Listener = Callable[[AgentEvent], None]


class Notifier(Protocol):
    def publish(self, event: AgentEvent) -> None: ...


class LocalNotifier:
    """Delivers events to listeners in this process, synchronously."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._listeners: dict[uuid.UUID, list[Listener]] = {}

    def publish(self, event: AgentEvent) -> None:
        with self._lock:
            listeners = list(self._listeners.get(event.agent_id, ()))
        for listener in listeners:
            listener(event)

    def subscribe(self, agent_id: uuid.UUID, listener: Listener) -> Callable[[], None]:
        """Call `listener` for each event of `agent_id`; returns the unsubscribe function."""
        with self._lock:
            self._listeners.setdefault(agent_id, []).append(listener)

        def unsubscribe() -> None:
            with self._lock:
                remaining = [x for x in self._listeners.get(agent_id, []) if x is not listener]
                if remaining:
                    self._listeners[agent_id] = remaining
                else:
                    self._listeners.pop(agent_id, None)

        return unsubscribe


class RedisNotifier:
    """Publishes each event on the agent's Redis channel (fire and forget).

    A publish that fails (Redis down) is logged and dropped: the task is in
    the database, and the stream finds it on its next re-read.
    """

    def __init__(self, url: str, *, prefix: str = "") -> None:
        self._client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1)
        self._prefix = prefix

    def publish(self, event: AgentEvent) -> None:
        try:
            self._client.publish(agent_channel(self._prefix, event.agent_id), event.encode())
        except redis.RedisError as exc:
            log.warning("could not publish %s for agent %s: %s", event.kind, event.agent_id, exc)

    def close(self) -> None:
        self._client.close()
