"""Who may open a task stream: the agent itself, with its JWT and its own certificate.

Every refusal is a close with a 4xxx code and a reason (4401: credentials,
4403: not this agent's stream), before the stream hands anything over; a
certificate from another CA does not get past the TLS handshake. Both stacks.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import socket
import ssl
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake
from websockets.frames import Close

from pki import issue_client_certificate, load_or_create_pki
from tests.conftest import ADMIN_TOKEN, AgentClient, Stack, start_stack, truncate
from tests.tasks.helpers import Register, create_task, view


@pytest.fixture(scope="module")
def plain(
    backend: str, database_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    """Default settings, no Celery worker (nothing here needs one)."""
    broker = "embedded" if backend == "sqlite" else "redis"
    yield from start_stack(
        tmp_path_factory.mktemp("auth"), database_url, broker=broker, worker=False
    )


@pytest.fixture
def stack(plain: Stack) -> Stack:
    """Overrides conftest's `stack`: `operator` and `register` use this one."""
    truncate(plain.runtime)
    return plain


def stream_url(stack: Stack, path_id: str) -> str:
    return stack.base_url.replace("https://", "wss://") + f"/api/v1/agents/{path_id}/task-stream"


def attempt(
    stack: Stack,
    path_id: str,
    *,
    authorization: str | None,
    cert: AgentClient | tuple[Path, Path] | None,
) -> Close:
    """Open the stream of `path_id` and return how the server closed it.

    Nothing may arrive before the close: a refused client is never handed a task.
    """
    if isinstance(cert, AgentClient):
        cert = (cert.cert_file, cert.key_file)
    context = stack.ssl_context(*cert) if cert is not None else stack.ssl_context()
    headers = {"Authorization": authorization} if authorization is not None else {}

    async def scenario() -> Close:
        async with connect(
            stream_url(stack, path_id), ssl=context, additional_headers=headers, open_timeout=10
        ) as websocket:
            with pytest.raises(ConnectionClosed) as closed:
                await asyncio.wait_for(websocket.recv(), 5)
            assert closed.value.rcvd is not None, closed.value
            return closed.value.rcvd

    return asyncio.run(scenario())


@pytest.fixture
def agents(register: Register, operator: httpx.Client) -> tuple[AgentClient, AgentClient, str]:
    """Agents A and B, and a pending task of A that a refused stream must not hand out."""
    a, b = register(), register()
    return a, b, create_task(operator, a)


def assert_refused(close: Close, code: int, *words: str) -> None:
    assert close.code == code, close
    assert close.reason, close  # says why
    for word in words:
        assert word in close.reason, close


