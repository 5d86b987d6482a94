"""The heartbeat fast lane: the common heartbeat, answered below the framework.

Most heartbeats need nothing but their checks and a buffered write (see
`HeartbeatService.receive_steady`). For those, FastAPI's routing, its
middleware and dependency solving cost more than the heartbeat itself.
This ASGI middleware, in front of the app's whole middleware stack
(`app.main.StellaApp`), answers exactly those:

- `POST /api/v1/agents/{uuid}/heartbeat` with a JSON body within the size
  limit, a bearer token, and a body the same `Heartbeat` model accepts;
- whose agent `receive_steady` accepts: the same credential, registration,
  identity and path checks as the full route, nothing pending, no renewal
  due, no change of status.

Anything else, including every error, is passed on untouched, the body
replayed, to the FastAPI route, which answers it as it always does (the
route's checks run again there; nothing was recorded here). So the lane
decides nothing the route would decide differently: it only skips the
framework when the answer is `{"tasks": []}`.
"""

from __future__ import annotations

import logging
import re
import time
import uuid

from pydantic import ValidationError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.agents.heartbeats import HeartbeatService
from app.agents.schemas import Heartbeat
from app.auth.client_cert import MalformedCertificate, presented_certificate_pem
from app.errors import StellaError
from app.metrics.instruments import HEARTBEAT_DURATION, HEARTBEATS_RECEIVED
from app.settings import Settings

log = logging.getLogger(__name__)

_PATH = re.compile(r"/api/v1/agents/([0-9a-fA-F-]{32,36})/heartbeat")
_NO_TASKS = b'{"tasks":[]}'
_HEADERS = [
    (b"content-type", b"application/json"),
    (b"content-length", str(len(_NO_TASKS)).encode()),
]
# Bound once: a labelled child per heartbeat would cost a dict lookup and a lock.
_FAST_RECEIVED = HEARTBEATS_RECEIVED.labels("fast_lane")
_FAST_DURATION = HEARTBEAT_DURATION.labels("fast_lane")
_FULL_DURATION = HEARTBEAT_DURATION.labels("full")


class HeartbeatFastLane:
    def __init__(self, app: ASGIApp, *, heartbeats: HeartbeatService, settings: Settings) -> None:
        self.app = app
        self.heartbeats = heartbeats
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        match = _PATH.fullmatch(scope["path"])
        if match is None:
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        messages, body = await self._read(receive)
        if body is not None and self._answer_steady(scope, match[1], body):
            await send({"type": "http.response.start", "status": 200, "headers": _HEADERS})
            await send({"type": "http.response.body", "body": _NO_TASKS})
            _FAST_RECEIVED.inc()
            _FAST_DURATION.observe(time.perf_counter() - started)
            return
        try:
            await self.app(scope, _replay(messages, receive), send)
        finally:
            _FULL_DURATION.observe(time.perf_counter() - started)

    def _answer_steady(self, scope: Scope, agent: str, body: bytes) -> bool:
        token = content_type = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, credentials = value.decode("latin-1").partition(" ")
                if scheme.lower() == "bearer" and credentials:
                    token = credentials
            elif name == b"content-type":
                content_type = value
        if token is None or content_type is None or not _is_json(content_type):
            return False
        try:
            return self.heartbeats.receive_steady(
                agent_id=uuid.UUID(agent),
                report=Heartbeat.model_validate_json(body),
                token=token,
                certificate_pem=presented_certificate_pem(scope, self.settings),
            )
        except (ValueError, ValidationError, MalformedCertificate, StellaError):
            return False  # the route answers it, with its own problem+json
        except Exception:
            # Outside the framework's error handling: never a bare 500 from
            # here; the route, which has it, answers instead.
            log.exception("heartbeat fast lane failed; passing the request on")
            return False

    async def _read(self, receive: Receive) -> tuple[list[Message], bytes | None]:
        """The request's messages, and its body (None: too large or cut short)."""
        messages: list[Message] = []
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                return messages, None
            chunk = message.get("body", b"")
            size += len(chunk)
            chunks.append(chunk)
            if size > self.settings.max_body_bytes:
                return messages, None
            if not message.get("more_body", False):
                return messages, b"".join(chunks)


def _is_json(content_type: bytes) -> bool:
    media = content_type.split(b";", 1)[0].strip().lower()
    return media == b"application/json" or media.endswith(b"+json")


def _replay(messages: list[Message], receive: Receive) -> Receive:
    """A `receive` that hands out what was already read, then reads on."""
    pending = list(messages)

    async def replay() -> Message:
        if pending:
            return pending.pop(0)
        return await receive()

    return replay
