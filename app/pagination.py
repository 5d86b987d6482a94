"""Opaque keyset cursors for list endpoints (`?limit=&cursor=`).

The next page's cursor travels in the `Link: <...>; rel="next"` header, so
that list bodies keep the plain-array shape the seed gives them.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from app.errors import InvalidInput

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000


def encode_cursor(*values: Any) -> str:
    raw = json.dumps(list(values), separators=(",", ":"), default=str).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def decode_cursor(cursor: str, arity: int) -> list[str]:
    """The `arity` values `encode_cursor` put in `cursor`, as strings (422 for anything else)."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        values = json.loads(raw)
    # RecursionError: a forged cursor of deeply nested arrays.
    except (binascii.Error, ValueError, RecursionError) as exc:
        raise InvalidInput("cursor is not valid") from exc
    # We encode strings and integers only (names, timestamps, ids): anything else is forged.
    if (
        not isinstance(values, list)
        or len(values) != arity
        or not all(type(value) in (str, int) for value in values)  # not bool, a subclass of int
    ):
        raise InvalidInput("cursor is not valid")
    return [str(value) for value in values]


def set_next_link(request: Request, response: Response, next_cursor: str | None) -> None:
    """Point `Link: <…>; rel="next"` at the next page, when there is one."""
    if next_cursor is not None:
        next_url = request.url.include_query_params(cursor=next_cursor)
        response.headers["Link"] = f'<{next_url}>; rel="next"'
