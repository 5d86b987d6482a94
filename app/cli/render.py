"""How the operator commands show things: rich tables for people, plain JSON for scripts.

Every string that comes from the server (names, labels, log lines) is printed as
`rich.text.Text`, never as markup, and with control characters escaped: an agent
must not be able to style or drive the operator's terminal.
"""

from __future__ import annotations

import json
import os
import re
import sys
from typing import Any

import typer
from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

from app.cli.client import ApiError

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
STATUS_STYLES = {
    "online": "green",
    "succeeded": "green",
    "degraded": "yellow",
    "running": "cyan",
    "assigned": "cyan",
    "pending": "blue",
    "offline": "red",
    "failed": "red",
    "timed_out": "red",
    "unknown": "yellow",
    "cancelled": "magenta",
}


def console(*, stderr: bool = False) -> Console:
    """A console; piped output gets a wide page so that ids never wrap."""
    stream = sys.stderr if stderr else sys.stdout
    width = None if stream.isatty() else int(os.environ.get("COLUMNS", "200"))
    return Console(stderr=stderr, width=width, highlight=False)


def clean(value: object) -> str:
    """`value` as text with control characters escaped (a newline stays in log lines only)."""
    text = "" if value is None else str(value)
    return _CONTROL.sub(lambda match: f"\\x{ord(match.group()):02x}", text)


def text(value: object, style: str = "") -> Text:
    return Text(clean(value), style=style)


def status(value: object) -> Text:
    return text(value, STATUS_STYLES.get(str(value), ""))


def print_json(document: Any) -> None:
    """One JSON document on stdout, no markup."""
    typer.echo(json.dumps(document, indent=2))


def answer(document: Any, view: RenderableType, *, json_output: bool) -> None:
    """The raw JSON for scripts, else the rich view of it."""
    if json_output:
        print_json(document)
    else:
        console().print(view)


def error(message: str) -> None:
    console(stderr=True).print(Text(f"error: {clean(message)}", style="red"))


def problem(exc: ApiError) -> None:
    """An error answer: its status, title and detail, and what to do about a few of them."""
    out = console(stderr=True)
    out.print(Text(f"error: {exc.status} {clean(exc.title)}", style="bold red"))
    if exc.detail:
        out.print(text(exc.detail))
    for item in exc.errors[1:]:
        where = ".".join(clean(part) for part in item.get("loc", []))
        out.print(text(f"{where}: {item.get('msg', '')}"))
    if exc.status == 401:
        out.print(
            "hint: check the admin token (STELLA_ADMIN_TOKEN, --admin-token-file or "
            "--admin-token): the server did not accept it"
        )
    elif exc.retry_after:
        out.print(f"hint: the server asks to retry after {clean(exc.retry_after)} s")


def _labels(labels: dict[str, Any] | None) -> str:
    return ", ".join(f"{key}={value}" for key, value in (labels or {}).items())


def _usage(usage: dict[str, Any] | None) -> str:
    if not usage:
        return ""
    return " ".join(f"{key} {value}%" for key, value in usage.items() if value is not None)


def agents_table(agents: list[dict[str, Any]]) -> Table:
    table = Table(title=f"{len(agents)} agent(s)", title_justify="left")
    table.add_column("ID", no_wrap=True)
    table.add_column("NAME")
    table.add_column("STATUS")
    table.add_column("CAPABILITIES")
    table.add_column("LABELS")
    table.add_column("LAST HEARTBEAT", no_wrap=True)
    table.add_column("USAGE")
    for agent in agents:
        table.add_row(
            text(agent["id"]),
            text(agent["name"]),
            status(agent["status"]),
            text(", ".join(agent.get("capabilities") or [])),
            text(_labels(agent.get("labels"))),
            text(agent.get("lastHeartbeat")),
            text(_usage(agent.get("resourceUsage"))),
        )
    return table


def _fields(rows: list[tuple[str, RenderableType]]) -> Table:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column()
    for name, value in rows:
        grid.add_row(name, value)
    return grid


def agent_detail(agent: dict[str, Any]) -> Table:
    certificate = agent.get("certificate") or {}
    return _fields(
        [
            ("id", text(agent["id"])),
            ("name", text(agent["name"])),
            ("version", text(agent.get("version"))),
            ("status", status(agent["status"])),
            ("reported status", text(agent.get("reportedStatus"))),
            ("capabilities", text(", ".join(agent.get("capabilities") or []))),
            ("labels", text(_labels(agent.get("labels")))),
            ("registered", text(agent.get("registeredAt"))),
            ("last heartbeat", text(agent.get("lastHeartbeat"))),
            ("usage", text(_usage(agent.get("resourceUsage")))),
            ("running tasks", text(agent.get("runningTasks"))),
            ("open tasks", text(agent.get("openTasks"))),
            ("certificate", text(f"serial {certificate.get('serial')}")),
            ("cert expires", text(certificate.get("expiresAt"))),
        ]
    )


def progress_text(task: dict[str, Any]) -> str:
    progress = task.get("progress")
    shown = "" if progress is None else f"{progress}%"
    message = task.get("progressMessage")
    return f"{shown} {message}".strip() if message else shown


