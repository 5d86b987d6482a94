"""What an agent may send on its task stream, and what happens when it misbehaves.

Every invalid message gets `{"type": "error", "detail": ...}` and the stream
stays open; `task_progress` and `task_log` reach the operator's view of the
task (logs within the per-task cap, behind one marker); an oversize frame
closes with 1009, a flood with 1008, a database failure with 1013; the
server pings, and drops a client that stops answering. Both stacks: SQLite
with the in-process hub, PostgreSQL with Redis pub/sub. The stacks here run
without a Celery worker (no test needs one) and with small limits, so that
every limit is reached quickly.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed
from websockets.frames import Close, Frame, Opcode

from app.db import transaction
from app.tasks import service as tasks_service
from tests.conftest import AgentClient, Stack, start_stack, truncate
from tests.tasks.helpers import Register, delivered_task, view

LOG_CAP = 2048
FRAME_LIMIT = 256 * 1024
BURST = 30
RATE = 5.0
PING_INTERVAL = 0.5
SECRET = "sk-live-5f1e2d3c4b5a69788796a5b4c3d2e1f0"
MARKER_PREFIX = "[log truncated:"


def _tuned(backend: str, database_url: str, tmp: Path, **overrides: Any) -> Iterator[Stack]:
    # The embedded pair (SQLite, in-process hub) and the production pair
    # (PostgreSQL, Redis pub/sub), as conftest's `_stack`.
    broker = "embedded" if backend == "sqlite" else "redis"
    yield from start_stack(tmp, database_url, broker=broker, worker=False, **overrides)


@pytest.fixture(scope="module")
def limited(
    backend: str, database_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    """Small log cap, a frame limit above the 64 KiB field limit, a small burst.

    The periodic re-check is pushed out of the way (taskPollInterval = 1 h), so
    that a stream claims tasks only on connect and on events.
    """
    yield from _tuned(
        backend,
        database_url,
        tmp_path_factory.mktemp("limited"),
        task_log_max_bytes=LOG_CAP,
        stream_max_message_bytes=FRAME_LIMIT,
        stream_burst=BURST,
        stream_messages_per_second=RATE,
        task_poll_interval=3600,
    )


@pytest.fixture
def stack(limited: Stack) -> Stack:
    """Overrides conftest's `stack`: `operator` and `register` use this one."""
    truncate(limited.runtime)
    return limited


# --- helpers -------------------------------------------------------------------------------


