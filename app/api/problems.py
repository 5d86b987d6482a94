"""OpenAPI documentation of the problem+json answers, shared by the routers."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel


class Problem(BaseModel):
    """RFC 9457 problem details."""

    type: str = "about:blank"
    status: int
    title: str
    detail: str


_DESCRIPTIONS = {
    401: "Missing, invalid or expired credentials",
    403: "Agent not authorized for this operation",
    404: "Not found",
    409: "Conflict with the current state",
    413: "Request body too large",
    422: "Malformed request",
    429: "Too many failed attempts from this address; see Retry-After",
    503: "Unavailable (agent offline, or the database is down); see Retry-After",
}


def problems(*codes: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` entries for these status codes."""
    return {
        code: {
            # `model` registers the schema; the media type the answers carry names it too,
            # so that a client (or a fuzzer) can validate problem bodies.
            "model": Problem,
            "description": _DESCRIPTIONS[code],
            "content": {
                "application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}
            },
        }
        for code in codes
    }
