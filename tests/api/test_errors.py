"""The API as a whole: every error is problem+json; health, docs and the CA are served."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from cryptography import x509

from tests.api.problems import assert_problem
from tests.conftest import Stack

LIMIT = 1024 * 1024  # STELLA_MAX_BODY_BYTES default: 1 MiB

SEED_PATHS = {
    "/api/v1/agents/register": {"post"},
    "/api/v1/agents": {"get"},
    "/api/v1/agents/{id}": {"get", "put", "delete"},
    "/api/v1/agents/{id}/heartbeat": {"post"},
    "/api/v1/agents/{id}/tasks": {"get"},
    "/api/v1/agents/{id}/tasks/{taskId}/complete": {"post"},
}
OPERATOR_PATHS = {
    "/api/v1/registration-tokens": {"post"},
    "/api/v1/tasks": {"get", "post"},
    "/api/v1/tasks/{taskId}": {"get"},
    "/api/v1/tasks/{taskId}/cancel": {"post"},
    "/api/v1/dispatches/{dispatchId}": {"get"},
    "/api/v1/pki/ca.pem": {"get"},
}

# Parameters must be the same in every xdist worker: no random ids in them.
FIXED_ID = "6f1c0d2e-8a4b-4c3d-9e5f-0a1b2c3d4e5f"


@pytest.fixture
def anonymous(stack: Stack) -> Iterator[httpx.Client]:
    """A client with no credentials at all."""
    with httpx.Client(base_url=stack.base_url, verify=stack.ssl_context(), timeout=30) as client:
        yield client


class TestUnknownRoute:
    @pytest.mark.parametrize(
        "path", ["/nope", "/api/v1/nope", "/api/v2/agents", "/api/v1/agents/register/extra"]
    )
    def test_is_404_problem(self, operator: httpx.Client, path: str) -> None:
        body = assert_problem(operator.get(path), 404)
        assert body["title"] == "Not Found"

    def test_is_404_for_anonymous_callers_too(self, anonymous: httpx.Client) -> None:
        assert_problem(anonymous.post("/api/v1/nothing-here", json={}), 404)


class TestWrongMethod:
    @pytest.mark.parametrize(
        ("method", "path", "allowed"),
        [
            ("DELETE", "/api/v1/tasks", {"GET", "POST"}),
            ("PATCH", f"/api/v1/agents/{FIXED_ID}", {"GET", "PUT", "DELETE"}),
            ("POST", "/healthz", {"GET"}),
            ("GET", f"/api/v1/tasks/{FIXED_ID}/cancel", {"POST"}),
            ("GET", f"/api/v1/agents/{FIXED_ID}/heartbeat", {"POST"}),
        ],
    )
    def test_is_405_problem_with_allow(
        self, operator: httpx.Client, method: str, path: str, allowed: set[str]
    ) -> None:
        response = operator.request(method, path)
        body = assert_problem(response, 405)
        assert body["title"] == "Method Not Allowed"
        # Starlette names the methods of the first route matching the path only (for
        # /api/v1/tasks: POST, not GET), so the header is a non-empty part of `allowed`.
        named = {m.strip() for m in response.headers["Allow"].split(",")}
        assert named
        assert named <= allowed


class TestMalformedBody:
    @pytest.mark.parametrize(
        "content",
        [b'{"taskType": ', b"not json", b"[1, 2, 3]", b"null", b'"a string"', b"\xff\xfe"],
        ids=["truncated", "not-json", "array", "null", "string", "not-utf8"],
    )
    def test_operator_body_is_422_never_500(self, operator: httpx.Client, content: bytes) -> None:
        response = operator.post(
            "/api/v1/tasks", content=content, headers={"Content-Type": "application/json"}
        )
        assert_problem(response, 422)

    def test_register_body_is_422(self, anonymous: httpx.Client) -> None:
        response = anonymous.post(
            "/api/v1/agents/register",
            content=b'{"name": "x",',
            headers={"Content-Type": "application/json", "X-Agent-Token": "whatever"},
        )
        assert_problem(response, 422)

    def test_the_rejected_input_is_not_echoed(self, operator: httpx.Client) -> None:
        secret = "hunter2-do-not-echo"
        response = operator.post(
            "/api/v1/tasks",
            json={"taskType": "x", "credentials": {"password": secret}, "target": {}},
        )
        assert_problem(response, 422)
        assert secret not in response.text


class TestBodyLimit:
    def test_a_declared_body_over_the_limit_is_413(self, operator: httpx.Client) -> None:
        content = b'{"taskType": "' + b"a" * LIMIT + b'"}'
        response = operator.post(
            "/api/v1/tasks", content=content, headers={"Content-Type": "application/json"}
        )
        body = assert_problem(response, 413)
        assert str(LIMIT) in body["detail"]

    def test_a_chunked_body_over_the_limit_is_413(self, operator: httpx.Client) -> None:
        def chunks() -> Iterator[bytes]:
            yield b'{"taskType": "'
            for _ in range(20):
                yield b"a" * 64 * 1024
            yield b'"}'

        response = operator.post(
            "/api/v1/tasks", content=chunks(), headers={"Content-Type": "application/json"}
        )
        assert "content-length" not in {k.lower() for k in response.request.headers}
        assert response.request.headers["Transfer-Encoding"] == "chunked"
        assert_problem(response, 413)

    def test_an_anonymous_body_over_the_limit_is_413(self, anonymous: httpx.Client) -> None:
        response = anonymous.post(
            "/api/v1/agents/register",
            content=b"x" * (LIMIT + 1),
            headers={"Content-Type": "application/json"},
        )
        assert_problem(response, 413)

    def test_a_body_under_the_limit_is_read(self, operator: httpx.Client) -> None:
        # Not refused for its size: parsed, and 422 for what it says.
        content = b'{"taskType": "docker.pull", "payload": {"blob": "' + b"a" * 500_000 + b'"}}'
        response = operator.post(
            "/api/v1/tasks", content=content, headers={"Content-Type": "application/json"}
        )
        assert_problem(response, 422)
        assert "target" in response.text


class TestPathIds:
    @pytest.mark.parametrize(
        ("method", "path"),
        [
            ("GET", "/api/v1/tasks/not-a-uuid"),
            ("POST", "/api/v1/tasks/not-a-uuid/cancel"),
            ("GET", "/api/v1/dispatches/123"),
            ("GET", "/api/v1/agents/not-a-uuid"),
            ("PUT", "/api/v1/agents/not-a-uuid"),
            ("DELETE", "/api/v1/agents/not-a-uuid"),
        ],
    )
    def test_non_uuid_ids_are_422(self, operator: httpx.Client, method: str, path: str) -> None:
        body: dict[str, object] | None = {} if method == "PUT" else None
        assert_problem(operator.request(method, path, json=body), 422)


class TestHealth:
    def test_healthz(self, anonymous: httpx.Client) -> None:
        response = anonymous.get("/healthz")
        assert response.status_code == 200
        assert response.json() == {"status": "ok"}

    def test_readyz(self, anonymous: httpx.Client) -> None:
        response = anonymous.get("/readyz")
        assert response.status_code == 200
        assert response.json() == {"status": "ready"}


class TestOpenApi:
    def test_lists_every_seed_and_operator_path(self, anonymous: httpx.Client) -> None:
        response = anonymous.get("/openapi.json")
        assert response.status_code == 200
        paths = response.json()["paths"]
        for path, methods in {**SEED_PATHS, **OPERATOR_PATHS}.items():
            assert path in paths, f"{path} missing from {sorted(paths)}"
            assert methods <= set(paths[path]), (path, sorted(paths[path]))

    def test_documents_problem_answers(self, anonymous: httpx.Client) -> None:
        paths = anonymous.get("/openapi.json").json()["paths"]
        complete = paths["/api/v1/agents/{id}/tasks/{taskId}/complete"]["post"]["responses"]
        assert {"200", "404", "409"} <= set(complete)
        assert "application/problem+json" in complete["409"]["content"]


class TestDocs:
    def test_docs_page(self, anonymous: httpx.Client) -> None:
        response = anonymous.get("/docs")
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/html")
        assert "openapi.json" in response.text


class TestCaCertificate:
    def test_served_without_auth(self, stack: Stack, anonymous: httpx.Client) -> None:
        response = anonymous.get("/api/v1/pki/ca.pem")
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("application/x-pem-file")
        assert response.text == stack.ca_file.read_text()
        cert = x509.load_pem_x509_certificate(response.content)
        assert cert.subject == stack.runtime.ca.cert.subject
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        assert constraints.ca is True
        assert "PRIVATE KEY" not in response.text


class TestValuesTheDatabaseCannotStore:
    def test_a_nul_character_in_a_payload_is_422_not_500(self, stack, register, operator) -> None:
        agent = register()
        response = operator.post(
            "/api/v1/tasks",
            json={
                "taskType": "docker.pull",
                "payload": {"image": "a\u0000b"},
                "target": {"agentId": agent.id},
            },
        )
        if stack.runtime.engine.dialect.name == "postgresql":
            # JSONB cannot hold NUL: the database refuses it, and that is a 422.
            assert_problem(response, 422)
        else:
            # SQLite stores it as given.
            assert response.status_code == 201, response.text
            task_id = response.json()["tasks"][0]["taskId"]
            stored = operator.get(f"/api/v1/tasks/{task_id}").json()
            assert stored["payload"] == {"image": "a\u0000b"}
