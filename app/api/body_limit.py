"""A request-body size limit, enforced while the body streams in (413)."""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import problem


class _TooLarge(HTTPException):
    """Raised by `receive` once a streamed body passes the limit.

    An HTTPException: FastAPI re-raises those from its body reading as they
    are (any other error there becomes a 400), and the error handlers answer 413.
    """

    def __init__(self, max_bytes: int) -> None:
        super().__init__(
            413, f"request body exceeds {max_bytes} bytes", headers={"Connection": "close"}
        )


class BodyLimitMiddleware:
    """Refuse bodies over `max_bytes`, by Content-Length or by counting chunks."""

    def __init__(self, app: ASGIApp, *, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length" and (not value.isdigit() or int(value) > self.max_bytes):
                await self._refuse(scope, receive, send)
                return
        received = 0
        response_started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _TooLarge(self.max_bytes)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal response_started
            response_started = response_started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _TooLarge:
            if response_started:
                raise
            await self._refuse(scope, receive, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = problem(413, "Content Too Large", f"request body exceeds {self.max_bytes} bytes")
        response.headers["Connection"] = "close"
        await response(scope, receive, send)
