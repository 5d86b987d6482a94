"""Log lines: JSON objects (for collectors) or text (for a developer's terminal).

Both carry the same facts: time, level, logger, message, the request id, and
whatever a call passed in `extra` (task and agent ids, counts). Both redact
(see `redaction`).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from typing import Any

from app.logs import context
from app.logs.redaction import redact

# What every LogRecord has; anything else on a record came from `extra`.
_STANDARD = frozenset(
    logging.LogRecord("", 0, "", 0, "", None, None).__dict__.keys()
    | {"message", "asctime", "request_id", "rid", "color_message", "taskName"}
)


class RequestIdFilter(logging.Filter):
    """Stamps each record with the request id of the context that logged it.

    A record may name another (`extra={"request_id": ...}`): a task delivered
    on a stream logs the id of the dispatch that created it.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = context.current()
        return True


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    fields = {key: value for key, value in record.__dict__.items() if key not in _STANDARD}
    if record.name == "uvicorn.access" and isinstance(record.args, tuple) and len(record.args) == 5:
        client, method, path, _version, status = record.args
        fields |= {"client": client, "method": method, "path": path, "status": status}
    return fields


def _timestamp(record: logging.LogRecord) -> str:
    moment = dt.datetime.fromtimestamp(record.created, tz=dt.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, request_id, service, pid, extras."""

    def __init__(self, service: str = "stella") -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": redact(record.getMessage()),
            "service": self.service,
            "pid": record.process,
        }
        if (request_id := getattr(record, "request_id", None)) is not None:
            line["request_id"] = request_id
        line |= _fields(record)
        if record.exc_info:
            line["exc"] = redact(self.formatException(record.exc_info))
        elif record.exc_text:
            line["exc"] = redact(record.exc_text)
        return redact(json.dumps(line, default=str, ensure_ascii=False))


class TextFormatter(logging.Formatter):
    """`time LEVEL logger [request id] message key=value ...`, for a terminal."""

    def __init__(self, service: str = "stella") -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s%(rid)s: %(message)s")
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        request_id = getattr(record, "request_id", None)
        record.rid = f" [{request_id}]" if request_id else ""
        text = super().format(record)
        extras = " ".join(
            f"{key}={value}"
            for key, value in _fields(record).items()
            if record.name != "uvicorn.access"
        )
        return redact(f"{text} {extras}" if extras else text)