class WatchedConnection(ClientConnection):
    """A client connection that counts the pings it receives and can stop answering them."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.pings = 0
        self.mute = False

    def process_event(self, event: Any) -> None:
        if isinstance(event, Frame) and event.opcode is Opcode.PING:
            self.pings += 1
        super().process_event(event)

    def send_data(self) -> None:
        if self.mute:  # swallow everything, the automatic pongs included
            self.protocol.data_to_send()
            return
        super().send_data()


@asynccontextmanager
async def open_stream(stack: Stack, agent: AgentClient) -> AsyncIterator[WatchedConnection]:
    url = stack.base_url.replace("https://", "wss://") + f"/api/v1/agents/{agent.id}/task-stream"
    async with connect(
        url,
        ssl=stack.ssl_context(agent.cert_file, agent.key_file),
        additional_headers={"Authorization": f"Bearer {agent.token}"},
        open_timeout=10,
        # No client pings: the keepalive tests watch the server's.
        ping_interval=None,
        # Let the server's limit, not the client's, decide what is too big.
        max_size=None,
        create_connection=WatchedConnection,
    ) as websocket:
        assert isinstance(websocket, WatchedConnection)
        yield websocket


async def receive(websocket: ClientConnection, timeout: float = 5) -> dict[str, Any]:
    message: dict[str, Any] = json.loads(await asyncio.wait_for(websocket.recv(), timeout))
    return message


async def send(websocket: ClientConnection, message: dict[str, Any]) -> None:
    await websocket.send(json.dumps(message))


async def closed_with(websocket: ClientConnection, timeout: float = 5) -> Close:
    """Read until the server closes (skipping any message before); the close frame it sent."""
    with pytest.raises(ConnectionClosed) as closed:
        await drain(websocket, timeout)
    assert closed.value.rcvd is not None, closed.value  # a close frame, not a dropped connection
    return closed.value.rcvd


async def drain(websocket: ClientConnection, timeout: float) -> None:
    while True:
        await asyncio.wait_for(websocket.recv(), timeout)


async def error_for(websocket: ClientConnection, message: dict[str, Any]) -> dict[str, Any] | None:
    """The error the stream answers `message` with, or None when it accepted it.

    A message for an unknown task follows as a marker: the stream answers an
    agent's messages in order, so the marker's error comes after any for
    `message`. Pushed `task_assigned` messages in between are skipped.
    """
    marker = str(uuid.uuid4())
    await send(websocket, message)
    await send(websocket, progress(marker))
    answer = None
    while True:
        reply = await receive(websocket)
        if reply["type"] != "error":
            continue
        if marker in reply["detail"]:
            return answer
        assert answer is None, reply  # one answer per message
        answer = reply


async def in_thread(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    return await asyncio.to_thread(function, *args, **kwargs)


async def view_when(
    operator: httpx.Client,
    task_id: str,
    ready: Callable[[dict[str, Any]], bool],
    timeout: float = 5,
) -> dict[str, Any]:
    """The operator's view of the task once `ready` holds (messages are not acknowledged)."""
    deadline = time.monotonic() + timeout
    while True:
        current: dict[str, Any] = await in_thread(view, operator, task_id)
        if ready(current):
            return current
        assert time.monotonic() < deadline, current
        await asyncio.sleep(0.05)


Make = Callable[[str], dict[str, Any]]


def progress(task_id: str, value: int | None = None, message: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"type": "task_progress", "taskId": task_id}
    if value is not None:
        body["progress"] = value
    if message is not None:
        body["message"] = message
    return body


def log_line(task_id: str, message: str, level: str = "info") -> dict[str, Any]:
    return {"type": "task_log", "taskId": task_id, "level": level, "message": message}


def messages(current: dict[str, Any]) -> list[str]:
    return [line["message"] for line in current["logs"]]


def markers(current: dict[str, Any]) -> list[str]:
    return [text for text in messages(current) if text.startswith(MARKER_PREFIX)]


def kept_bytes(current: dict[str, Any]) -> int:
    return sum(
        len(text.encode()) for text in messages(current) if not text.startswith(MARKER_PREFIX)
    )


def insert_pending_task(stack: Stack, agent: AgentClient) -> str:
    """A pending task written straight to the database: no stream hears of it."""
    with transaction(stack.runtime.engine) as session:
        task = tasks_service.new_task(
            settings=stack.settings,
            cipher=stack.runtime.cipher,
            agent_id=uuid.UUID(agent.id),
            task_type="docker.pull",
            payload={},
            credentials=None,
            timeout=None,
            priority=0,
        )
        session.add(task)
        return str(task.id)


# --- invalid messages ----------------------------------------------------------------------


