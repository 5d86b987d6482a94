"""Many idle WebSocket task streams from one process: asyncio, ssl and bare RFC 6455 framing.

The streams scenario holds thousands of streams open while it measures the
server's memory, on the same two cores. A stream here is one TLS
connection with the agent's own certificate, an HTTP upgrade carrying its
Bearer JWT, then nothing but answers: a pong for every ping (the server
drops streams that stop answering) and a close frame for a close. No task,
no timer, no buffer beyond what a frame needs, so the client stays cheap
next to the server it measures.

    python -m bench.wsclient AGENTS.json --url https://127.0.0.1:8443 --concurrency 64

AGENTS.json is `{"ca": path, "agents": [[id, token, credentials], ...]}`.
Prints one JSON line of counts (`Tally`) a second and holds the streams
until its stdin closes, then closes them (code 1000) and exits.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import functools
import json
import os
import ssl
import sys
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast
from urllib.parse import urlsplit

OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x1, 0x2, 0x8, 0x9, 0xA
HANDSHAKE_TIMEOUT = 120.0  # a queue of thousands of TLS handshakes on two cores
RETRIES = 3


@dataclass
class Tally:
    """What the streams of this process did so far (the JSON line)."""

    total: int = 0
    open: int = 0  # upgraded and not closed
    failed: int = 0  # gave up after RETRIES
    retried: int = 0
    pings: int = 0
    messages: int = 0
    lost: int = 0  # an open stream's connection went without a close frame
    closed: Counter[int] = field(default_factory=Counter)  # close code -> streams
    first_error: str = ""

    def line(self) -> str:
        data = {key: value for key, value in vars(self).items() if key != "closed"}
        return json.dumps(data | {"closed": {str(k): v for k, v in self.closed.items()}})


@dataclass(frozen=True)
class Agent:
    agent_id: str
    token: str
    credentials: str  # certificate + key, PEM


class Stream(asyncio.Protocol):
    """One task stream: the upgrade, then pongs for pings."""

    def __init__(self, request: bytes, opened: asyncio.Future[None], tally: Tally) -> None:
        self.request = request
        self.opened = opened
        self.tally = tally
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.upgraded = False
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but behave as one.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(self.request)
        self.request = b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if not self.upgraded:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buffer[:end])
            del self.buffer[: end + 4]
            if not head.startswith(b"HTTP/1.1 101"):
                self._fail(head.split(b"\r\n", 1)[0].decode(errors="replace"))
                return
            self.upgraded = True
            self.tally.open += 1
            if not self.opened.done():
                self.opened.set_result(None)
        self._frames()

    def _frames(self) -> None:
        buffer = self.buffer
        while len(buffer) >= 2:
            opcode, length, offset = buffer[0] & 0x0F, buffer[1] & 0x7F, 2
            if length == 126:
                if len(buffer) < 4:
                    return
                length, offset = int.from_bytes(buffer[2:4], "big"), 4
            elif length == 127:
                if len(buffer) < 10:
                    return
                length, offset = int.from_bytes(buffer[2:10], "big"), 10
            if len(buffer) < offset + length:
                return  # server frames are never masked
            payload = bytes(buffer[offset : offset + length])
            del buffer[: offset + length]
            if opcode == OP_PING:
                self.tally.pings += 1
                self.send(OP_PONG, payload)
            elif opcode == OP_CLOSE:
                code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
                self._closed(code)
                self.send(OP_CLOSE, payload[:2])
                if self.transport is not None:
                    self.transport.close()
                return
            elif opcode in (OP_TEXT, OP_BINARY, 0):
                self.tally.messages += 1

    def send(self, opcode: int, payload: bytes) -> None:
        """A masked frame (client frames must be); control payloads only, under 126 bytes."""
        if self.transport is None or self.transport.is_closing():
            return
        mask = os.urandom(4)
        masked = bytes(byte ^ mask[index % 4] for index, byte in enumerate(payload))
        self.transport.write(bytes((0x80 | opcode, 0x80 | len(payload))) + mask + masked)

    def close(self) -> None:
        """Leave as an agent does: a close frame (1000), then the connection."""
        if self.upgraded and not self.closed:
            self.closed = True
            self.tally.open -= 1
            self.send(OP_CLOSE, (1000).to_bytes(2, "big"))
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.upgraded and not self.closed:
            self.closed = True
            self.tally.open -= 1
            self.tally.lost += 1
        if not self.opened.done():
            self.opened.set_exception(ConnectionError(f"connection lost: {exc}"))

    def _closed(self, code: int) -> None:
        if not self.closed:
            self.closed = True
            self.tally.open -= 1
            self.tally.closed[code] += 1

    def _fail(self, why: str) -> None:
        if not self.opened.done():
            self.opened.set_exception(ConnectionError(why))
        if self.transport is not None:
            self.transport.close()


def _same(stream: Stream) -> Stream:
    return stream


def upgrade_request(host: str, port: int, agent: Agent, *, deflate: bool) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    # What the reference agent (the `websockets` client) offers by default.
    offer = ["Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits"]
    lines = [
        f"GET /api/v1/agents/{agent.agent_id}/task-stream HTTP/1.1",
        f"Host: {host}:{port}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
        f"Authorization: Bearer {agent.token}",
        *(offer if deflate else []),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def open_stream(
    url: str, ca: str, agent: Agent, tally: Tally, limit: asyncio.Semaphore, *, deflate: bool
) -> Stream | None:
    """The agent's stream, open; None after RETRIES failed attempts."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 443
    loop = asyncio.get_running_loop()
    for attempt in range(RETRIES):
        async with limit:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.load_verify_locations(cafile=ca)
            context.load_cert_chain(agent.credentials)
            opened: asyncio.Future[None] = loop.create_future()
            # A failure may land after we stopped waiting: count it as seen.
            opened.add_done_callback(lambda f: f.cancelled() or f.exception())
            stream = Stream(upgrade_request(host, port, agent, deflate=deflate), opened, tally)
            try:
                async with asyncio.timeout(HANDSHAKE_TIMEOUT):
                    await loop.create_connection(
                        functools.partial(_same, stream), host, port, ssl=context
                    )
                    await opened
            except (OSError, ConnectionError, TimeoutError) as exc:
                stream.close()
                if attempt + 1 == RETRIES:
                    tally.failed += 1
                    tally.first_error = tally.first_error or f"{type(exc).__name__}: {exc}"
                    return None
                tally.retried += 1
                continue
            return stream
    return None


