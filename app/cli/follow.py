"""Following dispatched tasks until each ends: status, progress and new log lines as they come.

It polls `GET /api/v1/tasks/{id}` (and, for a selector, `GET /api/v1/dispatches/{id}` until
the dispatch is expanded). On a terminal the tasks are live progress bars with log lines
printed above them; piped, each change of status or progress is one plain line.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from rich.progress import BarColumn, Progress, TaskID, TaskProgressColumn, TextColumn
from rich.text import Text

from app.cli import render
from app.cli.client import OperatorClient

# Where following stops: the final states, and `unknown` (its agent was lost;
# the real outcome comes when the agent returns, which may take days).
FINAL_STATUSES = frozenset({"succeeded", "failed", "cancelled", "timed_out", "unknown"})


@dataclass
class _Followed:
    task_id: str
    bar: TaskID
    view: dict[str, Any] | None = None
    logs_shown: int = 0
    shown: tuple[Any, ...] = ()

    @property
    def done(self) -> bool:
        return self.view is not None and self.view["status"] in FINAL_STATUSES


def follow(
    api: OperatorClient,
    *,
    task_ids: list[str],
    dispatch_id: str | None = None,
    poll_interval: float = 1.0,
    show: bool = True,
) -> list[dict[str, Any]]:
    """Poll until every task (and the dispatch's expansion) has ended; the final task views."""
    out = render.console()
    live = show and out.is_terminal
    progress = Progress(
        TextColumn("{task.description}"),
        TextColumn("{task.fields[status]}", markup=False),
        BarColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[message]}", markup=False),
        console=out,
        disable=not live,
    )
    followed: dict[str, _Followed] = {}

    def track(task_id: str) -> None:
        if task_id not in followed:
            bar = progress.add_task(task_id[:8], total=100, status="", message="")
            followed[task_id] = _Followed(task_id, bar)

    for task_id in task_ids:
        track(task_id)
    expanding = dispatch_id is not None
    dispatch_status = None
    with progress:
        while True:
            if expanding:
                dispatch = api.get(f"/api/v1/dispatches/{dispatch_id}")
                for ref in dispatch["tasks"]:
                    track(ref["taskId"])
                expanding = dispatch["status"] != "done"
                if show and not live and dispatch["status"] != dispatch_status:
                    out.print(
                        render.text(
                            f"dispatch {dispatch_id} {dispatch['status']}: "
                            f"{len(dispatch['tasks'])} task(s)"
                        )
                    )
                dispatch_status = dispatch["status"]
            for item in followed.values():
                if not item.done:
                    item.view = api.get(f"/api/v1/tasks/{item.task_id}")
                    if show:
                        _report(item, progress, out_live=live)
            if not expanding and all(item.done for item in followed.values()):
                return [item.view for item in followed.values() if item.view is not None]
            time.sleep(poll_interval)


def _report(item: _Followed, progress: Progress, *, out_live: bool) -> None:
    """Print the task's new log lines, then its state when it changed."""
    assert item.view is not None
    view = item.view
    logs = view.get("logs") or []
    for line in logs[item.logs_shown :]:
        progress.console.print(render.log_line(item.task_id, line))
    item.logs_shown = max(item.logs_shown, len(logs))
    state = (view["status"], view.get("progress"), view.get("progressMessage"))
    if out_live:
        done = 100 if view["status"] == "succeeded" else (view.get("progress") or 0)
        progress.update(
            item.bar,
            completed=done,
            status=render.clean(view["status"]),
            message=render.clean(view.get("error") or view.get("progressMessage") or ""),
        )
    elif state != item.shown:
        line = Text(f"{item.task_id} ", style="dim")
        line.append_text(render.status(view["status"]))
        shown = render.progress_text(view)
        if shown:
            line.append(f" {render.clean(shown)}")
        if view.get("error"):
            line.append(f" {render.clean(view['error'])}", style="red")
        progress.console.print(line)
    item.shown = state