class TestInvalidMessages:
    def test_each_gets_an_error_that_never_echoes_it_and_the_stream_stays_open(
        self, stack: Stack, register: Register, operator: httpx.Client
    ) -> None:
        agent = register()
        task_id = delivered_task(operator, agent)
        # (frame, a word the detail should carry to say what was wrong)
        cases: list[tuple[str | bytes, str]] = [
            (f"not json {SECRET}", "JSON"),
            (json.dumps([SECRET]), "object"),
            (json.dumps(SECRET), "object"),
            (json.dumps({"taskId": task_id, "note": SECRET}), "type"),
            (json.dumps({"type": SECRET, "taskId": task_id}), "type"),
            (json.dumps({"type": "task_progress", "progress": 5, "message": SECRET}), "taskId"),
            (json.dumps(progress(SECRET, 5)), "taskId"),
            (json.dumps({**progress(task_id), "progress": SECRET}), "progress"),
            (json.dumps(progress(task_id, 101, SECRET)), "progress"),
            (json.dumps(progress(task_id, -1, SECRET)), "progress"),
            (json.dumps(progress(task_id, 5, SECRET * 40)), "message"),
            (json.dumps(log_line(task_id, SECRET * 1700)), "message"),  # 68 000 > 64 KiB
            (json.dumps(log_line(task_id, "x", level=SECRET)), "level"),
            (json.dumps({**log_line(task_id, "x"), "timestamp": SECRET}), "timestamp"),
            # Parses, but is out of range once converted to UTC.
            (
                json.dumps({**log_line(task_id, SECRET), "timestamp": "0001-01-01T00:00:00+01:00"}),
                "timestamp",
            ),
            (b"\xff\xfe\x00" + SECRET.encode(), "JSON"),
            # Nested 10,000 deep, alone and inside a message: refused by the parser's depth limit.
            ("[" * 10_000 + "]" * 10_000, "JSON"),
            (
                json.dumps(progress(task_id, 5))[:-1]
                + ', "x": '
                + "[" * 10_000
                + "]" * 10_000
                + "}",
                "JSON",
            ),
        ]
        assert len(cases) + 1 < BURST  # well-behaved: the flood limit is not what is tested
        assert len(json.dumps(log_line(task_id, SECRET * 1700))) < FRAME_LIMIT

        async def scenario() -> None:
            async with open_stream(stack, agent) as websocket:
                for frame, word in cases:
                    await websocket.send(frame)
                    reply = await receive(websocket)
                    assert set(reply) == {"type", "detail"}, reply
                    assert reply["type"] == "error"
                    detail = reply["detail"]
                    assert isinstance(detail, str)
                    assert SECRET not in detail, (frame[:80], detail)
                    assert SECRET[:12] not in detail, (frame[:80], detail)
                    assert len(detail) < 300
                    assert word.lower() in detail.lower(), (frame[:80], detail)

                # Still open, and still listening: a valid message after all that is applied.
                await send(websocket, progress(task_id, 42, "still here"))
                current = await view_when(operator, task_id, lambda v: v["progress"] == 42)
                assert current["status"] == "running"
                assert current["progressMessage"] == "still here"
                assert current["logs"] == []  # none of the invalid log lines was stored

        asyncio.run(scenario())

    def test_progress_for_a_task_it_may_not_touch_is_an_error(
        self, stack: Stack, register: Register, operator: httpx.Client
    ) -> None:
        agent, other = register(), register()
        mine = delivered_task(operator, agent)
        others = delivered_task(operator, other)
        finished = delivered_task(operator, agent)
        assert agent.complete(finished, result={"ok": True}).status_code == 200
        unknown = str(uuid.uuid4())
        never_delivered: list[str] = []

        async def refused_while_pending(websocket: ClientConnection, make: Make) -> dict[str, Any]:
            # A pending task is handed over by any wake-up of the stream, and a few
            # may still be due from the connect (the resync after subscribing to
            # Redis, the events of tasks created just before): when one claims the
            # task first, the message is accepted. Each such miss uses one up, so a
            # fresh pending task soon stays pending long enough.
            for _ in range(5):
                pending = await in_thread(insert_pending_task, stack, agent)
                reply = await error_for(websocket, make(pending))
                if reply is not None:
                    never_delivered.append(pending)
                    return reply
            raise AssertionError("every pending task was claimed before the message")

        async def scenario() -> None:
            async with open_stream(stack, agent) as websocket:
                for make in (progress, lambda task_id: log_line(task_id, "a line")):
                    for task_id, expected in (
                        (others, "not found"),
                        (unknown, "not found"),
                        (finished, "already ended"),
                    ):
                        reply = await error_for(websocket, make(task_id))
                        assert reply is not None, task_id
                        assert expected in reply["detail"], (task_id, reply)
                    reply = await refused_while_pending(websocket, make)
                    assert "not delivered" in reply["detail"], reply

                await send(websocket, progress(mine, 10))
                await view_when(operator, mine, lambda v: v["status"] == "running")

        asyncio.run(scenario())

        assert view(operator, others)["status"] == "assigned"
        assert view(operator, others)["progress"] is None
        assert view(operator, others)["logs"] == []
        assert view(operator, finished)["status"] == "succeeded"
        assert view(operator, finished)["logs"] == []
        for pending in never_delivered:  # refused, then maybe claimed: never running
            assert view(operator, pending)["startedAt"] is None
            assert view(operator, pending)["logs"] == []


