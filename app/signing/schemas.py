"""Bodies of signed tasks and receipts (camelCase on the wire)."""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from pydantic import StringConstraints

from app.schemas import ApiModel, OmitNoneModel, Timestamp

Base64Url = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]*={0,2}$")]


class PublishedKey(OmitNoneModel):
    """A public task-signing key as agents pin it."""

    kid: str
    alg: str
    public_key: str  # base64url of the raw 32-byte Ed25519 key
    activates_at: str
    retires_at: str | None = None


class SigningKeys(ApiModel):
    keys: list[PublishedKey]


class ReceiptIn(ApiModel):
    """The agent's signed receipt, sent with its completion.

    `signed` is base64url of the canonical JSON the agent signed: `{"v": 1,
    "taskId", "agentId", "outcome", "resultDigest", "logsDigest",
    "startedAt", "finishedAt"}`.
    """

    alg: Annotated[str, StringConstraints(max_length=16)]
    signed: Annotated[Base64Url, StringConstraints(min_length=1, max_length=8192)]
    signature: Annotated[Base64Url, StringConstraints(min_length=1, max_length=2048)]


class ReceiptView(ApiModel):
    """Everything needed to check a receipt offline (`stella receipts verify`)."""

    task_id: uuid.UUID
    agent_id: uuid.UUID
    # The signed fields, for reading; `signed` holds the exact signed bytes.
    receipt: dict[str, Any]
    signed: str
    signature: str
    algorithm: str
    certificate: str
    ca_certificate: str
    received_at: Timestamp
