"""The operator CLI and outcome unknown: `--wait` stops at `unknown` (exit 3), `show` shows it.

The agent goes through the agent API; the offline sweep runs in this process
with STELLA_OUTCOME_UNKNOWN on, against the stack's database.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from tests.cli.test_operator import Running, stella
from tests.conftest import Stack
from tests.tasks.helpers import Register
from tests.tasks.test_lost_work import enabled, go_silent, sweep_offline


def test_a_wait_ends_at_unknown_and_show_says_so(stack: Stack, register: Register) -> None:
    agent = register()
    running = Running(
        stack, "tasks", "dispatch", "--type", "docker.run", "--agent", agent.id,
        "--payload", '{"image": "web"}', "--wait", "--poll-interval", "0.1",
    )  # fmt: skip
    deadline = time.monotonic() + 30
    tasks: list[dict[str, Any]] = []
    while not tasks:
        assert time.monotonic() < deadline, running.output()
        time.sleep(0.1)
        tasks = agent.heartbeat().json()["tasks"]
    task_id = tasks[0]["taskId"]
    running.wait_for("assigned")
    go_silent(stack, agent)
    assert sweep_offline(stack, enabled(stack)) == [uuid.UUID(agent.id)]

    code, stdout, stderr = running.finish()
    assert code == 3, stderr
    assert "unknown" in stdout
    assert f"task {task_id} ended unknown: the agent was lost" in stderr

    shown = stella(stack, "tasks", "show", task_id)
    assert shown.returncode == 0, shown.stderr
    assert "unknown" in shown.stdout
