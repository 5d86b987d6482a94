"""app/logs/formatting.py and redaction.py: the shape of a line, and what never is in one."""

from __future__ import annotations

import json
import logging
import sys

from app.logs import context
from app.logs.formatting import JsonFormatter, RequestIdFilter, TextFormatter
from app.logs.redaction import redact

JWT = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJhZ2VudCJ9.c2lnbmF0dXJlLWJ5dGVz"
PEM = "-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMGByqGSM49\n-----END PRIVATE KEY-----"


def record(message: str, *args: object, **extra: object) -> logging.LogRecord:
    made = logging.LogRecord("app.tasks.service", logging.INFO, __file__, 1, message, args, None)
    for key, value in extra.items():
        setattr(made, key, value)
    RequestIdFilter().filter(made)
    return made


class TestJsonLines:
    def test_a_line_is_one_json_object_with_the_request_id_and_extras(self) -> None:
        with context.bound("req-1"):
            line = JsonFormatter(service="web").format(
                record("task %s delivered", "t1", task_id="t1", via="stream")
            )
        parsed = json.loads(line)
        assert "\n" not in line
        assert parsed["msg"] == "task t1 delivered"
        assert parsed["level"] == "info"
        assert parsed["logger"] == "app.tasks.service"
        assert parsed["service"] == "web"
        assert parsed["request_id"] == "req-1"
        assert parsed["task_id"] == "t1"
        assert parsed["via"] == "stream"
        assert parsed["ts"].endswith("Z")

    def test_an_explicit_request_id_wins_over_the_context(self) -> None:
        with context.bound("stream-connection"):
            parsed = json.loads(JsonFormatter().format(record("x", request_id="dispatch-7")))
        assert parsed["request_id"] == "dispatch-7"

    def test_no_request_id_outside_a_request(self) -> None:
        assert "request_id" not in json.loads(JsonFormatter().format(record("sweep")))

    def test_an_exception_is_a_field_of_the_same_line(self) -> None:
        try:
            raise ValueError("boom")
        except ValueError:
            made = record("failed")
            made.exc_info = sys.exc_info()
        line = JsonFormatter().format(made)
        assert "\n" not in line
        assert "ValueError: boom" in json.loads(line)["exc"]

    def test_access_lines_have_their_parts_as_fields(self) -> None:
        made = logging.LogRecord(
            "uvicorn.access",
            logging.INFO,
            __file__,
            1,
            '%s - "%s %s HTTP/%s" %d',
            ("10.0.0.1:5000", "POST", "/api/v1/tasks", "1.1", 202),
            None,
        )
        parsed = json.loads(JsonFormatter().format(made))
        assert parsed["method"] == "POST"
        assert parsed["path"] == "/api/v1/tasks"
        assert parsed["status"] == 202

    def test_text_lines_for_a_terminal(self) -> None:
        with context.bound("req-2"):
            line = TextFormatter().format(record("task delivered", task_id="t1"))
        assert "INFO app.tasks.service [req-2]: task delivered task_id=t1" in line


class TestRedaction:
    def test_secret_shapes_are_redacted_in_message_extras_and_exceptions(self) -> None:
        message = f"Authorization: Bearer abc.def {JWT} srt_AbCdEfGhIjKlMnOp {PEM}"
        line = JsonFormatter().format(record(message, header=f"Bearer {JWT}"))
        for secret in (JWT, "abc.def", "srt_AbCdEfGhIjKlMnOp", "MIGHAgEAMBMGByqGSM49"):
            assert secret not in line
        parsed = json.loads(line)
        assert "[redacted jwt]" in parsed["msg"]
        assert "[redacted PRIVATE KEY]" in parsed["msg"]
        assert "Bearer [redacted]" in parsed["msg"]

    def test_ordinary_lines_are_untouched(self) -> None:
        assert redact("marked 3 agents offline") == "marked 3 agents offline"
        assert redact("GET /api/v1/agents/eyJ 200") == "GET /api/v1/agents/eyJ 200"


class TestRequestIds:
    def test_a_callers_id_is_kept_only_when_safe_to_log_and_echo(self) -> None:
        assert context.accepted("deploy-4711.abc") == "deploy-4711.abc"
        for bad in ("", "a b", 'a"b', "a\nb", "x" * 65, "ü"):
            assert context.accepted(bad) is None
