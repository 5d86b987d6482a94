"""uvicorn options that come from Stella's settings."""

from __future__ import annotations

from typing import Any

from app.settings import Settings


def websocket_options(settings: Settings) -> dict[str, Any]:
    """Keepalive pings for task streams, and the largest message an agent may send."""
    return {
        "ws_max_size": settings.stream_max_message_bytes,
        "ws_ping_interval": settings.stream_ping_interval,
        "ws_ping_timeout": settings.stream_ping_interval,
    }
