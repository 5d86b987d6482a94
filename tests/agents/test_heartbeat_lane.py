"""The fast lane on its own: what it answers itself, and what it hands on intact.

Driven as ASGI with the real `HeartbeatService` on the test stack's
database; the app behind the lane only records what reaches it, so these
tests fail if the lane stops answering the steady heartbeat (or answers
one it should not).
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable
from typing import Any

from starlette.types import Message, Receive, Scope, Send

from app.agents.heartbeat_lane import HeartbeatFastLane
from app.agents.heartbeats import HeartbeatService
from app.auth.cache import Registration
from app.models.types import utcnow
from tests.conftest import AgentClient, Stack

BODY = json.dumps({"status": "healthy", "runningTasks": 1}).encode()


class Recorder:
    """The app behind the lane: records each request that reaches it, with its body."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        self.bodies.append(body)
        await send({"type": "http.response.start", "status": 299, "headers": []})
        await send({"type": "http.response.body", "body": b""})


def call(lane: HeartbeatFastLane, agent: AgentClient, body: bytes) -> list[Message]:
    """One heartbeat through the lane, its body in two chunks; what was sent back."""
    scope: Scope = {
        "type": "http",
        "method": "POST",
        "path": f"/api/v1/agents/{agent.id}/heartbeat",
        "headers": [
            (b"authorization", f"Bearer {agent.token}".encode()),
            (b"content-type", b"application/json"),
        ],
        "extensions": {"tls": {"client_cert_chain": [agent.cert_file.read_text()]}},
    }
    chunks: list[Message] = [
        {"type": "http.request", "body": body[:5], "more_body": True},
        {"type": "http.request", "body": body[5:], "more_body": False},
    ]
    sent: list[Message] = []

    async def receive() -> Message:
        return chunks.pop(0)

    async def send(message: Message) -> None:
        sent.append(message)

    asyncio.run(lane(scope, receive, send))
    return sent


def steady_service(stack: Stack, agent: AgentClient) -> HeartbeatService:
    """A service that knows the agent, with nothing pending for anyone."""
    service = HeartbeatService(stack.runtime)
    identity = stack.runtime.auth.check(agent.token, agent.cert_file.read_text(), utcnow())
    service.auth.remember(
        identity.agent_id, Registration(identity.key_thumbprint, "online"), epoch=service.auth.epoch
    )
    service.pending.load([], epoch=service.pending.epoch)
    return service


def test_the_steady_heartbeat_is_answered_by_the_lane_and_buffered(
    stack: Stack, register: Callable[..., AgentClient]
) -> None:
    agent = register()
    service = steady_service(stack, agent)
    app = Recorder()
    sent = call(HeartbeatFastLane(app, heartbeats=service, settings=stack.settings), agent, BODY)
    assert app.bodies == []
    assert sent[0]["status"] == 200
    assert sent[1]["body"] == b'{"tasks":[]}'
    assert service.writer is not None
    # Buffered for the next flush, not written.
    assert uuid.UUID(agent.id) in service.writer._buffer


def test_anything_else_reaches_the_app_with_its_body_whole(
    stack: Stack, register: Callable[..., AgentClient]
) -> None:
    agent = register()
    service = steady_service(stack, agent)
    service.pending.mark(uuid.UUID(agent.id))  # a task may be waiting: the full path
    app = Recorder()
    lane = HeartbeatFastLane(app, heartbeats=service, settings=stack.settings)
    cases: list[tuple[AgentClient, bytes]] = [(agent, BODY), (agent, b'{"status": ')]
    for caller, body in cases:
        sent: list[Any] = call(lane, caller, body)
        assert sent[0]["status"] == 299
    assert app.bodies == [BODY, b'{"status": ']
    assert service.writer is not None
    assert service.writer._buffer == {}
