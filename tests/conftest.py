"""Shared fixtures: a real database (SQLite and PostgreSQL), a real TLS server, real clients.

Every API test runs twice, once per backend (`backend` is a session-scoped
parametrized fixture). Against each backend, one uvicorn server with our
mutual-TLS protocol classes serves the real app from a thread; each test
starts from empty tables.

PostgreSQL: a database of its own per xdist worker on the server at
STELLA_TEST_POSTGRES_URL (default: the local one). Where it is unreachable
the PostgreSQL half skips with a loud reason, or fails under
STELLA_TEST_REQUIRE_SERVICES=1 (CI).
"""

from __future__ import annotations

import os
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import uvicorn
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError

from app import migrate
from app.db import make_engine
from app.main import create_app
from app.runtime import Runtime, build_runtime
from app.server.options import websocket_options
from app.server.tls import uvicorn_config
from app.settings import Settings
from tests.processes import start_worker

# Private PostgreSQL and Redis servers for the tests that stop them.
pytest_plugins = ("tests.faults.services",)

REQUIRE_SERVICES = os.environ.get("STELLA_TEST_REQUIRE_SERVICES") == "1"
POSTGRES_URL = os.environ.get(
    "STELLA_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
ADMIN_TOKEN = "test-admin-token-0123456789"
TABLES = (
    "task_logs",
    "tasks",
    "dispatches",
    "agents",
    "registration_tokens",
    "sweep_marks",
    "audit_events",
    "recovery_challenges",
    "task_receipts",
)


def service_unavailable(reason: str) -> None:
    """Skip loudly, or fail where the services are required."""
    if REQUIRE_SERVICES:
        pytest.fail(f"STELLA_TEST_REQUIRE_SERVICES=1 but {reason}")
    pytest.skip(f"SKIPPED LOUDLY: {reason}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# --- databases -----------------------------------------------------------------------------


@pytest.fixture(
    scope="session", params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]
)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def _postgres_admin(statement: str) -> None:
    engine = create_engine(make_url(POSTGRES_URL), isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as connection:
            connection.execute(text(statement))
    finally:
        engine.dispose()


def create_postgres_database(name: str) -> str:
    """A new empty database on the test server (a loud skip where it is unreachable)."""
    try:
        _postgres_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        _postgres_admin(f'CREATE DATABASE "{name}"')
    except Exception as exc:  # any failure to connect means "unreachable"
        service_unavailable(f"PostgreSQL at {POSTGRES_URL} is unreachable: {exc}")
    return make_url(POSTGRES_URL).set(database=name).render_as_string(hide_password=False)


def drop_postgres_database(name: str) -> None:
    _postgres_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def database_url(
    backend: str, tmp_path_factory: pytest.TempPathFactory, worker_id: str
) -> Iterator[str]:
    """An empty, migrated database of the backend under test, private to this process."""
    name = f"stella_test_{worker_id}_{os.getpid()}"
    if backend == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('sqlite') / 'stella.db'}"
    else:
        url = create_postgres_database(name)
    engine = make_engine(url)
    migrate.upgrade(engine)
    engine.dispose()
    yield url
    if backend == "postgresql":
        drop_postgres_database(name)


def truncate(runtime: Runtime) -> None:
    """Empty every table. A job of the previous test may still hold row locks
    (an expansion finishing in a worker): TRUNCATE can deadlock with it, so retry."""
    for attempt in range(5):
        try:
            with runtime.engine.begin() as connection:
                if runtime.engine.dialect.name == "postgresql":
                    connection.execute(text(f"TRUNCATE {', '.join(TABLES)}"))
                else:
                    for table in TABLES:
                        connection.execute(text(f"DELETE FROM {table}"))  # noqa: S608
            return
        except OperationalError:
            if attempt == 4:
                raise
            time.sleep(0.2)


# --- the server ----------------------------------------------------------------------------


@dataclass
class Stack:
    """A running app: its settings, runtime, URL and the CA clients must trust."""

    settings: Settings
    runtime: Runtime
    base_url: str
    ca_file: Path
    tmp: Path

    def ssl_context(self, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.ca_file))
        if cert is not None:
            context.load_cert_chain(str(cert), str(key) if key else None)
        return context


