"""uvicorn's sans-I/O WebSocket protocol, keeping less per idle connection.

A web process holds thousands of task streams that are idle nearly all the
time, so what one idle connection keeps is what the fleet costs. uvicorn's
protocol keeps, for the life of each connection, an `asyncio.Queue` (four
deques, ~2.5 KB) that holds at most a few events at a time, an
`asyncio.Event` (a deque, ~0.4 KB) for write flow control, and the parsed
upgrade request and its response (~4.5 KB of headers) long after the
handshake. `LeanWebSocketsSansIOProtocol` behaves the same with `Inbox`
and `Gate`, which hold nothing while idle, and lets the handshake go once
it is answered (the app has its own copy of the headers, in the scope).

Like app/server/tls.py this relies on uvicorn internals (the `uvicorn==0.54.*`
pin); tests/server/test_websocket.py fails when they move.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any, Generic, TypeVar

from uvicorn._types import ASGISendEvent
from uvicorn.config import Config
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from uvicorn.server import ServerState
from websockets.http11 import Request

T = TypeVar("T")


class Inbox(Generic[T]):
    """`asyncio.Queue`'s put_nowait / get / empty, unbounded, allocating only while used."""

    __slots__ = ("_items", "_waiters")

    def __init__(self) -> None:
        self._items: deque[T] | None = None
        # A list: there is one waiter (the app's receive), and a deque costs 0.6 KB.
        self._waiters: list[asyncio.Future[None]] | None = None

    def empty(self) -> bool:
        return not self._items

    def put_nowait(self, item: T) -> None:
        if self._items is None:
            self._items = deque()
        self._items.append(item)
        self._wake_one()

    async def get(self) -> T:
        while not self._items:
            waiter = asyncio.get_running_loop().create_future()
            if self._waiters is None:
                self._waiters = []
            self._waiters.append(waiter)
            try:
                await waiter
            except BaseException:
                self._forget(waiter)
                # Woken, then cancelled before running: pass the wake-up on.
                if waiter.done() and not waiter.cancelled() and self._items:
                    self._wake_one()
                raise
        item = self._items.popleft()
        if not self._items:
            self._items = None
        return item

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.pop(0)
            if not waiter.done():
                waiter.set_result(None)
                break
        if not self._waiters:
            self._waiters = None

    def _forget(self, waiter: asyncio.Future[None]) -> None:
        if self._waiters is not None and waiter in self._waiters:
            self._waiters.remove(waiter)
        if not self._waiters:
            self._waiters = None


class Gate:
    """`asyncio.Event`'s set / clear / is_set / wait; starts set; allocates only when waited on."""

    __slots__ = ("_open", "_waiters")

    def __init__(self) -> None:
        self._open = True
        self._waiters: list[asyncio.Future[None]] | None = None

    def is_set(self) -> bool:
        return self._open

    def set(self) -> None:
        self._open = True
        waiters, self._waiters = self._waiters, None
        for waiter in waiters or ():
            if not waiter.done():
                waiter.set_result(None)

    def clear(self) -> None:
        self._open = False

    async def wait(self) -> bool:
        if self._open:
            return True
        waiter = asyncio.get_running_loop().create_future()
        if self._waiters is None:
            self._waiters = []
        self._waiters.append(waiter)
        try:
            await waiter
        finally:
            if self._waiters is not None and waiter in self._waiters:
                self._waiters.remove(waiter)
        return True


class LeanWebSocketsSansIOProtocol(WebSocketsSansIOProtocol):
    """uvicorn's websockets (sans-I/O) protocol, lighter while idle."""

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        # At debug level websockets logs every handshake header (the agent's
        # bearer token) and every frame (task credentials): never.
        self.conn.debug = False
        self.queue = Inbox()  # type: ignore[assignment]
        self.writable = Gate()  # type: ignore[assignment]

    def handle_connect(self, event: Request) -> None:
        super().handle_connect(event)
        # The scope has its own copy of the headers, and websockets' parser keeps
        # this request for as long as the connection lives: empty it (~3 KB).
        event.headers.clear()
        if self.handshake_complete:  # refused by the handshake itself
            self._forget_handshake()

    async def send(self, message: ASGISendEvent) -> None:
        await super().send(message)
        if self.handshake_complete:  # accepted, refused or answered: the handshake is over
            self._forget_handshake()

    def _forget_handshake(self) -> None:
        # Set by `handle_connect`, read only until the handshake is answered.
        self.__dict__.pop("request", None)
        self.__dict__.pop("response", None)
