"""The logging configuration every Stella process applies (web, worker, beat, Flower).

One handler on stderr, JSON lines or text (`STELLA_LOG_FORMAT`), the request
id stamped on each record. The service's own loggers follow the chosen level;
other libraries' only from WARNING, or everything at debug level.
"""

from __future__ import annotations

import logging
import logging.config
from typing import Any, Literal

LogFormat = Literal["json", "text"]

# Our packages: their lines follow the level; other libraries' only at debug.
OWN_LOGGERS = ("app", "pki", "workers", "beat")
# Libraries whose info lines an operator wants (startup, access, job receipt).
_INFO_LIBRARIES = ("uvicorn", "uvicorn.error", "uvicorn.access", "celery", "flower")

_LEVELS = {
    "critical": logging.CRITICAL,
    "error": logging.ERROR,
    "warning": logging.WARNING,
    "info": logging.INFO,
    "debug": logging.DEBUG,
    "trace": 5,
}


def numeric_level(level: str | int) -> int:
    if isinstance(level, int):
        return level
    return _LEVELS[level.lower()]


def logging_config(level: str | int, log_format: LogFormat, service: str) -> dict[str, Any]:
    """A `logging.config.dictConfig` document for one process."""
    numeric = numeric_level(level)
    formatter = "app.logs.formatting.JsonFormatter"
    if log_format == "text":
        formatter = "app.logs.formatting.TextFormatter"
    loggers: dict[str, Any] = {
        name: {"level": numeric, "handlers": [], "propagate": True}
        for name in (*OWN_LOGGERS, *_INFO_LIBRARIES)
    }
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"request_id": {"()": "app.logs.formatting.RequestIdFilter"}},
        "formatters": {"stella": {"()": formatter, "service": service}},
        "handlers": {
            "stderr": {
                "class": "logging.StreamHandler",
                "stream": "ext://sys.stderr",
                "formatter": "stella",
                "filters": ["request_id"],
            }
        },
        "loggers": loggers,
        "root": {
            "handlers": ["stderr"],
            "level": numeric if numeric <= logging.DEBUG else max(numeric, logging.WARNING),
        },
    }


def configure(level: str | int, log_format: LogFormat, service: str) -> None:
    logging.config.dictConfig(logging_config(level, log_format, service))
    # Python warnings (a library's, at start) become log lines like any other.
    logging.captureWarnings(True)