class TestCredentials:
    def test_no_authorization_header_is_4401(
        self, stack: Stack, agents: tuple[AgentClient, AgentClient, str], operator: httpx.Client
    ) -> None:
        a, _, pending = agents
        assert_refused(attempt(stack, a.id, authorization=None, cert=a), 4401, "token")
        assert_refused(attempt(stack, a.id, authorization=f"Basic {a.token}", cert=a), 4401)
        assert view(operator, pending)["status"] == "pending"

    def test_a_garbage_jwt_is_4401(
        self, stack: Stack, agents: tuple[AgentClient, AgentClient, str], operator: httpx.Client
    ) -> None:
        a, _, pending = agents
        header, _, rest = a.token.partition(".")
        for garbage in ("garbage", f"{header}.e30.c2ln", a.token[:-4] + "AAAA", rest):
            close = attempt(stack, a.id, authorization=f"Bearer {garbage}", cert=a)
            assert_refused(close, 4401, "invalid")
        assert view(operator, pending)["status"] == "pending"

    def test_the_jwt_of_one_agent_with_the_certificate_of_another_is_4401(
        self, stack: Stack, agents: tuple[AgentClient, AgentClient, str], operator: httpx.Client
    ) -> None:
        a, b, pending = agents
        # On A's stream (the token's) and on B's (the certificate's) alike.
        for path_id in (a.id, b.id):
            close = attempt(stack, path_id, authorization=f"Bearer {a.token}", cert=b)
            assert_refused(close, 4401, "different agents")
        assert view(operator, pending)["status"] == "pending"

    def test_the_admin_token_is_not_an_agent_credential(
        self, stack: Stack, agents: tuple[AgentClient, AgentClient, str], operator: httpx.Client
    ) -> None:
        a, _, pending = agents
        for cert in (None, a):
            close = attempt(stack, a.id, authorization=f"Bearer {ADMIN_TOKEN}", cert=cert)
            assert_refused(close, 4401)
        assert view(operator, pending)["status"] == "pending"

    def test_a_deleted_agents_credentials_are_4401(
        self, stack: Stack, register: Register, operator: httpx.Client
    ) -> None:
        a = register()
        assert operator.delete(f"/api/v1/agents/{a.id}").status_code == 200
        close = attempt(stack, a.id, authorization=f"Bearer {a.token}", cert=a)
        assert_refused(close, 4401, "not registered")

    @pytest.mark.parametrize("tls_max", [ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2])
    def test_a_certificate_from_another_ca_fails_the_tls_handshake(
        self,
        stack: Stack,
        agents: tuple[AgentClient, AgentClient, str],
        tmp_path: Path,
        tls_max: ssl.TLSVersion,
    ) -> None:
        a, _, _ = agents
        # A's own id and key, certified by a CA the server does not trust.
        foreign = load_or_create_pki(tmp_path / "foreign-pki")
        key = serialization.load_pem_private_key(a.key_file.read_bytes(), password=None)
        cert = issue_client_certificate(
            foreign,
            agent_id=uuid.UUID(a.id),
            public_key=key.public_key(),  # type: ignore[arg-type]
            ttl=dt.timedelta(hours=1),
        )
        assert cert.subject == x509.load_pem_x509_certificate(a.cert_file.read_bytes()).subject
        cert_file = tmp_path / "foreign.pem"
        cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))

        context = stack.ssl_context(cert_file, a.key_file)
        context.maximum_version = tls_max

        async def scenario() -> None:
            with pytest.raises((OSError, InvalidHandshake)):
                await connect(
                    stream_url(stack, a.id),
                    ssl=context,
                    additional_headers={"Authorization": f"Bearer {a.token}"},
                    open_timeout=10,
                )

        asyncio.run(scenario())
        if tls_max == ssl.TLSVersion.TLSv1_2:
            # Refused in the handshake itself (TLS 1.3 clients finish their side first
            # and only see the connection drop before any HTTP response, as above).
            port = int(stack.base_url.rsplit(":", 1)[1])
            with (
                socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
                pytest.raises(ssl.SSLError),
            ):
                context.wrap_socket(raw, server_hostname="127.0.0.1").close()


class TestStreamPath:
    def test_another_agents_stream_is_4403(
        self, stack: Stack, agents: tuple[AgentClient, AgentClient, str], operator: httpx.Client
    ) -> None:
        a, b, pending = agents
        b_pending = create_task(operator, b)
        close = attempt(stack, b.id, authorization=f"Bearer {a.token}", cert=a)
        assert_refused(close, 4403)
        # An agent id nobody has: not A's stream either.
        close = attempt(stack, str(uuid.uuid4()), authorization=f"Bearer {a.token}", cert=a)
        assert_refused(close, 4403)
        assert view(operator, b_pending)["status"] == "pending"
        assert view(operator, pending)["status"] == "pending"

    @pytest.mark.parametrize("path_id", ["not-a-uuid", "1", "%20"])
    def test_a_path_id_that_is_not_a_uuid_is_closed_with_a_4xxx(
        self, stack: Stack, agents: tuple[AgentClient, AgentClient, str], path_id: str
    ) -> None:
        a, _, _ = agents
        for authorization, cert in ((f"Bearer {a.token}", a), (None, None)):
            close = attempt(stack, path_id, authorization=authorization, cert=cert)
            assert 4400 <= close.code < 4500, close
            assert close.reason, close

    def test_the_agent_itself_gets_its_pending_task(
        self, stack: Stack, agents: tuple[AgentClient, AgentClient, str]
    ) -> None:
        # The positive control for every refusal above: the same helper's inputs,
        # right this time, open the stream and hand the pending task over.
        a, _, pending = agents

        async def scenario() -> None:
            async with connect(
                stream_url(stack, a.id),
                ssl=stack.ssl_context(a.cert_file, a.key_file),
                additional_headers={"Authorization": f"Bearer {a.token}"},
                open_timeout=10,
            ) as websocket:
                message = json.loads(await asyncio.wait_for(websocket.recv(), 5))
                assert message["type"] == "task_assigned"
                assert message["task"]["taskId"] == pending

        asyncio.run(scenario())
