"""Stella and its ceiling side by side, started at the same time.

Each takes seconds to start (uvicorn workers importing the app); starting
both at once saves one of those waits per scenario, which the quick run's
time budget needs. Both stay up for the whole scenario, so the ceiling's
samples can be interleaved with Stella's and share the machine's noise.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

from bench.stack import BenchStack, WebServer


@contextlib.contextmanager
def web_and_ceiling(
    stack: BenchStack, *, ceiling: str = "heartbeat", workers: int = 2
) -> Iterator[tuple[WebServer, WebServer]]:
    """(`stella serve --tls`, the ceiling app), both with `workers` workers, both ready."""
    managers = [stack.web(workers=workers), stack.ceiling(ceiling, workers=workers)]
    with contextlib.ExitStack() as exits:
        with ThreadPoolExecutor(len(managers)) as pool:
            futures = [pool.submit(manager.__enter__) for manager in managers]
        started: list[WebServer] = []
        failure: BaseException | None = None
        for manager, future in zip(managers, futures, strict=True):
            error = future.exception()
            if error is None:
                started.append(future.result())
                exits.push(manager.__exit__)  # stopped whatever happens next
            else:
                failure = failure or error
        if failure is not None:
            raise failure
        yield started[0], started[1]
