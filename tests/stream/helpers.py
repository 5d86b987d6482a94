"""Shared pieces of the task-stream tests that drive real processes.

Agents as a stream client needs them (id, JWT, certificate files), opening
a stream, waiting for a web process, a private PostgreSQL database, and
watching which agent channels a web process has subscribed in Redis.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import ssl
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import redis
from websockets.asyncio.client import ClientConnection, connect

from app.agents import service as agents_service
from app.agents.schemas import AgentRegister
from app.db import transaction
from app.notify import agent_channel
from app.runtime import Runtime, build_runtime
from app.settings import Settings
from app.tokens import service as tokens_service
from tests.conftest import (
    ADMIN_TOKEN,
    REDIS_URL,
    create_postgres_database,
    drop_postgres_database,
    drop_redis_keys,
    mint_token,
    require_redis,
)
from tests.processes import STELLA, settings_env


@dataclass(frozen=True)
class StreamAgent:
    """A registered agent, as its stream client needs it."""

    id: str
    token: str
    cert_file: Path
    key_file: Path


def client_context(ca_file: Path, agent: StreamAgent | None = None) -> ssl.SSLContext:
    """TLS trusting our CA, presenting the agent's certificate when given one."""
    context = ssl.create_default_context(cafile=str(ca_file))
    if agent is not None:
        context.load_cert_chain(str(agent.cert_file), str(agent.key_file))
    return context


def _save(tmp: Path, agent_id: str, token: str, cert_pem: str, key_pem: str) -> StreamAgent:
    cert_file, key_file = tmp / f"{agent_id}.pem", tmp / f"{agent_id}.key"
    cert_file.write_text(cert_pem)
    key_file.touch(mode=0o600)
    key_file.write_text(key_pem)
    return StreamAgent(id=agent_id, token=token, cert_file=cert_file, key_file=key_file)


def register_via_api(
    base_url: str,
    ca_file: Path,
    operator: httpx.Client,
    tmp: Path,
    *,
    capabilities: Sequence[str] = ("docker",),
) -> StreamAgent:
    """Mint a token and register a fresh agent through the web process at `base_url`."""
    response = httpx.post(
        f"{base_url}/api/v1/agents/register",
        json={"name": f"agent-{uuid.uuid4().hex[:12]}", "capabilities": list(capabilities)},
        headers={"X-Agent-Token": mint_token(operator)},
        verify=client_context(ca_file),
    )
    assert response.status_code == 201, response.text
    data = response.json()
    return _save(
        tmp, data["agentId"], data["token"], data["certificate"]["cert"], data["certificate"]["key"]
    )


def register_in_process(
    runtime: Runtime, tmp: Path, count: int, *, capabilities: Sequence[str]
) -> list[StreamAgent]:
    """Register `count` agents through the service, against the servers' database and CA."""
    agents: list[StreamAgent] = []
    with transaction(runtime.engine) as session:
        for _ in range(count):
            token, _row = tokens_service.create_token(session=session, settings=runtime.settings)
            registered = agents_service.register(
                session=session,
                runtime=runtime,
                token=token,
                request=AgentRegister(
                    name=f"agent-{uuid.uuid4().hex[:12]}", capabilities=list(capabilities)
                ),
            )
            assert registered.certificate.key is not None
            agents.append(
                _save(
                    tmp,
                    str(registered.agent_id),
                    registered.token,
                    registered.certificate.cert,
                    registered.certificate.key,
                )
            )
    return agents


def stream_url(base_url: str, agent_id: str) -> str:
    return base_url.replace("https://", "wss://") + f"/api/v1/agents/{agent_id}/task-stream"


def connect_stream(
    base_url: str,
    ca_file: Path,
    agent: StreamAgent,
    *,
    context: ssl.SSLContext | None = None,
    open_timeout: float = 10,
) -> Any:
    """`websockets` connect (await it, or use it with `async with`) to the agent's stream."""
    return connect(
        stream_url(base_url, agent.id),
        ssl=context or client_context(ca_file, agent),
        additional_headers={"Authorization": f"Bearer {agent.token}"},
        open_timeout=open_timeout,
    )


