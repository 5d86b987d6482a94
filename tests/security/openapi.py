"""The API's operations as /openapi.json lists them, and who may call each.

Tests iterate over these, so that a new endpoint is covered as soon as it is
documented; one the rules below cannot classify fails the tests until it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import httpx

Kind = Literal["public", "register", "operator", "agent", "operator-or-self"]
REGISTER = ("POST", "/api/v1/agents/register")
# Operators may read any agent, an agent only itself.
OPERATOR_OR_SELF = {("GET", "/api/v1/agents/{id}")}


@dataclass(frozen=True)
class Operation:
    method: str
    path: str
    kind: Kind
    spec: dict[str, Any]

    @property
    def label(self) -> str:
        return f"{self.method} {self.path}"

    @property
    def documented(self) -> set[int]:
        return {int(code) for code in self.spec["responses"]}

    @property
    def body_schema(self) -> dict[str, Any] | None:
        body = self.spec.get("requestBody")
        if body is None:
            return None
        schema: dict[str, Any] = body["content"]["application/json"]["schema"]
        return schema

    def url(self, **ids: str) -> str:
        """The path with its parameters filled in from `ids` (by parameter name)."""
        path = self.path
        for name, value in ids.items():
            path = path.replace("{" + name + "}", value)
        assert "{" not in path, f"{self.label}: no value for a path parameter"
        return path


def fetch_document(client: httpx.Client) -> dict[str, Any]:
    response = client.get("/openapi.json")
    assert response.status_code == 200, response.text
    document: dict[str, Any] = response.json()
    return document


def operations(document: dict[str, Any]) -> list[Operation]:
    found = []
    for path, methods in document["paths"].items():
        for method, spec in methods.items():
            found.append(
                Operation(method.upper(), path, classify(method.upper(), path, spec), spec)
            )
    return found


def classify(method: str, path: str, spec: dict[str, Any]) -> Kind:
    tags = set(spec.get("tags", ()))
    if not spec.get("security"):
        return "public"
    if (method, path) == REGISTER:
        return "register"
    if (method, path) in OPERATOR_OR_SELF:
        return "operator-or-self"
    if "operators" in tags:
        return "operator"
    if tags == {"agents"}:
        return "agent"
    raise AssertionError(f"{method} {path}: say in tests/security/openapi.py who may call it")


def resolve(document: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        schema = document["components"]["schemas"][name]
    return schema


def minimal_body(document: dict[str, Any], schema: dict[str, Any]) -> Any:
    """The smallest value of `schema`: its required properties only, plain values."""
    schema = resolve(document, schema)
    if "anyOf" in schema:
        return minimal_body(document, schema["anyOf"][0])
    kind = schema.get("type")
    if kind == "object":
        properties = schema.get("properties", {})
        return {
            name: minimal_body(document, properties[name]) for name in schema.get("required", ())
        }
    values: dict[str, Any] = {
        "string": "x",
        "integer": schema.get("minimum", 1),
        "number": schema.get("minimum", 1),
        "boolean": True,
        "array": [],
    }
    return values.get(str(kind))
