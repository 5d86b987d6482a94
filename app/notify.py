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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import redis

log = logging.getLogger(__name__)

# agent_offline goes on the fleet channel only: web processes' caches need it, streams do not.
EventKind = Literal["task_created", "task_cancelled", "agent_deleted", "agent_offline"]
FLEET_BATCH = 1000  # fleet-only events per pipeline round trip


@dataclass(frozen=True)
class AgentEvent:
    kind: EventKind
    agent_id: uuid.UUID
    task_id: uuid.UUID | None = None

    def encode(self) -> str:
        return json.dumps(
            {"kind": self.kind, "taskId": str(self.task_id) if self.task_id else None}
        )

    def encode_with_agent(self) -> str:
        """For the fleet channel, where the channel does not name the agent."""
        return json.dumps(
            {
                "kind": self.kind,
                "agentId": str(self.agent_id),
                "taskId": str(self.task_id) if self.task_id else None,
            }
        )

    @classmethod
    def decode_with_agent(cls, data: str | bytes) -> AgentEvent:
        body = json.loads(data)
        return cls.decode(uuid.UUID(body["agentId"]), data)

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


def fleet_channel(prefix: str) -> str:
    """The pub/sub channel every web process hears: every agent's events, once more."""
    return f"{prefix}stella:fleet"


Listener = Callable[[AgentEvent], None]


def _tell(listeners: list[Listener], event: AgentEvent) -> None:
    for listener in listeners:
        try:
            listener(event)
        except Exception:
            # One listener failing (its loop gone at shutdown) must not stop the others.
            log.exception("listener failed on %s for agent %s", event.kind, event.agent_id)


class Notifier(Protocol):
    def publish(self, event: AgentEvent) -> None: ...

    def publish_fleet(self, events: Sequence[AgentEvent]) -> None:
        """Tell every web process (not the agents' streams), in as few round trips as may be."""

    def subscribe_all(self, listener: Listener) -> None:
        """Hear every event this process publishes, synchronously, as it is published."""


class LocalNotifier:
    """Delivers events to listeners in this process, synchronously."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._listeners: dict[uuid.UUID, list[Listener]] = {}
        self._fleet_listeners: list[Listener] = []

    def publish(self, event: AgentEvent) -> None:
        with self._lock:
            listeners = [*self._fleet_listeners, *self._listeners.get(event.agent_id, ())]
        _tell(listeners, event)

    def publish_fleet(self, events: Sequence[AgentEvent]) -> None:
        with self._lock:
            listeners = list(self._fleet_listeners)
        for event in events:
            _tell(listeners, event)

    def subscribe_all(self, listener: Listener) -> None:
        """Call `listener` for every event of every agent (for the life of the process)."""
        with self._lock:
            self._fleet_listeners.append(listener)

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
        self._fleet = fleet_channel(prefix)
        self._local: list[Listener] = []

    def subscribe_all(self, listener: Listener) -> None:
        self._local.append(listener)

    def publish(self, event: AgentEvent) -> None:
        # This process first, before its request is answered: its own next
        # request must not depend on a round trip through Redis.
        _tell(self._local, event)
        try:
            # One round trip: the agent's channel (its stream) and the fleet
            # channel (every web process's heartbeat caches and pending index).
            with self._client.pipeline(transaction=False) as pipe:
                pipe.publish(agent_channel(self._prefix, event.agent_id), event.encode())
                pipe.publish(self._fleet, event.encode_with_agent())
                pipe.execute()
        except redis.RedisError as exc:
            log.warning("could not publish %s for agent %s: %s", event.kind, event.agent_id, exc)

    def publish_fleet(self, events: Sequence[AgentEvent]) -> None:
        for event in events:
            _tell(self._local, event)
        try:
            for start in range(0, len(events), FLEET_BATCH):
                with self._client.pipeline(transaction=False) as pipe:
                    for event in events[start : start + FLEET_BATCH]:
                        pipe.publish(self._fleet, event.encode_with_agent())
                    pipe.execute()
        except redis.RedisError as exc:
            # The caches it would have corrected fall back on their own checks.
            log.warning("could not publish %d fleet events: %s", len(events), exc)

    def close(self) -> None:
        self._client.close()
