"""Every HTTP request and task stream runs under a request id, answered in `X-Request-ID`.

Outermost in the app (`app.main.StellaApp`), so the heartbeat fast lane, the
access log line uvicorn writes as the answer starts, and everything the
handlers log carry the id. A caller's own id is kept when it is well formed,
so that an orchestrator's id is found in our logs.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.logs import context

_HEADER = context.REQUEST_ID_HEADER.lower().encode()


class RequestIdMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        given = None
        for name, value in scope["headers"]:
            if name == _HEADER:
                given = context.accepted(value.decode("latin-1"))
                break
        request_id = given or context.new_request_id()
        header = (_HEADER, request_id.encode())

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), header]
            await send(message)

        with context.bound(request_id):
            await self.app(scope, receive, send_with_id if scope["type"] == "http" else send)