def log_line(task_id: str | None, line: dict[str, Any]) -> Text:
    """One log line: `[task] time level message`."""
    out = Text()
    if task_id is not None:
        out.append(f"{task_id[:8]} ", style="dim")
    out.append(f"{clean(line.get('timestamp'))} ", style="dim")
    level = clean(line.get("level", "info"))
    out.append(f"{level:<7} ", style={"error": "red", "warning": "yellow"}.get(level, ""))
    out.append(clean(line.get("message")))
    return out


def _json_block(value: Any) -> Text:
    return text(json.dumps(value, indent=2))


def task_detail(task: dict[str, Any]) -> Group:
    fields = _fields(
        [
            ("task", text(task["taskId"])),
            ("type", text(task.get("taskType"))),
            ("agent", text(task.get("agentId"))),
            ("dispatch", text(task.get("dispatchId") or "")),
            ("status", status(task["status"])),
            ("priority", text(task.get("priority"))),
            ("timeout", text(f"{task.get('timeout')} s")),
            ("created", text(task.get("createdAt"))),
            ("assigned", text(task.get("assignedAt") or "")),
            ("started", text(task.get("startedAt") or "")),
            ("completed", text(task.get("completedAt") or "")),
            ("progress", text(progress_text(task))),
            ("error", text(task.get("error") or "", "red")),
        ]
    )
    parts: list[RenderableType] = [fields, Text("payload", style="bold")]
    parts.append(_json_block(task.get("payload")))
    if task.get("result") is not None:
        parts += [Text("result", style="bold"), _json_block(task["result"])]
    logs = task.get("logs") or []
    parts.append(Text(f"logs ({len(logs)})", style="bold"))
    parts += [log_line(None, line) for line in logs]
    return Group(*parts)


def tasks_table(tasks: list[dict[str, Any]]) -> Table:
    table = Table(title=f"{len(tasks)} task(s)", title_justify="left")
    table.add_column("TASK", no_wrap=True)
    table.add_column("AGENT", no_wrap=True)
    table.add_column("STATUS")
    table.add_column("PROGRESS")
    table.add_column("ERROR")
    for task in tasks:
        table.add_row(
            text(task["taskId"]),
            text(task["agentId"]),
            status(task["status"]),
            text(progress_text(task)),
            text(task.get("error") or "", "red"),
        )
    return table


def audit_table(events: list[dict[str, Any]]) -> Table:
    table = Table(title=f"{len(events)} event(s)", title_justify="left")
    table.add_column("AT", no_wrap=True)
    table.add_column("ACTION", no_wrap=True)
    table.add_column("ACTOR")
    table.add_column("AGENT", no_wrap=True)
    table.add_column("SOURCE")
    table.add_column("COUNT", justify="right")
    table.add_column("DETAIL")
    for event in events:
        table.add_row(
            text(event.get("at")),
            text(event.get("action")),
            text(event.get("actor")),
            text(event.get("agentId") or ""),
            text(event.get("source") or ""),
            text(event.get("count")),
            text(json.dumps(event.get("detail") or {}, separators=(",", ":"))),
        )
    return table


def guard_detail(state: dict[str, Any]) -> Table:
    engaged = bool(state.get("engaged"))
    engagements = state.get("engagements") or {}
    return _fields(
        [
            (
                "engaged",
                text("yes: no agent is marked offline", "yellow") if engaged else text("no"),
            ),
            ("reason", text(state.get("reason") or "")),
            ("since", text(state.get("since") or "")),
            ("until", text(state.get("until") or "")),
            ("agents held", text(state.get("agentsHeld"))),
            ("silent when engaged", text(state.get("silentWhenEngaged") or "")),
            ("percent", text(state.get("percent") or "off")),
            ("grace", text(f"{state.get('graceSeconds')} s")),
            (
                "engagements",
                text(", ".join(f"{reason} {count}" for reason, count in engagements.items())),
            ),
        ]
    )


def forecast_view(answer: dict[str, Any]) -> Group:
    at_risk = answer.get("atRisk") or 0
    summary = _fields(
        [
            ("within", text(f"{answer.get('hours')} h of {answer.get('asOf')}")),
            ("expiring", text(answer.get("expiring"))),
            ("at risk", text(at_risk, "red" if at_risk else "green")),
            ("expired", text(answer.get("expired"))),
            ("recoverable", text(answer.get("recoverable"))),
        ]
    )
    table = Table(title=f"{at_risk} agent(s) at risk", title_justify="left")
    table.add_column("AGENT", no_wrap=True)
    table.add_column("NAME")
    table.add_column("STATUS")
    table.add_column("LAST HEARTBEAT", no_wrap=True)
    table.add_column("CERT EXPIRES", no_wrap=True)
    table.add_column("REASON")
    for agent in answer.get("agents") or []:
        table.add_row(
            text(agent.get("agentId")),
            text(agent.get("name")),
            status(agent.get("status")),
            text(agent.get("lastHeartbeat") or ""),
            text(agent.get("certExpiresAt")),
            text(agent.get("reason"), "red"),
        )
    return Group(summary, table)
