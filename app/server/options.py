"""uvicorn options that come from Stella's settings."""

from __future__ import annotations

import copy
import logging
from typing import Any

from uvicorn.config import LOG_LEVELS, LOGGING_CONFIG

from app.settings import Settings

# Our packages: their lines follow --log-level; other libraries' only at debug.
_OWN_LOGGERS = ("app", "pki", "workers", "beat")


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


def log_config(level: str) -> dict[str, Any]:
    """uvicorn's logging, with the service's own loggers at `level` too.

    uvicorn configures only its own loggers: without this every line of
    ours goes nowhere, bar warnings through logging's unformatted last
    resort. Other libraries log from WARNING, or everything at debug level,
    as a Celery worker does.
    """
    numeric = LOG_LEVELS[level.lower()]
    config: dict[str, Any] = copy.deepcopy(LOGGING_CONFIG)
    config["loggers"] |= {name: {"level": numeric} for name in _OWN_LOGGERS}
    config["root"] = {
        "handlers": ["default"],
        "level": numeric if numeric <= logging.DEBUG else max(numeric, logging.WARNING),
    }
    return config