# --- progress and logs ---------------------------------------------------------------------


class TestProgressAndLogs:
    def test_progress_makes_the_task_running_and_completion_still_works(
        self, stack: Stack, register: Register, operator: httpx.Client
    ) -> None:
        agent = register()
        task_id = delivered_task(operator, agent)
        assert view(operator, task_id)["startedAt"] is None

        async def scenario() -> dict[str, Any]:
            async with open_stream(stack, agent) as websocket:
                await send(websocket, progress(task_id, 30, "Pulling layer 1/5"))
                first = await view_when(operator, task_id, lambda v: v["progress"] == 30)
                await send(websocket, progress(task_id, 60, "Pulling layer 3/5"))
                second = await view_when(operator, task_id, lambda v: v["progress"] == 60)
                assert second["startedAt"] == first["startedAt"]  # set once, by the first
                return first

        first = asyncio.run(scenario())
        assert first["status"] == "running"
        assert first["startedAt"] is not None
        assert first["startedAt"] >= first["assignedAt"]
        assert first["progressMessage"] == "Pulling layer 1/5"
        current = view(operator, task_id)
        assert current["status"] == "running"
        assert current["progressMessage"] == "Pulling layer 3/5"

        completed = agent.complete(task_id, result={"digest": "sha256:abc"})
        assert completed.status_code == 200, completed.text
        done = view(operator, task_id)
        assert done["status"] == "succeeded"
        assert done["result"] == {"digest": "sha256:abc"}
        assert done["completedAt"] is not None
        assert done["progress"] == 60

    def test_log_lines_appear_in_order(
        self, stack: Stack, register: Register, operator: httpx.Client
    ) -> None:
        agent = register()
        task_id = delivered_task(operator, agent)
        lines = [(f"line {i:02d}", ("info", "warning", "error")[i % 3]) for i in range(12)]

        async def scenario() -> dict[str, Any]:
            async with open_stream(stack, agent) as websocket:
                for text, level in lines:
                    await send(websocket, log_line(task_id, text, level))
                return await view_when(operator, task_id, lambda v: len(v["logs"]) == len(lines))

        current = asyncio.run(scenario())
        assert [(line["message"], line["level"]) for line in current["logs"]] == lines
        assert all(line["timestamp"].endswith("Z") for line in current["logs"])
        assert current["status"] == "assigned"  # logs alone do not start the task

    def test_nul_characters_are_stored_as_replacement_characters(
        self, stack: Stack, register: Register, operator: httpx.Client
    ) -> None:
        # PostgreSQL text cannot hold NUL; a log line with one must not cost the stream.
        agent = register()
        task_id = delivered_task(operator, agent)

        async def scenario() -> dict[str, Any]:
            async with open_stream(stack, agent) as websocket:
                await send(websocket, log_line(task_id, "before\x00after"))
                await send(websocket, progress(task_id, 7, "step\x00one"))
                await send(websocket, progress(task_id, 8, "step two"))
                return await view_when(operator, task_id, lambda v: v["progress"] == 8)

        current = asyncio.run(scenario())
        assert messages(current) == ["before\ufffdafter"]
        assert current["progressMessage"] == "step two"
        completed = agent.complete(
            task_id, logs=[{"timestamp": "2026-01-10T14:23:45Z", "message": "exit\x00code"}]
        )
        assert completed.status_code == 200, completed.text
        assert messages(view(operator, task_id)) == ["before\ufffdafter", "exit\ufffdcode"]

    def test_streamed_logs_stop_at_the_cap_behind_one_marker_and_so_do_completion_logs(
        self, stack: Stack, register: Register, operator: httpx.Client
    ) -> None:
        agent = register()
        task_id = delivered_task(operator, agent)
        lines = [f"line {i:02d} ".ljust(300, "x") for i in range(10)]
        fit = LOG_CAP // 300  # 6 lines, 1800 bytes

        async def scenario() -> dict[str, Any]:
            async with open_stream(stack, agent) as websocket:
                for text in lines:
                    await send(websocket, log_line(task_id, text))
                # A line sent after the marker is dropped even though it is short.
                await send(websocket, log_line(task_id, "short"))
                await send(websocket, progress(task_id, 99))
                # The progress was sent last: once it shows, every line was handled.
                return await view_when(operator, task_id, lambda v: v["progress"] == 99)

        current = asyncio.run(scenario())
        assert messages(current)[:fit] == lines[:fit]
        assert len(markers(current)) == 1
        assert messages(current)[-1].startswith(MARKER_PREFIX)
        assert str(LOG_CAP) in markers(current)[0]
        assert len(current["logs"]) == fit + 1
        assert kept_bytes(current) <= LOG_CAP

        completed = agent.complete(
            task_id, logs=[{"timestamp": "2026-01-10T14:23:45Z", "message": "final"}]
        )
        assert completed.status_code == 200, completed.text
        done = view(operator, task_id)
        assert done["status"] == "succeeded"
        assert messages(done) == messages(current)  # nothing after the marker, no second marker


