"""Forged page cursors on every listing /openapi.json documents: 422, never a 500."""

from __future__ import annotations

import base64

import httpx
import pytest

from tests.api.problems import assert_problem
from tests.security.openapi import fetch_document, operations


def forged(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


FORGED = {
    "not-base64": "%%%",
    "not-json": forged(b"not json"),
    # Deeper than the JSON decoder recurses, short enough for a URL.
    "nested-3000": forged(b"[" * 3_000 + b"]" * 3_000),
    "object": forged(b'{"a": 1}'),
    "wrong-arity": forged(b'["a", "b", "c"]'),
    "nested-values": forged(b'[[1], {"a": 2}]'),
    "numbers": forged(b"[1, 2]"),
    "booleans": forged(b"[true, false]"),
    "nulls": forged(b"[null, null]"),
}


@pytest.mark.parametrize("cursor", FORGED.values(), ids=FORGED.keys())
def test_forged_cursors_are_422(operator: httpx.Client, cursor: str) -> None:
    listings = [
        operation
        for operation in operations(fetch_document(operator))
        if any(parameter["name"] == "cursor" for parameter in operation.spec.get("parameters", ()))
    ]
    assert {op.path for op in listings} >= {"/api/v1/agents", "/api/v1/tasks"}, listings
    for operation in listings:
        assert operation.kind == "operator", operation.label
        response = operator.get(operation.path, params={"cursor": cursor})
        body = assert_problem(response, 422)
        assert body["detail"] == "cursor is not valid", (operation.label, body)
