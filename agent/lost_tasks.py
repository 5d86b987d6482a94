"""What a restarted agent says about the tasks its previous run left unfinished.

The state directory is the agent's journal: a task is recorded there
(`StateDir.hold_task`, written and fsync'd) before it starts executing, and its
outcome (`finish_task`) before it is reported. A task recorded without an
outcome was running when the agent died. Before the new run takes any task,
`settle_interrupted` decides what to report for each: where the executor can
look at what the run left (a `docker.run` finds its container by label), the
real outcome; elsewhere an honest failure that says it was interrupted and not
re-run. The runner reports these as it reports any kept outcome; the server
takes them also for a task it holds as `unknown` (STELLA_OUTCOME_UNKNOWN).

A task the server lists as `unknown` that this agent holds no record of was
never started here (lost between assignment and start): `never_started`.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from agent.executors.base import Outcome
from agent.executors.docker import find_run
from agent.state import StateDir

log = logging.getLogger("stella.agent")

INTERRUPTED = (
    "interrupted: the agent stopped while this task ran, so its outcome is unknown; "
    "it was not re-run"
)
NEVER_STARTED = (
    "the agent was lost before it started this task (it holds no record of it); it was not run"
)
FIND_TIMEOUT = 30.0  # seconds a look at what a run left may take (docker ps)

# Task type → how to find out what an interrupted run of it did (None: cannot tell).
FINDERS: dict[str, Callable[[str], Awaitable[Outcome | None]]] = {"docker.run": find_run}


async def settle_interrupted(state: StateDir) -> None:
    """Give every task the previous run started and never finished an outcome to report."""
    for task_id, record in state.held_tasks().items():
        if record.get("outcome") is not None:
            continue
        outcome = await interrupted_outcome(task_id, str(record.get("taskType") or ""))
        state.finish_task(task_id, outcome)
        log.warning(
            "task %s was interrupted by a restart; reporting it as %s",
            task_id,
            "succeeded" if outcome["success"] else "failed",
        )


async def interrupted_outcome(task_id: str, task_type: str) -> dict[str, Any]:
    """The completion body for a task that was running when the agent died."""
    finder = FINDERS.get(task_type)
    found: Outcome | None = None
    if finder is not None:
        try:
            found = await asyncio.wait_for(finder(task_id), FIND_TIMEOUT)
        except Exception as exc:  # a look that fails tells nothing: report the interruption
            log.warning(
                "task %s: could not find out what the interrupted run did: %s", task_id, exc
            )
    if found is None:
        return {"success": False, "error": INTERRUPTED, "logs": []}
    body: dict[str, Any] = {
        "success": found.success,
        "logs": [
            {
                "timestamp": dt.datetime.now(dt.UTC).isoformat(),
                "level": "warning",
                "message": "the agent restarted while this task ran; its outcome was read "
                "from what the run left, not re-run",
            }
        ],
    }
    if found.result is not None:
        body["result"] = found.result
    if found.error is not None:
        body["error"] = found.error
    return body


def never_started() -> dict[str, Any]:
    return {"success": False, "error": NEVER_STARTED, "logs": []}