async def hold(url: str, ca: str, agents: list[Agent], concurrency: int, *, deflate: bool) -> None:
    tally = Tally(total=len(agents))
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    # stdin closing (the harness is done, or gone) ends the run.
    threading.Thread(
        target=lambda: (sys.stdin.read(), loop.call_soon_threadsafe(done.set)), daemon=True
    ).start()
    limit = asyncio.Semaphore(concurrency)
    streams: list[Stream] = []

    async def one(agent: Agent) -> None:
        stream = await open_stream(url, ca, agent, tally, limit, deflate=deflate)
        if stream is not None:
            streams.append(stream)

    opening = asyncio.gather(*(one(agent) for agent in agents))
    while not done.is_set():
        print(tally.line(), flush=True)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), 1.0)
    opening.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await opening
    for stream in streams:
        stream.close()
    await asyncio.sleep(0.5)  # let the close frames go out
    print(tally.line(), flush=True)


def load_agents(path: Path) -> tuple[str, list[Agent]]:
    document = json.loads(path.read_text())
    return document["ca"], [Agent(*row) for row in document["agents"]]


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.wsclient", description=__doc__)
    parser.add_argument("agents", type=Path)
    parser.add_argument("--url", required=True, help="the server's https:// base URL")
    parser.add_argument("--concurrency", type=int, default=64, help="handshakes in flight")
    parser.add_argument("--no-deflate", action="store_true", help="do not offer permessage-deflate")
    args = parser.parse_args()
    ca, agents = load_agents(args.agents)
    import uvloop  # noqa: PLC0415  (a dependency of uvicorn[standard])

    uvloop.run(hold(args.url, ca, agents, args.concurrency, deflate=not args.no_deflate))


if __name__ == "__main__":
    main()