@asynccontextmanager
async def open_stream(
    base_url: str, ca_file: Path, agent: StreamAgent
) -> AsyncIterator[ClientConnection]:
    async with connect_stream(base_url, ca_file, agent) as websocket:
        yield websocket


async def receive(websocket: ClientConnection, timeout: float = 5) -> dict[str, Any]:
    message: dict[str, Any] = json.loads(await asyncio.wait_for(websocket.recv(), timeout))
    return message


def wait_healthy(base_url: str, ca_file: Path, process: Any, timeout: float = 30) -> None:
    """Wait until the web process answers /healthz (fail early if it died)."""
    deadline = time.monotonic() + timeout
    while True:
        assert process.process is not None
        if process.process.poll() is not None:
            raise AssertionError(f"web process exited:\n{process.output()}")
        try:
            response = httpx.get(f"{base_url}/healthz", verify=client_context(ca_file), timeout=2)
            if response.status_code == 200:
                return
        except (httpx.TransportError, ssl.SSLError, FileNotFoundError):
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"{base_url} did not come up:\n{process.output()}")
        time.sleep(0.1)


def subscribed_agents(redis_url: str, prefix: str) -> set[str]:
    """Agent ids whose channel some process has subscribed on this Redis."""
    client = redis.Redis.from_url(redis_url, socket_connect_timeout=2)
    try:
        pattern = agent_channel(prefix, uuid.UUID(int=0)).replace(str(uuid.UUID(int=0)), "*")
        channels = client.pubsub_channels(pattern)
    finally:
        client.close()
    names = (c.decode() if isinstance(c, bytes) else c for c in channels)
    return {name.rsplit(":", 1)[1] for name in names}


def wait_subscribed(
    redis_url: str,
    prefix: str,
    agent_ids: Sequence[str],
    *,
    present: bool = True,
    timeout: float = 10.0,
) -> None:
    """Wait until every agent's channel is subscribed (or, `present=False`, none is)."""
    wanted = set(agent_ids)
    deadline = time.monotonic() + timeout
    while True:
        current = subscribed_agents(redis_url, prefix) & wanted
        if (current == wanted) if present else not current:
            return
        if time.monotonic() > deadline:
            state = "missing" if present else "still subscribed"
            agents = wanted - current if present else current
            raise AssertionError(f"{len(agents)} agent channels {state} after {timeout} s")
        time.sleep(0.05)


def percentile(samples: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile (p99 of 20 samples is the largest)."""
    ordered = sorted(samples)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


# --- a private PostgreSQL database ---------------------------------------------------------


def run(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=60, check=False)


@dataclass
class SharedBackend:
    """What several `stella serve` processes of one test module share."""

    settings: Settings
    runtime: Runtime  # in the test process, on the same database and CA
    env: dict[str, str]
    prefix: str
    tmp: Path


@contextmanager
def shared_backend(tmp: Path, name: str, **settings: Any) -> Iterator[SharedBackend]:
    """A private PostgreSQL database, migrated, a private Redis prefix, and the PKI.

    The runtime is built (so the PKI created) before any web process starts,
    so that they all load the same CA. Dropped again afterwards.
    """
    require_redis()
    database = f"stella_{name}_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    prefix = f"stella-{name}-{os.getpid()}-{uuid.uuid4().hex[:8]}-"
    built = Settings(
        data_dir=tmp / "data",
        database_url=create_postgres_database(database),
        admin_token=ADMIN_TOKEN,
        redis_url=REDIS_URL,
        broker_url=REDIS_URL,
        broker_key_prefix=prefix,
        **settings,
    )
    env = settings_env(built)
    runtime = None
    try:
        upgraded = run(STELLA, "db", "upgrade", env=env)
        assert upgraded.returncode == 0, upgraded.stderr
        runtime = build_runtime(built)
        yield SharedBackend(built, runtime, env, prefix, tmp)
    finally:
        if runtime is not None:
            runtime.close()
        drop_redis_keys(prefix)
        drop_postgres_database(database)
