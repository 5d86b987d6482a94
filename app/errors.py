"""Errors, rendered in one place as RFC 9457 `application/problem+json`.

StellaError                 status + title; `detail` is safe to show the caller
├── InvalidInput            422  the body parsed but makes no sense
├── Unauthorized            401  missing or bad credentials
├── Forbidden               403  authenticated, but not for this
├── NotFound                404
├── Conflict                409
├── TooManyRequests         429  (with Retry-After)
├── ServiceUnavailable      503  (with Retry-After)
└── CredentialsUnreadable   500  stored credentials this server's key does not open

Validation errors (422), unknown routes (404/405) and an unreachable
database (503) get the same shape. Nothing else is caught: an unexpected
exception is a bug and must surface as one.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, ClassVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DataError, DBAPIError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"


class StellaError(Exception):
    status: ClassVar[int] = 500
    title: ClassVar[str] = "Internal Server Error"

    def __init__(self, detail: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.headers = headers or {}


class InvalidInput(StellaError):
    status = 422
    title = "Unprocessable Content"


class Unauthorized(StellaError):
    status = 401
    title = "Unauthorized"

    def __init__(self, detail: str) -> None:
        super().__init__(detail, headers={"WWW-Authenticate": "Bearer"})


class Forbidden(StellaError):
    status = 403
    title = "Forbidden"


class NotFound(StellaError):
    status = 404
    title = "Not Found"


class Conflict(StellaError):
    status = 409
    title = "Conflict"


class TooManyRequests(StellaError):
    status = 429
    title = "Too Many Requests"

    def __init__(self, detail: str, *, retry_after: int) -> None:
        super().__init__(detail, headers={"Retry-After": str(retry_after)})


class ServiceUnavailable(StellaError):
    status = 503
    title = "Service Unavailable"

    def __init__(self, detail: str, *, retry_after: int = 5) -> None:
        super().__init__(detail, headers={"Retry-After": str(retry_after)})


class CredentialsUnreadable(StellaError):
    """A misconfiguration (another credentials key), never the caller's fault."""

    status = 500
    title = "Internal Server Error"


def problem(
    status: int,
    title: str,
    detail: str,
    *,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> JSONResponse:
    """A problem+json response."""
    body = {"type": "about:blank", "status": status, "title": title, "detail": detail, **extra}
    return JSONResponse(body, status_code=status, headers=headers, media_type=PROBLEM_JSON)


def _validation_errors(errors: Sequence[Any]) -> list[dict[str, Any]]:
    # Never echo the input back: a rejected body may hold credentials.
    return [
        {"loc": list(error.get("loc", ())), "msg": error.get("msg", ""), "type": error.get("type")}
        for error in errors
    ]


async def _stella_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StellaError)
    return problem(exc.status, exc.title, exc.detail, headers=exc.headers)


async def _validation_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = _validation_errors(exc.errors())
    first = errors[0] if errors else {"loc": [], "msg": "invalid request"}
    where = ".".join(str(part) for part in first["loc"])
    return problem(422, "Unprocessable Content", f"{where}: {first['msg']}", errors=errors)


async def _http_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 400 and exc.__cause__ is not None:
        # FastAPI could not parse the body (bytes in no JSON encoding, or nested
        # too deeply for the decoder): a malformed body, like any other, is a 422.
        nested = isinstance(exc.__cause__, RecursionError)
        what = "JSON nested too deeply" if nested else "not valid JSON"
        return problem(422, "Unprocessable Content", f"body: {what}")
    title = {
        400: "Bad Request",
        404: "Not Found",
        405: "Method Not Allowed",
        413: "Content Too Large",
    }.get(exc.status_code, "Error")
    detail = exc.detail if isinstance(exc.detail, str) else title
    return problem(exc.status_code, title, detail, headers=dict(exc.headers or {}))


async def _database_unavailable(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, DBAPIError)
    if isinstance(exc, DataError):
        # A value the database cannot store (a NUL character in text or JSON
        # on PostgreSQL): the request's fault, not the server's.
        return problem(422, "Unprocessable Content", "a value in the request cannot be stored")
    if not (isinstance(exc, OperationalError) or exc.connection_invalidated):
        raise exc
    log.warning("database unavailable: %s", type(exc.orig).__name__)
    return problem(
        503,
        "Service Unavailable",
        "the database is unavailable; retry shortly",
        headers={"Retry-After": "5"},
    )


def install_error_handlers(app: FastAPI) -> None:
    """Render every error the service produces as problem+json."""
    app.add_exception_handler(StellaError, _stella_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(DBAPIError, _database_unavailable)