class ServerThread:
    """uvicorn in a thread, as the real `stella serve --tls` runs it (same config)."""

    def __init__(self, config: uvicorn.Config) -> None:
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("test server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


REDIS_URL = os.environ.get("STELLA_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def require_redis() -> str:
    """The test Redis URL, or a loud skip (a failure under STELLA_TEST_REQUIRE_SERVICES=1)."""
    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2)
    try:
        client.ping()
    except redis.RedisError as exc:
        service_unavailable(f"Redis at {REDIS_URL} is unreachable: {exc}")
    finally:
        client.close()
    return REDIS_URL


def drop_redis_keys(prefix: str) -> None:
    client = redis.Redis.from_url(REDIS_URL)
    try:
        for key in client.scan_iter(match=f"{prefix}*", count=1000):
            client.delete(key)
    finally:
        client.close()


def start_stack(
    tmp: Path, database_url: str, *, broker: str = "embedded", worker: bool = True, **overrides: Any
) -> Iterator[Stack]:
    """Serve the app for `database_url` over mutual TLS on a free port, with a real
    Celery worker on `broker` ("embedded": the filesystem transport; "redis")."""
    broker_settings: dict[str, Any] = {}
    if broker == "redis":
        prefix = f"stella-test-{os.getpid()}-{tmp.name}-"
        # Redis carries both the jobs and the streams' pub/sub, as in production.
        broker_settings = {
            "broker_url": require_redis(),
            "redis_url": REDIS_URL,
            "broker_key_prefix": prefix,
        }
    # Every test registers from one address: no guessing limit unless a test sets one.
    overrides.setdefault("registration_failure_limit", 1_000_000)
    settings = Settings(
        data_dir=tmp,
        database_url=database_url,
        admin_token=ADMIN_TOKEN,
        **broker_settings,
        **overrides,
    )
    runtime = build_runtime(settings)
    app = create_app(settings, runtime)
    cert, key = runtime.ca.server_certificate_files(settings.server_names)
    port = free_port()
    config = uvicorn_config(
        app,
        host="127.0.0.1",
        port=port,
        tls=True,
        ca_cert_file=runtime.ca.files.ca_cert,
        server_cert_file=cert,
        server_key_file=key,
        log_level="warning",
        lifespan="on",
        **websocket_options(settings),
    )
    workers = [start_worker(settings, tmp / "worker.log", name=f"w-{tmp.name}")] if worker else []
    try:
        with ServerThread(config):
            yield Stack(
                settings=settings,
                runtime=runtime,
                base_url=f"https://127.0.0.1:{port}",
                ca_file=runtime.ca.files.ca_cert,
                tmp=tmp,
            )
    finally:
        for process in workers:
            process.stop()
        if broker == "redis":
            drop_redis_keys(broker_settings["broker_key_prefix"])


@pytest.fixture(scope="session")
def _stack(
    backend: str, database_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    # The embedded defaults together (SQLite, filesystem broker), and the
    # production pair (PostgreSQL, Redis).
    broker = "embedded" if backend == "sqlite" else "redis"
    yield from start_stack(tmp_path_factory.mktemp("stack"), database_url, broker=broker)


@pytest.fixture
def stack(_stack: Stack) -> Stack:
    """The running app, its tables emptied for this test."""
    truncate(_stack.runtime)
    return _stack


# --- clients -------------------------------------------------------------------------------


def operator_client(stack: Stack) -> httpx.Client:
    """An operator's client: admin token, verifying our CA, no client certificate."""
    return httpx.Client(
        base_url=stack.base_url,
        verify=stack.ssl_context(),
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        timeout=30,
    )


@pytest.fixture
def operator(stack: Stack) -> Iterator[httpx.Client]:
    with operator_client(stack) as client:
        yield client


@dataclass
class AgentClient:
    """A registered agent: its identity, credentials and an mTLS client."""

    id: str
    name: str
    token: str
    cert_file: Path
    key_file: Path
    registration: dict[str, Any]
    http: httpx.Client

    def heartbeat(self, **body: Any) -> httpx.Response:
        return self.http.post(
            f"/api/v1/agents/{self.id}/heartbeat", json={"status": "healthy", **body}
        )

    def poll(self) -> httpx.Response:
        return self.http.get(f"/api/v1/agents/{self.id}/tasks")

    def complete(self, task_id: str, **body: Any) -> httpx.Response:
        return self.http.post(
            f"/api/v1/agents/{self.id}/tasks/{task_id}/complete", json={"success": True, **body}
        )


def mint_token(operator: httpx.Client, **body: Any) -> str:
    response = operator.post("/api/v1/registration-tokens", json=body)
    assert response.status_code == 201, response.text
    token: str = response.json()["token"]
    return token


def agent_client(
    stack: Stack, *, agent_id: str, token: str, cert_pem: str, key_pem: str, tmp: Path
) -> httpx.Client:
    """An httpx client presenting `cert_pem` and the bearer `token`."""
    cert_file, key_file = tmp / f"{agent_id}.pem", tmp / f"{agent_id}.key"
    cert_file.write_text(cert_pem)
    key_file.touch(mode=0o600)
    key_file.write_text(key_pem)
    return httpx.Client(
        base_url=stack.base_url,
        verify=stack.ssl_context(cert_file, key_file),
        headers={"Authorization": f"Bearer {token}"},
        timeout=30,
    )


def register_agent(
    stack: Stack, operator: httpx.Client, tmp: Path, **body: Any
) -> tuple[dict[str, Any], httpx.Client]:
    """Register an agent with a fresh token (server-made key): its answer and its mTLS client."""
    body = {"name": f"agent-{uuid.uuid4().hex[:12]}", "version": "1.0.0", "capabilities": []} | body
    response = httpx.post(
        f"{stack.base_url}/api/v1/agents/register",
        json=body,
        headers={"X-Agent-Token": mint_token(operator)},
        verify=stack.ssl_context(),
    )
    assert response.status_code == 201, response.text
    data: dict[str, Any] = response.json()
    http = agent_client(
        stack,
        agent_id=data["agentId"],
        token=data["token"],
        cert_pem=data["certificate"]["cert"],
        key_pem=data["certificate"]["key"],
        tmp=tmp,
    )
    return data, http


@pytest.fixture
def register(
    stack: Stack, operator: httpx.Client, tmp_path: Path
) -> Iterator[Callable[..., AgentClient]]:
    """Register an agent through the API and hand back its mTLS client."""
    clients: list[httpx.Client] = []
    counter = iter(range(1_000_000))

    def _register(
        name: str | None = None,
        *,
        capabilities: list[str] | None = None,
        labels: dict[str, str] | None = None,
        csr: str | None = None,
        key_pem: str | None = None,
    ) -> AgentClient:
        name = name or f"agent-{next(counter):03d}"
        body: dict[str, Any] = {
            "name": name,
            "version": "1.0.0",
            "capabilities": capabilities if capabilities is not None else ["docker", "compose"],
            "labels": labels or {},
        }
        if csr is not None:
            body["csr"] = csr
        response = httpx.post(
            f"{stack.base_url}/api/v1/agents/register",
            json=body,
            headers={"X-Agent-Token": mint_token(operator)},
            verify=stack.ssl_context(),
        )
        assert response.status_code == 201, response.text
        data = response.json()
        certificate = data["certificate"]
        key = certificate.get("key") or key_pem
        assert key is not None, "a CSR registration needs the caller's key_pem"
        http = agent_client(
            stack,
            agent_id=data["agentId"],
            token=data["token"],
            cert_pem=certificate["cert"],
            key_pem=key,
            tmp=tmp_path,
        )
        clients.append(http)
        return AgentClient(
            id=data["agentId"],
            name=name,
            token=data["token"],
            cert_file=tmp_path / f"{data['agentId']}.pem",
            key_file=tmp_path / f"{data['agentId']}.key",
            registration=data,
            http=http,
        )

    yield _register
    for client in clients:
        client.close()


def dispatch(operator: httpx.Client, target: dict[str, Any], **body: Any) -> httpx.Response:
    return operator.post(
        "/api/v1/tasks",
        json={"taskType": "docker.pull", "payload": {"image": "myapp"}, "target": target, **body},
    )
