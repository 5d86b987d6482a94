"""service.append_logs: the per-task log budget, on both databases.

Lines are kept while they fit in STELLA_TASK_LOG_MAX_BYTES (message bytes,
not characters); the first line that does not fit is replaced by one
visible marker, and everything after it is dropped, however small, whoever
writes it (the stream, a completion, concurrent writers).
The stream's side of it is in tests/stream/test_messages.py.
"""

from __future__ import annotations

import datetime as dt
import threading
import uuid
from collections.abc import Iterator

import httpx
import pytest

from app.db import transaction
from app.models import Task
from app.tasks import service
from app.tasks.schemas import LogLine
from tests.conftest import Stack, start_stack, truncate
from tests.tasks.helpers import Register, create_task, delivered_task, view

CAP = 2048
MARKER = f"[log truncated: over {CAP} bytes]"


@pytest.fixture(scope="module")
def capped(
    backend: str, database_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    """A 2 KiB log budget; no Celery worker (nothing here needs one)."""
    broker = "embedded" if backend == "sqlite" else "redis"
    yield from start_stack(
        tmp_path_factory.mktemp("logs"),
        database_url,
        broker=broker,
        worker=False,
        task_log_max_bytes=CAP,
    )


@pytest.fixture
def stack(capped: Stack) -> Stack:
    """Overrides conftest's `stack`: `operator` and `register` use this one."""
    truncate(capped.runtime)
    return capped


def line(message: str) -> LogLine:
    return LogLine(timestamp=dt.datetime.now(dt.UTC), level="info", message=message)


def append(stack: Stack, task_id: str, *messages: str) -> int:
    with transaction(stack.runtime.engine) as session:
        return service.append_logs(
            session=session,
            settings=stack.settings,
            task_id=uuid.UUID(task_id),
            lines=[line(message) for message in messages],
        )


def budget(stack: Stack, task_id: str) -> tuple[int, bool]:
    with transaction(stack.runtime.engine) as session:
        task = session.get(Task, uuid.UUID(task_id))
        assert task is not None
        return task.log_bytes, task.log_truncated


def stored(operator: httpx.Client, task_id: str) -> list[str]:
    return [entry["message"] for entry in view(operator, task_id)["logs"]]


def kept_bytes(messages: list[str]) -> int:
    return sum(len(message.encode()) for message in messages if message != MARKER)


class TestCap:
    def test_lines_fill_the_cap_exactly_then_one_marker_then_nothing(
        self, stack: Stack, operator: httpx.Client, register: Register
    ) -> None:
        task_id = create_task(operator, register())
        quarter = ["a" * 511 + str(i) for i in range(4)]  # 4 x 512 = the cap, to the byte

        assert append(stack, task_id, *quarter[:2]) == 2
        assert append(stack, task_id, *quarter[2:]) == 2
        assert budget(stack, task_id) == (CAP, False)
        assert stored(operator, task_id) == quarter

        assert append(stack, task_id, "x") == 1  # the marker, not the line
        assert budget(stack, task_id) == (CAP, True)
        for later in (["y"], [""], ["z", "w"]):
            assert append(stack, task_id, *later) == 0
        logs = view(operator, task_id)["logs"]
        assert [entry["message"] for entry in logs] == [*quarter, MARKER]
        assert logs[-1]["level"] == "warning"

    def test_the_first_line_that_does_not_fit_ends_the_log_even_if_later_ones_would(
        self, stack: Stack, operator: httpx.Client, register: Register
    ) -> None:
        task_id = create_task(operator, register())
        assert append(stack, task_id, "a" * 1500, "b" * 600, "c" * 10) == 2
        assert stored(operator, task_id) == ["a" * 1500, MARKER]
        assert budget(stack, task_id) == (1500, True)

    def test_the_cap_counts_bytes_not_characters(
        self, stack: Stack, operator: httpx.Client, register: Register
    ) -> None:
        agent = register()
        exact, over = create_task(operator, agent), create_task(operator, agent)
        append(stack, exact, "é" * (CAP // 2))  # 1024 characters, 2048 bytes
        append(stack, over, "é" * (CAP // 2 + 1))  # 1025 characters, 2050 bytes
        assert stored(operator, exact) == ["é" * (CAP // 2)]
        assert stored(operator, over) == [MARKER]

    def test_each_task_has_its_own_budget(
        self, stack: Stack, operator: httpx.Client, register: Register
    ) -> None:
        agent = register()
        first, second = create_task(operator, agent), create_task(operator, agent)
        append(stack, first, "a" * CAP, "more")
        append(stack, second, "b" * CAP)
        assert stored(operator, first) == ["a" * CAP, MARKER]
        assert stored(operator, second) == ["b" * CAP]

    def test_nul_characters_are_stored_as_replacement_characters(
        self, stack: Stack, operator: httpx.Client, register: Register
    ) -> None:
        # PostgreSQL text cannot hold NUL: the same visible stand-in on both backends.
        task_id = create_task(operator, register())
        assert append(stack, task_id, "a\x00b") == 1
        assert stored(operator, task_id) == ["a\ufffdb"]
        assert budget(stack, task_id) == (len("a\ufffdb".encode()), False)

    def test_concurrent_writers_never_overshoot_and_leave_one_marker(
        self, stack: Stack, operator: httpx.Client, register: Register
    ) -> None:
        task_id = create_task(operator, register())
        barrier = threading.Barrier(4)
        errors: list[BaseException] = []

        def writer(n: int) -> None:
            try:
                barrier.wait(timeout=10)
                # One line per transaction, then batches of three: both paths race.
                for i in range(6):
                    append(stack, task_id, f"w{n}-{i:02d} ".ljust(100, "."))
                for i in range(3):
                    lines = [f"w{n}-b{i}{j} ".ljust(100, ".") for j in range(3)]
                    append(stack, task_id, *lines)
            except BaseException as exc:  # surfaced below
                errors.append(exc)

        threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert errors == []

        messages = stored(operator, task_id)
        # 60 lines of 100 bytes were offered: exactly 20 fit in 2048 bytes.
        assert messages.count(MARKER) == 1
        assert messages[-1] == MARKER
        assert len(messages) == 21
        assert kept_bytes(messages) == 2000
        assert budget(stack, task_id) == (2000, True)
        for n in range(4):  # each writer's lines kept in its own order
            own = [message for message in messages if message.startswith(f"w{n}-")]
            assert own == sorted(own)


class TestCompletionLogs:
    def test_completion_logs_are_capped_and_a_repeat_adds_nothing(
        self, stack: Stack, operator: httpx.Client, register: Register
    ) -> None:
        agent = register()
        task_id = delivered_task(operator, agent)
        lines = [
            {"timestamp": "2026-01-10T14:23:45Z", "message": f"line {i:02d} ".ljust(300, "x")}
            for i in range(10)
        ]
        assert agent.complete(task_id, logs=lines).status_code == 200
        expected = [entry["message"] for entry in lines[: CAP // 300]] + [MARKER]
        assert stored(operator, task_id) == expected

        again = agent.complete(task_id, logs=lines)  # same outcome: 200 again
        assert again.status_code == 200, again.text
        assert stored(operator, task_id) == expected

    def test_completion_logs_continue_the_budget_of_earlier_lines(
        self, stack: Stack, operator: httpx.Client, register: Register
    ) -> None:
        agent = register()
        task_id = delivered_task(operator, agent)
        append(stack, task_id, "s" * 1500)
        logs = [
            {"timestamp": "2026-01-10T14:23:45Z", "message": "t" * 500},
            {"timestamp": "2026-01-10T14:23:46Z", "message": "u" * 100},
        ]
        assert agent.complete(task_id, logs=logs).status_code == 200
        assert stored(operator, task_id) == ["s" * 1500, "t" * 500, MARKER]
        assert view(operator, task_id)["status"] == "succeeded"

    def test_an_out_of_range_timestamp_is_a_422_not_a_500(
        self, stack: Stack, operator: httpx.Client, register: Register
    ) -> None:
        # Parses, but overflows once converted to UTC.
        agent = register()
        task_id = delivered_task(operator, agent)
        logs = [{"timestamp": "0001-01-01T00:00:00+01:00", "message": "x"}]
        response = agent.complete(task_id, logs=logs)
        assert response.status_code == 422, response.text
        assert "timestamp" in response.json()["detail"]
        assert view(operator, task_id)["status"] == "assigned"
