"""The lighter WebSocket protocol (app/server/websocket.py) and the stream's uvicorn options.

`Inbox` and `Gate` stand in for asyncio's Queue and Event inside uvicorn's
protocol: tested for the behaviour uvicorn relies on, then the protocol
over real TLS sockets, where an open connection must keep neither its
handshake nor a compression context.
"""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import uvicorn
from starlette.types import Receive, Scope, Send
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from app.server.options import websocket_options
from app.server.tls import TLSWebSocketsSansIOProtocol, uvicorn_config
from app.server.websocket import Gate, Inbox, LeanWebSocketsSansIOProtocol
from app.settings import Settings
from pki.authority import load_or_create_pki

# --- Inbox and Gate ------------------------------------------------------------------------


def test_the_inbox_hands_items_over_in_order_and_wakes_a_waiting_reader() -> None:
    async def scenario() -> None:
        inbox: Inbox[int] = Inbox()
        assert inbox.empty()
        reader = asyncio.create_task(inbox.get())
        await asyncio.sleep(0)
        assert not reader.done()
        inbox.put_nowait(1)
        inbox.put_nowait(2)
        assert await reader == 1
        assert not inbox.empty()
        assert await inbox.get() == 2
        assert inbox.empty()

    asyncio.run(scenario())


def test_a_cancelled_reader_loses_no_item_and_passes_its_wake_up_on() -> None:
    async def scenario() -> None:
        inbox: Inbox[str] = Inbox()
        first = asyncio.create_task(inbox.get())
        second = asyncio.create_task(inbox.get())
        await asyncio.sleep(0)
        inbox.put_nowait("item")  # wakes `first`...
        first.cancel()  # ...which is cancelled before it runs
        assert await asyncio.wait_for(second, 1) == "item"
        with pytest.raises(asyncio.CancelledError):
            await first
        assert inbox.empty()

    asyncio.run(scenario())


def test_the_gate_starts_open_and_holds_writers_while_closed() -> None:
    async def scenario() -> None:
        gate = Gate()
        assert gate.is_set()
        assert await gate.wait()
        gate.clear()
        writer = asyncio.create_task(gate.wait())
        await asyncio.sleep(0.01)
        assert not writer.done()
        gate.set()
        assert await asyncio.wait_for(writer, 1)

    asyncio.run(scenario())


# --- the protocol, over TLS ----------------------------------------------------------------


async def echo_app(scope: Scope, receive: Receive, send: Send) -> None:
    """Echoes text; "close" ends with 4000, reason "asked"."""
    assert scope["type"] == "websocket"
    assert (await receive())["type"] == "websocket.connect"
    await send({"type": "websocket.accept"})
    while True:
        message = await receive()
        if message["type"] == "websocket.disconnect":
            return
        if message.get("text") == "close":
            await send({"type": "websocket.close", "code": 4000, "reason": "asked"})
            return
        await send({"type": "websocket.send", "text": message.get("text") or ""})


@dataclass
class Served:
    port: int
    server: uvicorn.Server
    ca_file: Path

    def protocols(self) -> list[LeanWebSocketsSansIOProtocol]:
        return [
            connection
            for connection in self.server.server_state.connections
            if isinstance(connection, LeanWebSocketsSansIOProtocol)
        ]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """`echo_app` with the task stream's WebSocket options, as `stella serve --tls` runs."""
    ca = load_or_create_pki(tmp_path_factory.mktemp("pki"))
    cert, key = ca.server_certificate_files(["127.0.0.1"])
    config = uvicorn_config(
        echo_app,
        host="127.0.0.1",
        port=0,
        tls=True,
        ca_cert_file=ca.files.ca_cert,
        server_cert_file=cert,
        server_key_file=key,
        lifespan="off",
        log_config=None,
        log_level="warning",
        **websocket_options(Settings()),
    )
    with _serving(config) as (port, server):
        yield Served(port, server, ca.files.ca_cert)


@contextmanager
def _serving(config: uvicorn.Config) -> Iterator[tuple[int, uvicorn.Server]]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            assert thread.is_alive(), "uvicorn exited during startup"
            assert time.monotonic() < deadline, "uvicorn did not start within 10 s"
            time.sleep(0.01)
        yield sock.getsockname()[1], server
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def _connect(served: Served) -> connect:
    context = ssl.create_default_context(cafile=served.ca_file)
    # The `websockets` client offers permessage-deflate by default, as agents do.
    return connect(f"wss://127.0.0.1:{served.port}/", ssl=context, open_timeout=5)


def test_the_stream_server_uses_the_light_protocol() -> None:
    config = uvicorn_config(
        echo_app, host="127.0.0.1", port=0, tls=False, **websocket_options(Settings())
    )
    config.load()
    assert config.ws_protocol_class is TLSWebSocketsSansIOProtocol
    assert issubclass(TLSWebSocketsSansIOProtocol, LeanWebSocketsSansIOProtocol)


def test_an_open_connection_keeps_no_handshake_and_no_compression(served: Served) -> None:
    async def scenario() -> None:
        async with _connect(served) as websocket:
            await websocket.send("hello")
            assert await asyncio.wait_for(websocket.recv(), 5) == "hello"
            assert websocket.protocol.extensions == []  # deflate offered, and declined
            (protocol,) = served.protocols()
            assert "request" not in vars(protocol)
            assert "response" not in vars(protocol)
            assert protocol.conn.extensions == []
            assert isinstance(protocol.queue, Inbox)
            assert isinstance(protocol.writable, Gate)
            assert protocol.scope["headers"]  # the app's copy is untouched

    asyncio.run(scenario())


def test_messages_flow_in_order_and_the_app_closes_with_its_code(served: Served) -> None:
    async def scenario() -> None:
        async with _connect(served) as websocket:
            # Sent at once: the protocol queues them and pauses reading meanwhile.
            texts = [json.dumps({"n": n, "pad": "x" * 2000}) for n in range(200)]
            for text in texts:
                await websocket.send(text)
            echoed = [await asyncio.wait_for(websocket.recv(), 5) for _ in texts]
            assert echoed == texts
            await websocket.send("close")
            with pytest.raises(ConnectionClosed) as closed:
                await asyncio.wait_for(websocket.recv(), 5)
            assert closed.value.rcvd is not None
            assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (4000, "asked")

    asyncio.run(scenario())
