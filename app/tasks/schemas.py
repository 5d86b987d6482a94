"""Request and response bodies of the task API."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Annotated, Any, Literal

from pydantic import Field, PrivateAttr, StringConstraints, model_validator

from app.schemas import ApiModel, JsonObject, OmitNoneModel, OperatorRequest, Timestamp
from app.signing.schemas import ReceiptIn

TaskType = Annotated[
    str, StringConstraints(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
]
TaskStatus = Literal[
    "pending", "assigned", "running", "succeeded", "failed", "cancelled", "timed_out", "unknown"
]
OPEN_STATUSES: tuple[str, ...] = ("pending", "assigned", "running")
# Delivered and not finished: what a timeout, progress or completion applies to.
RUNNING_STATUSES: tuple[str, ...] = ("assigned", "running")
FINAL_STATUSES: tuple[str, ...] = ("succeeded", "failed", "cancelled", "timed_out")
# Its agent was lost mid-way (STELLA_OUTCOME_UNKNOWN): neither open nor final,
# until the agent reports what happened (app/tasks/lost_work.py).
UNKNOWN_STATUS = "unknown"
MAX_TIMEOUT = 7 * 24 * 3600


class TaskDelivery(OmitNoneModel):
    """A task as handed to its agent (heartbeat answer, stream message)."""

    task_id: uuid.UUID
    task_type: str
    payload: dict[str, Any]
    credentials: dict[str, Any] | None = None
    timeout: int
    priority: int
    # The server's signature over taskId, agentId, taskType, payload and
    # timeout: {"alg", "kid", "value"} (see app/signing/).
    signature: dict[str, str] | None = None
    # When the task was created (for the dispatch-to-delivery metric) and by
    # which request (for the delivery's log line); never sent.
    _created_at: dt.datetime | None = PrivateAttr(default=None)
    _request_id: str | None = PrivateAttr(default=None)

    @property
    def created(self) -> dt.datetime | None:
        return self._created_at

    @property
    def request_id(self) -> str | None:
        return self._request_id

    def created_on(self, created_at: dt.datetime, request_id: str | None = None) -> TaskDelivery:
        self._created_at = created_at
        self._request_id = request_id
        return self


class TaskPending(TaskDelivery):
    """An unfinished task as the poll endpoint lists it."""

    status: str
    created_at: Timestamp


class TaskPendingList(ApiModel):
    tasks: list[TaskPending]


class TaskTarget(OperatorRequest):
    agent_id: uuid.UUID | None = None
    capability: Annotated[str, StringConstraints(min_length=1, max_length=64)] | None = None
    labels: Annotated[dict[str, str], Field(max_length=64)] | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> TaskTarget:
        selector = self.capability is not None or self.labels is not None
        if self.agent_id is not None and selector:
            raise ValueError("target is either {agentId} or a selector {capability, labels}")
        if self.agent_id is None and not selector:
            raise ValueError("target needs agentId, capability or labels")
        return self


class TaskCreate(OperatorRequest):
    task_type: TaskType
    payload: JsonObject = {}
    credentials: Annotated[JsonObject, Field(max_length=64)] | None = None
    timeout: Annotated[int, Field(ge=1, le=MAX_TIMEOUT)] | None = None
    priority: Annotated[int, Field(ge=-1000, le=1000)] = 0
    target: TaskTarget


class TaskRef(ApiModel):
    task_id: uuid.UUID
    agent_id: uuid.UUID
    status: str


class TasksCreated(ApiModel):
    tasks: list[TaskRef]


class DispatchAccepted(ApiModel):
    dispatch_id: uuid.UUID
    status: str


class DispatchView(ApiModel):
    dispatch_id: uuid.UUID
    status: str
    target: dict[str, Any]
    created_at: Timestamp
    tasks: list[TaskRef]


class LogLine(ApiModel):
    timestamp: Timestamp
    level: Annotated[str, StringConstraints(min_length=1, max_length=16)] = "info"
    message: Annotated[str, StringConstraints(max_length=64 * 1024)]


class TaskView(ApiModel):
    """A task as operators see it: never its credentials."""

    task_id: uuid.UUID
    agent_id: uuid.UUID
    dispatch_id: uuid.UUID | None
    task_type: str
    status: str
    priority: int
    timeout: int
    payload: dict[str, Any]
    created_at: Timestamp
    assigned_at: Timestamp | None
    started_at: Timestamp | None
    completed_at: Timestamp | None
    progress: int | None
    progress_message: str | None
    result: dict[str, Any] | None
    logs: list[LogLine]
    error: str | None


class TaskSummary(ApiModel):
    task_id: uuid.UUID
    agent_id: uuid.UUID
    task_type: str
    status: str
    priority: int
    created_at: Timestamp
    completed_at: Timestamp | None


class TaskComplete(ApiModel):
    success: bool
    result: JsonObject | None = None
    logs: Annotated[list[LogLine], Field(max_length=10_000)] = []
    error: Annotated[str, StringConstraints(max_length=4096)] | None = None
    # The agent's signed receipt (app/signing/receipts.py); optional, as for seed agents.
    receipt: ReceiptIn | None = None


class Acknowledged(ApiModel):
    acknowledged: bool = True


class TaskCancelled(ApiModel):
    task_id: uuid.UUID
    status: str
