"""The ceilings: what the same server settings serve with no Stella work at all.

Each scenario's goal is a ratio against its ceiling, measured in the same
run, so that it holds on a noisy machine. A ceiling is a bare FastAPI app
that parses the same body as the real endpoint (the same Pydantic models)
and answers a fixed body: no authentication, no database, no Redis.

    python -m bench.ceilings heartbeat --port 9000 --workers 2

serves it with `app.server.tls.uvicorn_config`, exactly as `stella serve
--tls` does (mTLS, uvicorn workers, WebSocket options).
"""

from __future__ import annotations

import argparse
import uuid
from typing import Annotated

import uvicorn
from fastapi import FastAPI, Path, Response, WebSocket
from uvicorn.supervisors import Multiprocess

from app.agents.schemas import AgentRegister, Heartbeat
from app.server.options import websocket_options
from app.server.tls import uvicorn_config
from app.settings import get_settings
from app.tasks.schemas import TaskCreate
from pki import load_or_create_pki

FIXED_REGISTRATION: dict[str, object] = {
    "agentId": "00000000-0000-0000-0000-000000000000",
    "token": "x" * 400,
    "config": {"heartbeatInterval": 30, "taskPollInterval": 5, "logLevel": "info"},
    "certificate": {"cert": "x" * 700, "ca": "x" * 700, "expiresAt": "2030-01-01T00:00:00Z"},
}
FIXED_TASK: dict[str, object] = {
    "tasks": [
        {
            "taskId": "00000000-0000-0000-0000-000000000000",
            "agentId": "00000000-0000-0000-0000-000000000000",
            "status": "pending",
        }
    ]
}


def heartbeat_app() -> FastAPI:
    """Stella's hot endpoints with the body parsed and a fixed answer.

    Heartbeat (no tasks), register (a fixed 201), task creation (a fixed
    201), the task stream (accepts, then waits), and /bench/echo, a
    WebSocket that sends every text message straight back.
    """
    app = FastAPI()

    @app.get("/ready")
    async def ready() -> dict[str, bool]:
        return {"ready": True}

    @app.post("/api/v1/agents/{id}/heartbeat")
    async def heartbeat(
        agent_id: Annotated[uuid.UUID, Path(alias="id")], body: Heartbeat
    ) -> Response:
        # Ready-made bytes, as Stella's own answer of most heartbeats: the
        # ceiling must not pay a serialization that Stella does not.
        return Response(b'{"tasks":[]}', media_type="application/json")

    @app.post("/api/v1/agents/register", status_code=201)
    async def register(body: AgentRegister) -> dict[str, object]:
        return FIXED_REGISTRATION

    @app.post("/api/v1/tasks", status_code=201)
    async def create_task(body: TaskCreate) -> dict[str, object]:
        return FIXED_TASK

    @app.websocket("/bench/echo")
    async def echo(websocket: WebSocket) -> None:
        # Every text message straight back: one message each way, nothing else.
        await websocket.accept()
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            if message.get("text") is not None:
                await websocket.send_text(message["text"])

    @app.websocket("/api/v1/agents/{id}/task-stream")
    async def stream(websocket: WebSocket, id: str) -> None:
        # A plain FastAPI WebSocket: accept, then wait for the client to go.
        await websocket.accept()
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return

    return app


APPS = {"heartbeat": "bench.ceilings:heartbeat_app"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("app", choices=sorted(APPS))
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    settings = get_settings()
    ca = load_or_create_pki(settings.resolved_pki_dir)
    server_cert, server_key = ca.server_certificate_files(settings.server_names)
    config = uvicorn_config(
        APPS[args.app],
        factory=True,
        host="127.0.0.1",
        port=args.port,
        tls=True,
        ca_cert_file=ca.files.ca_cert,
        server_cert_file=server_cert,
        server_key_file=server_key,
        workers=args.workers,
        log_level="warning",
        timeout_keep_alive=settings.keep_alive_timeout,
        **websocket_options(settings),
    )
    if args.workers == 1:
        uvicorn.Server(config).run()
    else:
        Multiprocess(config, sockets=[config.bind_socket()]).run()


if __name__ == "__main__":
    main()
