"""Property-based requests from /openapi.json against the live app (Schemathesis).

Every documented operation gets generated requests, valid and invalid ones,
with working credentials: the operator's token, or a registered agent's JWT
and client certificate on its own path (and, for registration, half the time
a fresh token). No answer may be a server error, except the 503 the contract
gives a dispatch no online agent can take, and every answer must be the
documented one: its status, content type, headers and body schema.

Bounded: a fixed number of examples per operation, no shrinking, derandomized
(the same requests each run). One backend is enough: PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from requests.structures import CaseInsensitiveDict
from schemathesis import APIOperation, Case, CheckContext, GenerationMode, Response
from schemathesis.core.result import Ok
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.conftest import ADMIN_TOKEN, AgentClient, Stack, dispatch, mint_token
from tests.security.openapi import classify, fetch_document
from tests.signing.helpers import make_receipt
from tests.tasks.helpers import create_task, delivered_task

Register = Callable[..., AgentClient]
Operation = APIOperation[Any, Any, Any, Any]
AnyCase = Case[Operation]
EXAMPLES = {GenerationMode.POSITIVE: 20, GenerationMode.NEGATIVE: 12}
# The contract's own 503: a dispatch to an offline agent, or that no online agent matches.
ALLOWED_SERVER_ERRORS = {("POST", "/api/v1/tasks", 503)}
# Off by default (STELLA_CERT_GRACE), so refused with 403 on this stack whatever is sent.
OFF_BY_DEFAULT = {
    "POST /api/v1/agents/{id}/recover/challenge",
    "POST /api/v1/agents/{id}/recover",
}


def no_server_error(ctx: CheckContext, response: Response, case: AnyCase) -> bool | None:
    operation = case.operation
    key = (operation.method.upper(), operation.path, response.status_code)
    if response.status_code >= 500 and key not in ALLOWED_SERVER_ERRORS:
        raise AssertionError(
            f"{operation.label} answered {response.status_code}: {response.text[:500]}"
        )
    return None


def invalid_data_rejected(ctx: CheckContext, response: Response, case: AnyCase) -> bool | None:
    # A body over the size limit is refused before it is read: a rejection too.
    if response.status_code == 413:
        return None
    return negative_data_rejection(ctx, response, case)


CHECKS = [
    no_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    invalid_data_rejected,
]

FUZZ_SETTINGS = settings(
    deadline=None,
    database=None,
    derandomize=True,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=list(HealthCheck),
)


def order(kind: str) -> int:
    # The agent's own operations first: an operator's cancel or delete comes after.
    return {"agent": 0, "operator-or-self": 0, "register": 1, "public": 1}.get(kind, 2)


def negatable(operation: Operation) -> bool:
    """Whether the operation takes anything an invalid request could get wrong."""
    raw = operation.definition.raw
    return bool(raw.get("parameters")) or "requestBody" in raw


@dataclass
class Caller:
    """How one operation is called: credentials, and the ids of real records."""

    stack: Stack
    operator: httpx.Client
    session: requests.Session
    kind: str
    headers: dict[str, str]
    cert: tuple[str, str] | None
    ids: dict[str, str]
    # Statuses answered, per operation: proof that valid requests got through.
    seen: dict[str, set[int]]
    target: dict[str, str] | None = None

    def fuzz(self, operation: Operation, mode: GenerationMode) -> None:
        strategy = operation.as_strategy(
            mode,
            headers=self.headers or None,
            path_parameters=self.ids if mode is GenerationMode.POSITIVE and self.ids else None,
        )

        @settings(FUZZ_SETTINGS, max_examples=EXAMPLES[mode])
        @given(case=strategy, steer=st.booleans())
        def run(case: AnyCase, steer: bool) -> None:
            # Half the valid cases get what generation cannot guess: a fresh
            # registration token, a dispatch target that exists.
            if steer and self.kind == "register":
                headers = dict(case.headers or {})
                headers["X-Agent-Token"] = mint_token(self.operator)
                case.headers = CaseInsensitiveDict(headers)
            if steer and self.target is not None and isinstance(case.body, dict):
                case.body = {**case.body, "target": dict(self.target)}
            response = case.call_and_validate(
                base_url=self.stack.base_url,
                session=self.session,
                checks=CHECKS,
                verify=str(self.stack.ca_file),
                cert=self.cert,
                timeout=30,
            )
            self.seen.setdefault(operation.label, set()).add(response.status_code)

        run()


@pytest.mark.parametrize(
    "backend", [pytest.param("postgresql", marks=pytest.mark.postgres)], indirect=True
)
def test_every_operation(
    backend: str,
    stack: Stack,
    operator: httpx.Client,
    register: Register,
    subtests: pytest.Subtests,
) -> None:
    document = fetch_document(operator)
    agent = register("fuzz-agent", labels={"site": "lab"})
    delivered = delivered_task(operator, agent)
    pending = create_task(operator, agent)
    # A task the agent completed with a signed receipt, for the receipt endpoint.
    receipted = delivered_task(operator, agent)
    receipt = make_receipt(
        agent.registration["certificate"]["key"], task_id=receipted, agent_id=agent.id
    )
    assert agent.complete(receipted, receipt=receipt).status_code == 200
    selected = dispatch(operator, {"labels": {"site": "lab"}})
    assert selected.status_code == 202, selected.text
    known_ids = {"id": agent.id, "dispatchId": selected.json()["dispatchId"]}
    results = list(schemathesis.openapi.from_dict(document).get_all_operations())
    found = [result.ok() for result in results if isinstance(result, Ok)]
    assert len(found) == len(results), "the OpenAPI document has an invalid operation"
    found.sort(key=lambda op: order(classify(op.method.upper(), op.path, op.definition.raw)))
    assert len(found) >= 15, [op.label for op in found]
    seen: dict[str, set[int]] = {}
    with requests.Session() as session:
        for operation in found:
            method = operation.method.upper()
            kind = classify(method, operation.path, operation.definition.raw)
            caller = Caller(
                stack=stack,
                operator=operator,
                session=session,
                kind=kind,
                headers={},
                cert=None,
                seen=seen,
                # Valid requests name real records (never the agent, to delete).
                ids={
                    name: value
                    for name, value in known_ids.items()
                    if "{" + name + "}" in operation.path and method != "DELETE"
                },
            )
            if "{taskId}" in operation.path:
                # The agent completes the task it holds; operators read and cancel another.
                caller.ids["taskId"] = delivered if kind == "agent" else pending
                if operation.path.endswith("/receipt"):
                    caller.ids["taskId"] = receipted
            if (method, operation.path) == ("POST", "/api/v1/tasks"):
                caller.target = {"agentId": agent.id}
            if kind == "operator":
                caller.headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
            elif kind in ("agent", "operator-or-self"):
                caller.headers = {"Authorization": f"Bearer {agent.token}"}
                caller.cert = (str(agent.cert_file), str(agent.key_file))
            for mode in EXAMPLES:
                if mode is GenerationMode.NEGATIVE and not negatable(operation):
                    continue
                with subtests.test(f"{operation.label} {mode.value}"):
                    caller.fuzz(operation, mode)
    # The credentials worked: every operation but a delete of random ids succeeded at least once.
    never = [
        label
        for label, statuses in seen.items()
        if not label.startswith("DELETE")
        and label not in OFF_BY_DEFAULT
        and not any(200 <= status < 300 for status in statuses)
    ]
    assert not never, {label: seen[label] for label in never}
