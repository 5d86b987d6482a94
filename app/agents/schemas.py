"""Request and response bodies of the agent API (camelCase, as the seed spells them)."""

from __future__ import annotations

import uuid
from typing import Annotated, Any, Literal

from pydantic import Field, StringConstraints, field_validator

from app.schemas import (
    ApiModel,
    NoControlCharacters,
    OmitNoneModel,
    OperatorRequest,
    Timestamp,
)
from app.signing.schemas import PublishedKey
from app.tasks.schemas import TaskDelivery

AgentName = Annotated[
    str, StringConstraints(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
]
Capability = Annotated[
    str, StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
]
LabelKey = Annotated[
    str, StringConstraints(min_length=1, max_length=63, pattern=r"^[A-Za-z0-9][A-Za-z0-9._/-]*$")
]
LabelValue = Annotated[str, StringConstraints(max_length=255), NoControlCharacters()]
Capabilities = Annotated[list[Capability], Field(max_length=64)]
Labels = Annotated[dict[LabelKey, LabelValue], Field(max_length=64)]
AgentStatus = Literal["online", "offline", "degraded"]


def _unique(values: list[str] | None) -> list[str] | None:
    """Capabilities without repeats, in the order given (None stays None)."""
    return None if values is None else list(dict.fromkeys(values))


class AgentRegister(ApiModel):
    name: AgentName
    version: Annotated[str, StringConstraints(max_length=64), NoControlCharacters()] = ""
    capabilities: Capabilities = []
    labels: Labels = {}
    # PEM PKCS#10: certify this key instead of generating one for the agent.
    csr: Annotated[str, StringConstraints(max_length=16 * 1024)] | None = None

    _dedupe = field_validator("capabilities")(_unique)


class AgentConfig(ApiModel):
    heartbeat_interval: int
    task_poll_interval: int
    log_level: str


class AgentCertificate(OmitNoneModel):
    cert: str
    # Absent when the agent sent a CSR: its private key never left it.
    key: str | None = None
    ca: str
    expires_at: Timestamp


class AgentRegistered(ApiModel):
    agent_id: uuid.UUID
    token: str
    config: AgentConfig
    certificate: AgentCertificate
    # The public keys that sign this agent's tasks, for it to pin (app/signing/).
    task_signing_keys: list[PublishedKey] = []


class ResourceUsage(ApiModel):
    cpu: Annotated[float, Field(ge=0, le=100_000, allow_inf_nan=False)] | None = None
    memory: Annotated[float, Field(ge=0, le=100_000, allow_inf_nan=False)] | None = None
    disk: Annotated[float, Field(ge=0, le=100_000, allow_inf_nan=False)] | None = None


class AgentPublic(ApiModel):
    id: uuid.UUID
    name: str
    version: str
    status: str
    capabilities: list[str]
    labels: dict[str, str]
    last_heartbeat: Timestamp
    resource_usage: dict[str, Any] | None


class AgentCertificateInfo(ApiModel):
    serial: str
    expires_at: Timestamp


class AgentDetail(AgentPublic):
    reported_status: str
    running_tasks: int
    registered_at: Timestamp
    certificate: AgentCertificateInfo
    open_tasks: int


class AgentUpdate(OperatorRequest):
    name: AgentName | None = None
    labels: Labels | None = None
    capabilities: Capabilities | None = None

    _dedupe = field_validator("capabilities")(_unique)


class AgentDeleted(ApiModel):
    deleted: bool = True


class Heartbeat(ApiModel):
    status: Annotated[str, StringConstraints(min_length=1, max_length=32), NoControlCharacters()]
    resource_usage: ResourceUsage | None = None
    capabilities: Capabilities | None = None
    running_tasks: Annotated[int, Field(ge=0, le=1_000_000)] = 0

    _dedupe = field_validator("capabilities")(_unique)


class CertificateRenewal(ApiModel):
    cert: str
    expires_at: Timestamp


class HeartbeatAnswer(OmitNoneModel):
    tasks: list[TaskDelivery]
    certificate_renewal: CertificateRenewal | None = None
