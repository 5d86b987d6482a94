"""uvicorn options that come from Stella's settings."""

from __future__ import annotations

from typing import Any

from app.logs.setup import LogFormat, logging_config
from app.settings import Settings


def websocket_options(settings: Settings) -> dict[str, Any]:
    """Keepalive pings for task streams, the largest message an agent may send, no compression.

    permessage-deflate is declined: its zlib contexts cost an idle stream
    about 40 KB (measured: bench/scenarios/streams.py), more than the rest
    of the stream, for messages that are small JSON. Agents that offer it
    (the `websockets` client does by default) simply go without.
    """
    return {
        "ws_max_size": settings.stream_max_message_bytes,
        "ws_ping_interval": settings.stream_ping_interval,
        "ws_ping_timeout": settings.stream_ping_interval,
        "ws_per_message_deflate": False,
    }


def log_config(level: str, log_format: LogFormat) -> dict[str, Any]:
    """The web process's logging (app/logs/setup.py), as uvicorn applies it in each worker.

    uvicorn configures only its own loggers: without this every line of
    ours would go nowhere, bar warnings through logging's unformatted last
    resort.
    """
    return logging_config(level, log_format, service="web")