# --- limits --------------------------------------------------------------------------------


class TestLimits:
    def test_a_frame_over_the_limit_is_closed_with_1009(
        self, stack: Stack, register: Register, operator: httpx.Client
    ) -> None:
        agent = register()
        task_id = delivered_task(operator, agent)

        async def scenario() -> None:
            async with open_stream(stack, agent) as websocket:
                await websocket.send(json.dumps(log_line(task_id, "x" * FRAME_LIMIT)))
                close = await closed_with(websocket)
                assert close.code == 1009, close

        asyncio.run(scenario())
        assert view(operator, task_id)["logs"] == []

    def test_a_flood_is_closed_with_1008(
        self, stack: Stack, register: Register, operator: httpx.Client
    ) -> None:
        agent = register()
        task_id = delivered_task(operator, agent)

        async def scenario() -> Close:
            async with open_stream(stack, agent) as websocket:
                started = time.monotonic()
                try:
                    for i in range(BURST * 4):
                        await send(websocket, progress(task_id, min(i, 100)))
                except ConnectionClosed:
                    pass  # cut off while still sending
                close = await closed_with(websocket)
                assert time.monotonic() - started < 5
                return close

        close = asyncio.run(scenario())
        assert close.code == 1008, close
        assert close.reason  # says why
        # Roughly the burst went through before the cut, not the whole flood.
        assert view(operator, task_id)["progress"] < BURST * 2

    def test_a_steady_client_under_the_rate_is_not_cut_off(
        self, stack: Stack, register: Register, operator: httpx.Client
    ) -> None:
        agent = register()
        task_id = delivered_task(operator, agent)

        async def scenario() -> None:
            async with open_stream(stack, agent) as websocket:
                # The burst, then RATE messages a second on top: all within the limit.
                for i in range(BURST - 2):
                    await send(websocket, progress(task_id, i))
                await asyncio.sleep(2 / RATE)
                await send(websocket, progress(task_id, 77))
                await view_when(operator, task_id, lambda v: v["progress"] == 77)

        asyncio.run(scenario())


