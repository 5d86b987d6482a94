"""The bases of every request and response body: camelCase on the wire."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    PlainSerializer,
    SerializerFunctionWrapHandler,
    model_serializer,
)
from pydantic.alias_generators import to_camel


def _rfc3339(value: dt.datetime) -> str:
    return value.astimezone(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _as_utc(value: dt.datetime) -> dt.datetime:
    # A timestamp without an offset is taken as UTC, like the seed's examples.
    try:
        return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)
    except OverflowError as exc:  # 0001-01-01T00:00+01:00: pydantic only turns ValueError into 422
        raise ValueError("timestamp out of range") from exc


# UTC, millisecond precision, "Z" suffix: 2026-01-10T14:23:45.123Z
Timestamp = Annotated[
    dt.datetime, AfterValidator(_as_utc), PlainSerializer(_rfc3339, return_type=str)
]


class ApiModel(BaseModel):
    """Response bodies, and requests from agents (unknown fields ignored, so
    that a newer agent can talk to an older server)."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, from_attributes=True)


class OperatorRequest(ApiModel):
    """Requests from operators: an unknown field is a typo worth a 422."""

    model_config = ConfigDict(extra="forbid")


class OmitNoneModel(ApiModel):
    """A response whose optional top-level fields are left out when unset
    (`certificate.key` after a CSR registration, `certificateRenewal`, ...);
    nested payloads keep their nulls."""

    @model_serializer(mode="wrap")
    def _omit_none(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        return {key: value for key, value in data.items() if value is not None}
