"""Hostile bodies on every operation that takes one: a 4xx problem+json, never a 5xx or a hang.

Malformed JSON, wrong types (whole body and each field), nesting 10,000 levels
deep, JSON objects nested past what is stored, and 5 MB (declared and
chunked), each sent with the right credentials so that only the body is
wrong. The operations come from /openapi.json, so a new one is covered.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from app.schemas import MAX_JSON_DEPTH
from tests.api.problems import assert_problem
from tests.conftest import AgentClient, dispatch
from tests.security.openapi import Operation, fetch_document, minimal_body, operations, resolve
from tests.tasks.helpers import delivered_task, view

Register = Callable[..., AgentClient]
FIVE_MB = 5 * 1024 * 1024
DEEP = 10_000


def nested(depth: int) -> Any:
    """An object nested `depth` levels deep (built without recursion)."""
    value: Any = {}
    for _ in range(depth - 1):
        value = {"a": value}
    return value


@dataclass
class Target:
    operation: Operation
    client: httpx.Client
    url: str
    valid: dict[str, Any]
    properties: list[str]
    # Fields holding any JSON object (payload, result, ...), not a model of their own.
    free_form: list[str]

    def post(self, content: bytes | Iterator[bytes], **headers: str) -> httpx.Response:
        started = time.monotonic()
        response = self.client.request(
            self.operation.method,
            self.url,
            content=content,
            headers={"Content-Type": "application/json", **headers},
            timeout=30,
        )
        assert time.monotonic() - started < 20, f"{self.operation.label} took too long"
        return response


@pytest.fixture
def targets(operator: httpx.Client, register: Register) -> list[Target]:
    """Each body-taking operation, with credentials and ids that let the body decide."""
    document = fetch_document(operator)
    agent = register("bodies")
    task = delivered_task(operator, agent)
    ids = {"id": agent.id, "taskId": task}
    found = []
    for operation in operations(document):
        schema = operation.body_schema
        if schema is None:
            continue
        client = {
            "operator": operator,
            "agent": agent.http,
            "register": operator,
            "public": operator,  # lockout-proof renewal: the body is the proof
        }.get(operation.kind)
        assert client is not None, f"{operation.label}: which client sends its body?"
        properties = resolve(document, schema).get("properties", {})
        found.append(
            Target(
                operation=operation,
                client=client,
                url=operation.url(**ids),
                valid=minimal_body(document, schema),
                properties=list(properties),
                free_form=[
                    name
                    for name, spec in properties.items()
                    if is_free_form(resolve(document, spec), document)
                ],
            )
        )
    labels = {target.operation.label for target in found}
    assert {
        "POST /api/v1/agents/register",
        "POST /api/v1/agents/{id}/heartbeat",
        "POST /api/v1/agents/{id}/tasks/{taskId}/complete",
        "POST /api/v1/tasks",
        "PUT /api/v1/agents/{id}",
    } <= labels, labels
    return found


def is_free_form(schema: dict[str, Any], document: dict[str, Any]) -> bool:
    """Any JSON object: no properties of its own, and values of any type."""
    options = [resolve(document, option) for option in schema.get("anyOf", [schema])]
    return any(
        option.get("type") == "object"
        and not {"properties", "patternProperties"} & set(option)
        and option.get("additionalProperties", True) in (True, {})
        for option in options
    )


def assert_refused(target: Target, response: httpx.Response, status: int = 422) -> None:
    assert response.status_code == status, (target.operation.label, response.text[:300])
    assert_problem(response, status)
    assert status in target.operation.documented, (target.operation.label, status)


class TestHostileBodies:
    @pytest.mark.parametrize(
        "content",
        [b'{"a": ', b"{'a': 1}", b"not json", b"[1, 2, 3]", b"123", b'"a string"', b"true"],
        ids=["truncated", "single-quotes", "not-json", "array", "number", "string", "bool"],
    )
    def test_malformed_or_mistyped_bodies_are_422(
        self, targets: list[Target], content: bytes
    ) -> None:
        for target in targets:
            assert_refused(target, target.post(content))

    def test_each_field_of_the_wrong_type_is_422(self, targets: list[Target]) -> None:
        for target in targets:
            for name in target.properties:
                body = {**target.valid, name: [{"wrong": "type"}]}
                response = target.post(json.dumps(body).encode())
                assert_refused(target, response)
                assert name in response.json()["detail"], (target.operation.label, name)

    def test_nesting_10000_deep_is_422(self, targets: list[Target]) -> None:
        deep_array = b"[" * DEEP + b"]" * DEEP
        for target in targets:
            assert_refused(target, target.post(deep_array))
            for name in target.properties:
                # Inside a field: the rest of the body is fine.
                rest = {key: value for key, value in target.valid.items() if key != name}
                head = json.dumps({**rest, name: None})[: -len("null}")]
                content = head.encode() + deep_array + b"}"
                response = target.post(content)
                assert_refused(target, response)
                assert "nested too deeply" in response.json()["detail"]

    def test_objects_nested_500_deep_are_never_a_5xx(self, targets: list[Target]) -> None:
        # Deep enough to exhaust the encoders that would store and serve it,
        # shallow enough for the JSON parser. A free-form field refuses it by
        # name; elsewhere it is a wrong type, or an unknown key an agent's
        # model ignores.
        free_form = []
        for target in targets:
            for name in target.properties:
                body = {**target.valid, name: nested(500)}
                response = target.post(json.dumps(body).encode())
                assert response.status_code < 500, (target.operation.label, name, response.text)
                assert response.status_code in target.operation.documented
                if name in target.free_form:
                    free_form.append(name)
                    assert_refused(target, response)
                    assert response.json()["detail"].startswith(f"body.{name}: ")
        assert {"payload", "credentials", "result"} <= set(free_form), free_form

    def test_five_megabytes_declared_or_chunked_are_413(self, targets: list[Target]) -> None:
        def chunks() -> Iterator[bytes]:
            yield b'{"a": "'
            for _ in range(FIVE_MB // (64 * 1024)):
                yield b"a" * 64 * 1024
            yield b'"}'

        declared = b'{"a": "' + b"a" * FIVE_MB + b'"}'
        for target in targets:
            assert_refused(target, target.post(declared), 413)
            assert_refused(target, target.post(chunks()), 413)


class TestDepthLimit:
    def test_the_deepest_accepted_payload_is_stored_and_served(
        self, operator: httpx.Client, register: Register
    ) -> None:
        agent = register()
        payload = {"manifest": nested(MAX_JSON_DEPTH - 1)}
        response = dispatch(operator, {"agentId": agent.id}, payload=payload)
        assert response.status_code == 201, response.text
        task_id = response.json()["tasks"][0]["taskId"]
        delivered = agent.poll().json()["tasks"]
        assert [task["payload"] for task in delivered] == [payload]
        assert view(operator, task_id)["payload"] == payload
        result = {"report": nested(MAX_JSON_DEPTH - 1)}
        assert agent.complete(task_id, result=result).status_code == 200
        assert view(operator, task_id)["result"] == result

    def test_one_level_deeper_is_422(self, operator: httpx.Client, register: Register) -> None:
        agent = register()
        response = dispatch(
            operator, {"agentId": agent.id}, payload={"manifest": nested(MAX_JSON_DEPTH)}
        )
        body = assert_problem(response, 422)
        assert body["detail"].startswith("body.payload: "), body["detail"]
        assert str(MAX_JSON_DEPTH) in body["detail"]
