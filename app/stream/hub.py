"""The receiving side of agent events, for the streams of one web process.

A stream subscribes to its agent and reads events from an asyncio queue.
Besides the events themselves the queue carries `RESYNC`: "you may have
missed something, re-read the database", sent after (re)connecting to Redis.
Fleet listeners (`Hub.listen`) hear the events other processes publish,
and RESYNC, on the event loop (this process's own events reach them through
`Notifier.subscribe_all`): the heartbeat path keeps its caches and its
index of pending work with them.

- `LocalHub`: events published in this process (`LocalNotifier`); the
  single-node fallback when STELLA_REDIS_URL is not set.
- `RedisHub`: one Redis pub/sub connection per web process, one channel per
  connected agent, and the fleet channel for the listeners. It survives
  Redis restarts: a `get_message` loop (not `listen()`, which dies with
  the connection) reconnects with backoff,
  resubscribes every channel, then tells every stream to resync, since
  messages published during the outage are gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, Protocol

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from app.notify import AgentEvent, LocalNotifier, agent_channel, fleet_channel
from app.server.websocket import Inbox

log = logging.getLogger(__name__)

Resync = Literal["resync"]
RESYNC: Resync = "resync"
StreamItem = AgentEvent | Resync
# Hears other processes' events, and RESYNC; called on the event loop.
FleetListener = Callable[[StreamItem], None]


@dataclass(eq=False)
class Subscription:
    """One stream's view of its agent's events."""

    agent_id: uuid.UUID
    # Not an asyncio.Queue: this allocates nothing while the stream is idle.
    queue: Inbox[StreamItem] = field(default_factory=Inbox)
    _close: Callable[[], None] | None = None

    def close(self) -> None:
        if self._close is not None:
            self._close()
            self._close = None


class Hub(Protocol):
    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def subscribe(self, agent_id: uuid.UUID) -> Subscription: ...

    def listen(self, listener: FleetListener) -> None: ...


class LocalHub:
    """Streams of this process hear events published by this process."""

    def __init__(self, notifier: LocalNotifier) -> None:
        self._notifier = notifier

    def listen(self, listener: FleetListener) -> None:
        """No other process publishes here, and nothing is ever lost: nothing to hear."""

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    async def subscribe(self, agent_id: uuid.UUID) -> Subscription:
        loop = asyncio.get_running_loop()
        subscription = Subscription(agent_id)

        def deliver(event: AgentEvent) -> None:
            # Published from a worker thread (sync endpoints): hop onto the loop.
            loop.call_soon_threadsafe(subscription.queue.put_nowait, event)

        subscription._close = self._notifier.subscribe(agent_id, deliver)
        return subscription


class RedisHub:
    """Streams of this process hear events published anywhere, through Redis."""

    MAX_BACKOFF = 5.0

    def __init__(self, url: str, *, prefix: str = "") -> None:
        self._url = url
        self._prefix = prefix
        self._fleet = fleet_channel(prefix)
        self._listeners: list[FleetListener] = []
        self._subscriptions: dict[uuid.UUID, set[Subscription]] = {}
        # Channel changes are applied by the reader task, which owns the connection.
        self._changes: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self.connected = asyncio.Event()

    def listen(self, listener: FleetListener) -> None:
        self._listeners.append(listener)

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="stella-redis-hub")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def subscribe(self, agent_id: uuid.UUID) -> Subscription:
        subscription = Subscription(agent_id)
        subscribers = self._subscriptions.setdefault(agent_id, set())
        if not subscribers:
            self._changes.put_nowait(("subscribe", self._channel(agent_id)))
        subscribers.add(subscription)

        def close() -> None:
            remaining = self._subscriptions.get(agent_id, set())
            remaining.discard(subscription)
            if not remaining:
                self._subscriptions.pop(agent_id, None)
                self._changes.put_nowait(("unsubscribe", self._channel(agent_id)))

        subscription._close = close
        return subscription

    def _channel(self, agent_id: uuid.UUID) -> str:
        return agent_channel(self._prefix, agent_id)

    async def _run(self) -> None:
        backoff = 0.1
        while True:
            # No retries inside redis-py: its own reconnect resubscribes without
            # telling us, and whatever was published meanwhile would be missed
            # with no resync. Every loss comes here, and is followed by one.
            client = aioredis.Redis.from_url(
                self._url, socket_connect_timeout=2, retry=Retry(NoBackoff(), 0)
            )
            pubsub = client.pubsub()
            try:
                await self._serve(pubsub)
            except Exception as exc:
                # Not only redis-py's errors: uvloop raises RuntimeError writing
                # to a transport the server closed. The hub must outlive any of
                # them, or this process would stop hearing events (deletions
                # included) while believing it still does.
                if self.connected.is_set():
                    log.warning(
                        "Redis pub/sub lost (%s: %s); reconnecting", type(exc).__name__, exc
                    )
                    # `_serve` never returns: a lost connection that had been
                    # up starts the backoff again from its minimum.
                    backoff = 0.1
                self.connected.clear()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.MAX_BACKOFF)
            else:
                backoff = 0.1
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
                    await client.aclose()

    async def _serve(self, pubsub: aioredis.client.PubSub) -> None:
        # The fleet channel also keeps the connection subscribed while no agent is.
        await pubsub.subscribe(self._fleet)
        # Pending changes are covered by the full subscribe below. Drop them
        # before the snapshot, not after the await: a stream arriving while
        # that SUBSCRIBE is sent queues a change the loop must still apply.
        while not self._changes.empty():
            self._changes.get_nowait()
        channels = [self._channel(agent_id) for agent_id in self._subscriptions]
        if channels:
            await pubsub.subscribe(*channels)
        self.connected.set()
        log.info("Redis pub/sub connected (%d agents)", len(channels))
        self._resync_all()
        while True:
            await self._apply_changes(pubsub)
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.05)
            if message is not None and message["type"] == "message":
                self._route(message["channel"], message["data"])

    async def _apply_changes(self, pubsub: aioredis.client.PubSub) -> None:
        while not self._changes.empty():
            action, channel = self._changes.get_nowait()
            if action == "subscribe":
                await pubsub.subscribe(channel)
                # Anything published before this point was missed: look again.
                agent_id = uuid.UUID(channel.rsplit(":", 1)[1])
                for subscription in self._subscriptions.get(agent_id, ()):
                    subscription.queue.put_nowait(RESYNC)
            else:
                await pubsub.unsubscribe(channel)

    def _route(self, channel: bytes, data: bytes) -> None:
        if channel.decode() == self._fleet:
            self._tell_listeners(data)
            return
        try:
            agent_id = uuid.UUID(channel.decode().rsplit(":", 1)[1])
            event = AgentEvent.decode(agent_id, data)
        except (ValueError, KeyError) as exc:
            log.warning("ignoring malformed event on %r: %s", channel, exc)
            return
        for subscription in self._subscriptions.get(agent_id, ()):
            subscription.queue.put_nowait(event)

    def _tell_listeners(self, data: bytes) -> None:
        try:
            event = AgentEvent.decode_with_agent(data)
        except (ValueError, KeyError) as exc:
            log.warning("ignoring malformed fleet event: %s", exc)
            return
        for listener in self._listeners:
            listener(event)

    def _resync_all(self) -> None:
        for listener in self._listeners:
            listener(RESYNC)
        for subscriptions in self._subscriptions.values():
            for subscription in subscriptions:
                subscription.queue.put_nowait(RESYNC)
