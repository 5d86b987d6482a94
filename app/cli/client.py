"""The operator API over the wire: base URL, CA, admin token (httpx; nothing of the server).

OperatorError           what a command reports and exits on
├── ApiError            the server answered an error (problem+json: status, title, detail)
└── ConnectionFailed    no answer: name resolution, refused connection, TLS, timeout

Usage::

    with OperatorClient(Connection("https://host:8443", Path("ca.pem"), token)) as api:
        agents, more = api.fetch_list("/api/v1/agents", {"status": "online"}, all_pages=True)
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx


class OperatorError(Exception):
    pass


class ApiError(OperatorError):
    def __init__(
        self,
        status: int,
        title: str,
        detail: str,
        *,
        errors: list[dict[str, Any]] | None = None,
        retry_after: str | None = None,
    ) -> None:
        super().__init__(f"{status} {title}: {detail}")
        self.status = status
        self.title = title
        self.detail = detail
        self.errors = errors or []
        self.retry_after = retry_after


class ConnectionFailed(OperatorError):
    pass


@dataclass(frozen=True)
class Connection:
    server: str
    ca_file: Path | None
    # Kept out of the repr: a traceback or a debug print must not show it.
    admin_token: str = field(repr=False)

    @property
    def display_server(self) -> str:
        """The server URL without any user:password it may carry."""
        return str(httpx.URL(self.server).copy_with(username=None, password=None))


class OperatorClient:
    """One HTTP client for a command's calls; errors become `OperatorError`s."""

    def __init__(self, connection: Connection, *, timeout: float = 30.0) -> None:
        self.connection = connection
        try:
            verify: ssl.SSLContext | bool = (
                ssl.create_default_context(cafile=str(connection.ca_file))
                if connection.ca_file is not None
                else True
            )
        except (OSError, ssl.SSLError) as exc:
            raise ConnectionFailed(f"cannot load the CA file {connection.ca_file}: {exc}") from exc
        self._http = httpx.Client(
            base_url=connection.server.rstrip("/"),
            verify=verify,
            headers={"Authorization": f"Bearer {connection.admin_token}"},
            timeout=timeout,
            # Never carry the admin token to wherever a redirect points.
            follow_redirects=False,
        )

    def __enter__(self) -> OperatorClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def request(
        self,
        method: str,
        path: str,
        *,
        params: httpx.QueryParams | dict[str, Any] | None = None,
        json: Any = None,
    ) -> httpx.Response:
        try:
            response = self._http.request(method, path, params=params, json=json)
        except httpx.TransportError as exc:
            raise ConnectionFailed(
                f"cannot reach {self.connection.display_server}: {_reason(exc)}"
            ) from exc
        if response.is_error or response.is_redirect:
            raise _problem(response)
        return response

    def get(self, path: str, params: dict[str, Any] | None = None) -> Any:
        return self.request("GET", path, params=params).json()

    def post(self, path: str, json: Any = None) -> Any:
        return self.request("POST", path, json=json).json()

    def delete(self, path: str) -> Any:
        return self.request("DELETE", path).json()

    def fetch_list(
        self, path: str, params: dict[str, Any], *, all_pages: bool
    ) -> tuple[list[Any], bool]:
        """A list endpoint's items, following `Link: rel="next"` when `all_pages`;
        and whether more pages remain."""
        items: list[Any] = []
        query: httpx.QueryParams | dict[str, Any] = params
        while True:
            response = self.request("GET", path, params=query)
            items.extend(response.json())
            next_url = response.links.get("next", {}).get("url")
            if next_url is None:
                return items, False
            if not all_pages:
                return items, True
            # Only the next page's query is taken, asked of our own server: the token
            # never goes to a host an answer names.
            query = httpx.URL(next_url).params


def _reason(exc: httpx.TransportError) -> str:
    text = str(exc) or type(exc).__name__
    if isinstance(exc, httpx.TimeoutException):
        return f"timed out ({text})"
    if "CERTIFICATE_VERIFY_FAILED" in text or "SSL" in text:
        return f"TLS failed ({text}); check --ca / STELLA_CA_FILE"
    return text


def _problem(response: httpx.Response) -> ApiError:
    """An error answer as an ApiError: problem+json when it is one, else its status line."""
    title = response.reason_phrase or "Error"
    detail = ""
    errors: list[dict[str, Any]] = []
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        title = str(body.get("title") or title)
        detail = str(body.get("detail") or "")
        if isinstance(body.get("errors"), list):
            errors = [error for error in body["errors"] if isinstance(error, dict)]
    elif response.is_redirect:
        detail = "the server answered with a redirect; check --server"
    else:
        detail = response.text[:200]
    return ApiError(
        response.status_code,
        title,
        detail,
        errors=errors,
        retry_after=response.headers.get("Retry-After"),
    )
