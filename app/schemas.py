"""The bases of every request and response body: camelCase on the wire."""

from __future__ import annotations

import datetime as dt
import re
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    GetCoreSchemaHandler,
    GetJsonSchemaHandler,
    PlainSerializer,
    SerializerFunctionWrapHandler,
    model_serializer,
)
from pydantic.alias_generators import to_camel
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema, core_schema


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


_CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f]")


def _no_control_characters(value: str) -> str:
    if _CONTROL_CHARACTERS.search(value):
        raise ValueError("must not contain control characters")
    return value


class NoControlCharacters:
    """`Annotated` marker: text without control characters (it ends up in
    listings, selectors and terminals), said in the OpenAPI document too."""

    def __get_pydantic_core_schema__(
        self, source: Any, handler: GetCoreSchemaHandler
    ) -> CoreSchema:
        return core_schema.no_info_after_validator_function(_no_control_characters, handler(source))

    def __get_pydantic_json_schema__(
        self, schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        json_schema = handler(schema)
        json_schema["pattern"] = "^[^\\x00-\\x1f\\x7f]*$"
        return json_schema


# Deeper JSON documents are refused: the encoders that store and serve them
# recurse once per level, and give out (a 500) long before the body limit.
MAX_JSON_DEPTH = 32


def _shallow(value: dict[str, Any]) -> dict[str, Any]:
    # Iterative: a recursive walk would fail on exactly the documents it refuses.
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise ValueError(f"nested deeper than {MAX_JSON_DEPTH} levels")
        children = node.values() if isinstance(node, dict) else node
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return value


# A free-form JSON object (payload, credentials, result), of bounded depth.
JsonObject = Annotated[dict[str, Any], AfterValidator(_shallow)]


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
