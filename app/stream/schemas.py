"""The messages of the task stream, both ways."""

from __future__ import annotations

import uuid
from typing import Annotated, Any, Literal

from pydantic import Field, StringConstraints, TypeAdapter

from app.models.types import utcnow
from app.schemas import ApiModel, Timestamp
from app.tasks.schemas import TaskDelivery


class TaskAssigned(ApiModel):
    type: Literal["task_assigned"] = "task_assigned"
    task: TaskDelivery


class TaskCancelledMessage(ApiModel):
    type: Literal["task_cancelled"] = "task_cancelled"
    task_id: uuid.UUID


class StreamError(ApiModel):
    type: Literal["error"] = "error"
    detail: str


class TaskProgress(ApiModel):
    type: Literal["task_progress"]
    task_id: uuid.UUID
    progress: Annotated[int, Field(ge=0, le=100)] | None = None
    message: Annotated[str, StringConstraints(max_length=1024)] | None = None


class TaskLogMessage(ApiModel):
    type: Literal["task_log"]
    task_id: uuid.UUID
    level: Annotated[str, StringConstraints(min_length=1, max_length=16)] = "info"
    message: Annotated[str, StringConstraints(max_length=64 * 1024)]
    timestamp: Timestamp = Field(default_factory=utcnow)


class Sync(ApiModel):
    """A barrier: answered with `synced` once every earlier message was applied."""

    type: Literal["sync"]
    sync_id: Annotated[str, StringConstraints(min_length=1, max_length=64)]


class Synced(ApiModel):
    type: Literal["synced"] = "synced"
    sync_id: str


AgentMessage = Annotated[TaskProgress | TaskLogMessage | Sync, Field(discriminator="type")]
agent_message: TypeAdapter[TaskProgress | TaskLogMessage | Sync] = TypeAdapter(AgentMessage)


def outgoing(message: ApiModel) -> dict[str, Any]:
    """A server message as JSON-ready data, camelCase like every body."""
    data: dict[str, Any] = message.model_dump(mode="json", by_alias=True)
    return data