class TestDatabaseTrouble:
    def test_a_database_failure_while_applying_a_message_closes_with_1013(
        self,
        stack: Stack,
        register: Register,
        operator: httpx.Client,
    ) -> None:
        agent = register()
        task_id = delivered_task(operator, agent)

        async def scenario() -> Close:
            async with open_stream(stack, agent) as websocket:
                await send(websocket, progress(task_id, 5))
                return await closed_with(websocket)

        # The real database refuses the progress UPDATE (a trigger), as a
        # failing server would: no service or session is replaced.
        with failing_task_updates(stack):
            close = asyncio.run(scenario())
        assert close.code == 1013, close  # try again later, as documented
        assert "reconnect" in close.reason


@contextmanager
def failing_task_updates(stack: Stack) -> Iterator[None]:
    """Make every UPDATE of a task row fail in the database until the block ends."""
    engine = stack.runtime.engine
    with engine.begin() as connection:
        if engine.dialect.name == "postgresql":
            connection.execute(
                text(
                    "CREATE FUNCTION refuse_task_update() RETURNS trigger LANGUAGE plpgsql AS "
                    "$$ BEGIN RAISE EXCEPTION 'database failing'; END $$"
                )
            )
            connection.execute(
                text(
                    "CREATE TRIGGER refuse_task_update BEFORE UPDATE ON tasks "
                    "FOR EACH ROW EXECUTE FUNCTION refuse_task_update()"
                )
            )
        else:
            connection.execute(
                text(
                    "CREATE TRIGGER refuse_task_update BEFORE UPDATE ON tasks "
                    "BEGIN SELECT RAISE(ABORT, 'database failing'); END"
                )
            )
    try:
        yield
    finally:
        with engine.begin() as connection:
            connection.execute(
                text(
                    "DROP TRIGGER refuse_task_update"
                    + (" ON tasks" if engine.dialect.name == "postgresql" else "")
                )
            )
            if engine.dialect.name == "postgresql":
                connection.execute(text("DROP FUNCTION refuse_task_update()"))


# --- keepalive -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pinging(
    backend: str, database_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    """Pings every 0.5 s, a pong due within 0.5 s."""
    yield from _tuned(
        backend,
        database_url,
        tmp_path_factory.mktemp("pinging"),
        stream_ping_interval=PING_INTERVAL,
    )


class TestKeepalive:
    @pytest.fixture
    def stack(self, pinging: Stack) -> Stack:
        truncate(pinging.runtime)
        return pinging

    def test_the_server_pings_and_a_silent_stream_stays_open(
        self, stack: Stack, register: Register, operator: httpx.Client
    ) -> None:
        agent = register()
        task_id = delivered_task(operator, agent)

        async def scenario() -> None:
            async with open_stream(stack, agent) as websocket:
                await asyncio.sleep(3)
                # ~6 pings in 3 s at 0.5 s; the pong answers keep the stream alive.
                assert websocket.pings >= 3, websocket.pings
                await send(websocket, progress(task_id, 5))
                await view_when(operator, task_id, lambda v: v["progress"] == 5)

        asyncio.run(scenario())

    def test_a_client_that_stops_answering_pings_is_dropped(
        self, stack: Stack, register: Register
    ) -> None:
        agent = register()

        async def scenario() -> None:
            async with open_stream(stack, agent) as websocket:
                websocket.mute = True
                started = time.monotonic()
                close = await closed_with(websocket, timeout=5)
                assert close.code == 1011, close  # uvicorn: "keepalive ping timeout"
                # One interval to the next ping, one timeout waiting for its pong.
                assert time.monotonic() - started < 2 * PING_INTERVAL + 3
                assert websocket.pings >= 1

        asyncio.run(scenario())
