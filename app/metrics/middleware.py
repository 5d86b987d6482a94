"""Request latency of the HTTP API, labelled by route template (never the raw path)."""

from __future__ import annotations

import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.metrics.instruments import REQUEST_DURATION, UNMATCHED_ROUTE, method_label, status_class


class RequestMetricsMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500  # an exception that escapes is answered 500 further out
        started = time.perf_counter()

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            # The router put the matched route in the scope; an unknown path has none.
            route = scope.get("route")
            template = getattr(route, "path", None) or UNMATCHED_ROUTE
            REQUEST_DURATION.labels(
                template, method_label(scope["method"]), status_class(status)
            ).observe(time.perf_counter() - started)
