"""Request and response bodies of the registration-token API."""

from __future__ import annotations

from pydantic import Field

from app.schemas import ApiModel, OperatorRequest, Timestamp


class RegistrationTokenCreate(OperatorRequest):
    ttl_seconds: int | None = Field(default=None, ge=1)


class RegistrationTokenCreated(ApiModel):
    token: str
    expires_at: Timestamp
