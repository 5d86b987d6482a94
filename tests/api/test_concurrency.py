"""Many requests contending for one row, or for SQLite's one write lock, at once.

Each request's database work and commit must happen within one worker
thread: a request that held a lock while waiting for another thread to
commit could starve the thread pool, and then every request would wait.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx

from tests.conftest import ADMIN_TOKEN, Stack, agent_client

# More than the server's worker-thread pool (40).
CONCURRENCY = 80


def _together(count: int, call: Any) -> list[int]:
    barrier = threading.Barrier(count)

    def one(index: int) -> int:
        barrier.wait(timeout=30)
        status: int = call(index)
        return status

    with ThreadPoolExecutor(max_workers=count) as pool:
        return list(pool.map(one, range(count), timeout=60))


class TestContention:
    def test_concurrent_heartbeats_of_one_agent_all_answer(
        self, stack: Stack, register: Any, tmp_path: Any
    ) -> None:
        agent = register()
        clients = [
            agent_client(
                stack,
                agent_id=agent.id,
                token=agent.token,
                cert_pem=agent.cert_file.read_text(),
                key_pem=agent.key_file.read_text(),
                tmp=tmp_path,
            )
            for _ in range(CONCURRENCY)
        ]
        try:
            statuses = _together(
                CONCURRENCY,
                lambda i: (
                    clients[i]
                    .post(f"/api/v1/agents/{agent.id}/heartbeat", json={"status": "healthy"})
                    .status_code
                ),
            )
        finally:
            for client in clients:
                client.close()
        assert statuses == [200] * CONCURRENCY

    def test_concurrent_token_mints_all_answer(self, stack: Stack) -> None:
        clients = [
            httpx.Client(
                base_url=stack.base_url,
                verify=stack.ssl_context(),
                headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
                timeout=60,
            )
            for _ in range(CONCURRENCY)
        ]
        answers: list[httpx.Response] = [None] * CONCURRENCY  # type: ignore[list-item]

        def mint(i: int) -> int:
            answers[i] = clients[i].post("/api/v1/registration-tokens", json={})
            return answers[i].status_code

        try:
            statuses = _together(CONCURRENCY, mint)
        finally:
            for client in clients:
                client.close()
        assert statuses == [201] * CONCURRENCY
        assert len({answer.json()["token"] for answer in answers}) == CONCURRENCY
