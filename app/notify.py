"""The notifier: wakes whoever delivers an agent's tasks when they change.

Services call it after commit (see `app.db.after_commit`). A notification
only says "look again": the database is the truth, so a lost notification
delays a task and never loses it. This in-process notifier serves one web
process; the task stream adds a cross-process one behind the same interface.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol

EventKind = Literal["task_created", "task_cancelled", "agent_deleted"]


@dataclass(frozen=True)
class AgentEvent:
    kind: EventKind
    agent_id: uuid.UUID
    task_id: uuid.UUID | None = None


Listener = Callable[[AgentEvent], None]


class Notifier(Protocol):
    def publish(self, event: AgentEvent) -> None: ...

    def subscribe(self, agent_id: uuid.UUID, listener: Listener) -> Callable[[], None]:
        """Call `listener` for each event of `agent_id`; returns the unsubscribe function."""
        ...


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
