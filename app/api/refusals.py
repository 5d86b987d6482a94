"""Refused calls (401, 403) are counted for the audit trail where they are rendered.

Every refusal of the HTTP API, whichever check decided it (operator token,
registration token, agent JWT and certificate, a deleted agent, another
agent's records), ends as an `Unauthorized` or `Forbidden` raised inside a
route; the heartbeat fast lane hands its refusals to the route too. So one
handler sees them all, on the refusal path only: a call that passes pays
nothing.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from app.audit.refusals import RefusalRecorder, refusal_of
from app.errors import Forbidden, StellaError, Unauthorized, problem


def install_refusal_audit(app: FastAPI, recorder: RefusalRecorder) -> None:
    """Count every 401 and 403 in `recorder`, then render it as problem+json."""

    async def refused(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StellaError)
        recorder.refused(refusal_of(request.scope, reason=exc.detail, status=exc.status))
        return problem(exc.status, exc.title, exc.detail, headers=exc.headers)

    app.add_exception_handler(Unauthorized, refused)
    app.add_exception_handler(Forbidden, refused)
