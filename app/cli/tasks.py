"""`stella tasks dispatch|show|cancel`: tasks, over the operator API."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from agent.labels import parse_labels
from app.cli import render
from app.cli.follow import follow
from app.cli.options import (
    EXIT_TASK_FAILED,
    AdminTokenFileOpt,
    AdminTokenOpt,
    CaOpt,
    JsonOpt,
    ServerOpt,
    operator_api,
)

cli = typer.Typer(
    help="Tasks: dispatch, show, cancel (over the operator API).", no_args_is_help=True
)


def _json_object(value: str, what: str) -> dict[str, Any]:
    """`value` as a JSON object: inline, `@file`, or `@-` for stdin."""
    if value.startswith("@"):
        name = value[1:]
        try:
            value = sys.stdin.read() if name == "-" else Path(name).read_text()
        except OSError as exc:
            raise typer.BadParameter(
                f"cannot read {name}: {exc.strerror}", param_hint=what
            ) from exc
    try:
        parsed = json.loads(value)
    except ValueError as exc:
        # The position only: the text itself may be a secret.
        raise typer.BadParameter(f"not valid JSON ({exc})", param_hint=what) from None
    if not isinstance(parsed, dict):
        raise typer.BadParameter("must be a JSON object", param_hint=what)
    return parsed


def _credentials(pairs: list[str], file: Path | None) -> dict[str, Any] | None:
    """`--credentials-file` then `--credential k=v` pairs; never repeats a value in an error."""
    credentials: dict[str, Any] = {}
    if file is not None:
        credentials.update(_json_object(f"@{file}", "--credentials-file"))
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise typer.BadParameter(
                "expected key=value (not shown here)", param_hint="--credential"
            )
        credentials[key] = value
    return credentials or None


def _target(agent: str | None, capability: str | None, labels: list[str] | None) -> dict[str, Any]:
    if agent is not None:
        if capability is not None or labels:
            raise typer.BadParameter(
                "give either --agent or a selector (--capability, --label)", param_hint="--agent"
            )
        return {"agentId": agent}
    if capability is None and not labels:
        raise typer.BadParameter(
            "give --agent ID, or --capability and/or --label k=v", param_hint="--agent"
        )
    target: dict[str, Any] = {}
    if capability is not None:
        target["capability"] = capability
    if labels:
        try:
            target["labels"] = parse_labels(labels)
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="--label") from exc
    return target


@cli.command("dispatch")
def dispatch(
    task_type: Annotated[
        str, typer.Option("--type", help="The task type: docker.pull, compose.up, ...")
    ],
    payload: Annotated[
        str, typer.Option(help="The payload: a JSON object, @file, or @- for stdin.")
    ] = "{}",
    credential: Annotated[
        list[str] | None,
        typer.Option(help="A secret for the agent, key=value (repeat); never shown."),
    ] = None,
    credentials_file: Annotated[
        Path | None,
        typer.Option(
            exists=True,
            dir_okay=False,
            help="Secrets as a JSON object (kept out of process listings).",
            show_default=False,
        ),
    ] = None,
    timeout: Annotated[
        int | None,
        typer.Option(min=1, help="Seconds the agent has once it took the task (server: 300)."),
    ] = None,
    priority: Annotated[int, typer.Option(help="Larger goes first.")] = 0,
    agent: Annotated[
        str | None, typer.Option(help="Target one agent by id.", show_default=False)
    ] = None,
    capability: Annotated[
        str | None,
        typer.Option(help="Target every online agent with it.", show_default=False),
    ] = None,
    label: Annotated[
        list[str] | None, typer.Option(help="Selector label key=value (repeat).")
    ] = None,
    wait: Annotated[
        bool,
        typer.Option("--wait", help="Follow the task(s) to the end; exit 3 unless all succeed."),
    ] = False,
    poll_interval: Annotated[
        float, typer.Option(min=0.05, help="Seconds between polls under --wait.")
    ] = 1.0,
    server: ServerOpt = None,
    ca: CaOpt = None,
    admin_token: AdminTokenOpt = None,
    admin_token_file: AdminTokenFileOpt = None,
    json_output: JsonOpt = False,
) -> None:
    """Dispatch a task to one agent, or to every online agent a selector matches."""
    body: dict[str, Any] = {
        "taskType": task_type,
        "payload": _json_object(payload, "--payload"),
        "priority": priority,
        "target": _target(agent, capability, label),
    }
    secrets = _credentials(credential or [], credentials_file)
    if secrets is not None:
        body["credentials"] = secrets
    if timeout is not None:
        body["timeout"] = timeout
    with operator_api(server, ca, admin_token, admin_token_file) as api:
        answer = api.post("/api/v1/tasks", json=body)
        dispatch_id = answer.get("dispatchId")
        if not wait:
            if json_output:
                render.print_json(answer)
            elif dispatch_id is not None:
                render.console().print(
                    render.text(f"dispatch {dispatch_id} accepted ({answer.get('status')})")
                )
            else:
                render.console().print(render.tasks_table(answer["tasks"]))
            return
        try:
            views = follow(
                api,
                task_ids=[ref["taskId"] for ref in answer.get("tasks", [])],
                dispatch_id=dispatch_id,
                poll_interval=poll_interval,
                show=not json_output,
            )
        except KeyboardInterrupt:
            render.error("stopped following; the task(s) go on (stella tasks show ID)")
            raise typer.Exit(130) from None
        final = api.get(f"/api/v1/dispatches/{dispatch_id}") if dispatch_id else {}
    _finish(final | {"tasks": views}, json_output=json_output)


def _finish(document: dict[str, Any], *, json_output: bool) -> None:
    """Show the followed tasks' outcome; exit 3 unless every one succeeded."""
    views: list[dict[str, Any]] = document["tasks"]
    render.answer(document, render.tasks_table(views), json_output=json_output)
    unsuccessful = [view for view in views if view["status"] != "succeeded"]
    for view in unsuccessful:
        render.error(f"task {view['taskId']} ended {view['status']}: {view.get('error') or ''}")
    if not views:
        render.error("the dispatch created no task: no online agent matched it")
    if unsuccessful or not views:
        raise typer.Exit(EXIT_TASK_FAILED)


@cli.command("show")
def show(
    task_id: Annotated[str, typer.Argument(metavar="ID", help="The task's id.")],
    server: ServerOpt = None,
    ca: CaOpt = None,
    admin_token: AdminTokenOpt = None,
    admin_token_file: AdminTokenFileOpt = None,
    json_output: JsonOpt = False,
) -> None:
    """Show a task: status, times, progress, result and logs (never its credentials)."""
    with operator_api(server, ca, admin_token, admin_token_file) as api:
        task = api.get(f"/api/v1/tasks/{task_id}")
    render.answer(task, render.task_detail(task), json_output=json_output)


@cli.command("cancel")
def cancel(
    task_id: Annotated[str, typer.Argument(metavar="ID", help="The task's id.")],
    server: ServerOpt = None,
    ca: CaOpt = None,
    admin_token: AdminTokenOpt = None,
    admin_token_file: AdminTokenFileOpt = None,
    json_output: JsonOpt = False,
) -> None:
    """Cancel an unfinished task; its agent is told to stop it."""
    with operator_api(server, ca, admin_token, admin_token_file) as api:
        answer = api.post(f"/api/v1/tasks/{task_id}/cancel")
    render.answer(
        answer, render.text(f"task {answer['taskId']} {answer['status']}"), json_output=json_output
    )
