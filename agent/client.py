"""The agent's side of the wire: registration, REST calls and the task stream.

Every call after registration presents the agent's client certificate (from
the state directory) and its JWT. The server is verified against the pinned
CA file (`--ca`, kept as `server-ca.pem`), or the system's trust store when
none was given; never left unverified.

Usage::

    client = AgentClient(server=url, identity=identity, state=state)
    answer = await client.heartbeat({"status": "healthy"})
    async with client.stream() as stream:
        await stream.run(on_message)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from agent import __version__
from agent.state import Identity, StateDir

API = "/api/v1"
# Close codes of the task stream that no retry will fix.
CLOSE_UNAUTHORIZED = 4401
CLOSE_FORBIDDEN = 4403


# Seconds an idle connection to the server is kept (see `_http`).
KEEPALIVE_EXPIRY = 60.0


class AgentError(Exception):
    """Base of the client's errors."""


class CredentialsRefused(AgentError):
    """The server refused this agent's JWT or certificate (deleted?): retrying cannot help."""


class TaskGone(AgentError):
    """Completion refused for good (404, 409): the task was cancelled, timed out or is not ours."""


class ServerUnavailable(AgentError):
    """The call failed in a way worth retrying later (network, 5xx, 429)."""


def tls_context(
    server_ca: Path | None, cert: Path | None = None, key: Path | None = None
) -> ssl.SSLContext:
    """Verify the server against `server_ca` (else the system store); present `cert`."""
    context = ssl.create_default_context(cafile=str(server_ca) if server_ca else None)
    if cert is not None:
        context.load_cert_chain(str(cert), str(key) if key else None)
    return context


def _problem(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:200]
    if isinstance(body, dict):
        return str(body.get("detail") or body.get("title") or body)[:500]
    return str(body)[:500]


def _raise_for(response: httpx.Response, what: str) -> None:
    if response.is_success:
        return
    detail = f"{what}: {response.status_code} {_problem(response)}"
    if response.status_code in (401, 403):
        raise CredentialsRefused(detail)
    if response.status_code in (404, 409):
        raise TaskGone(detail)
    if response.status_code >= 500 or response.status_code == 429:
        raise ServerUnavailable(detail)
    raise AgentError(detail)


async def register(
    *, server: str, token: str, body: dict[str, Any], server_ca: Path | None
) -> dict[str, Any]:
    """`POST /agents/register` with the single-use token; no client certificate yet."""
    async with httpx.AsyncClient(
        base_url=server, verify=tls_context(server_ca), timeout=30
    ) as client:
        try:
            response = await client.post(
                f"{API}/agents/register",
                json={"version": __version__, **body},
                headers={"X-Agent-Token": token},
            )
        except httpx.HTTPError as exc:
            raise ServerUnavailable(f"registration: {exc!r}") from exc
    if response.status_code in (401, 409, 422):
        raise AgentError(f"registration refused: {response.status_code} {_problem(response)}")
    _raise_for(response, "registration")
    data: dict[str, Any] = response.json()
    return data


class AgentClient:
    """REST calls and the task stream of one registered agent."""

    def __init__(
        self, *, server: str, identity: Identity, state: StateDir, timeout: float = 30
    ) -> None:
        self.server = server.rstrip("/")
        self.identity = identity
        self.state = state
        self.timeout = timeout
        self._retired: list[httpx.AsyncClient] = []
        self._closers: set[asyncio.Task[None]] = set()
        self.ssl_context = self._context()
        self.http = self._http()

    def _context(self) -> ssl.SSLContext:
        server_ca = self.state.server_ca_file if self.state.server_ca_file.exists() else None
        return tls_context(server_ca, self.state.cert_file, self.state.key_file)

    def _http(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=self.server,
            verify=self.ssl_context,
            headers={"Authorization": f"Bearer {self.identity.token}"},
            timeout=self.timeout,
            # Heartbeats share one TLS connection: kept idle longer than the
            # heartbeat interval, shorter than the server's keep-alive (75 s).
            limits=httpx.Limits(keepalive_expiry=KEEPALIVE_EXPIRY),
        )

    def reload_tls(self) -> None:
        """After a renewal: new connections present the new certificate.

        The old client may still carry a request in flight: it is closed once
        any such request must have ended (its timeout), or at `aclose`.
        """
        self.ssl_context = self._context()
        old, self.http = self.http, self._http()
        self._retired.append(old)
        closing = asyncio.create_task(self._close_later(old))
        self._closers.add(closing)
        closing.add_done_callback(self._closers.discard)

    async def _close_later(self, client: httpx.AsyncClient) -> None:
        await asyncio.sleep(self.timeout + 1)
        self._retired.remove(client)
        await client.aclose()

    async def aclose(self) -> None:
        for closing in list(self._closers):
            closing.cancel()
        for client in [*self._retired, self.http]:
            await client.aclose()
        self._retired.clear()

    @property
    def _agent_path(self) -> str:
        return f"{API}/agents/{self.identity.agent_id}"

    async def _call(self, method: str, path: str, what: str, body: Any = None) -> Any:
        try:
            response = await self.http.request(method, path, json=body)
        except httpx.HTTPError as exc:
            raise ServerUnavailable(f"{what}: {exc!r}") from exc
        _raise_for(response, what)
        return response.json()

    async def heartbeat(self, body: dict[str, Any]) -> dict[str, Any]:
        answer: dict[str, Any] = await self._call(
            "POST", f"{self._agent_path}/heartbeat", "heartbeat", body
        )
        return answer

    async def open_tasks(self) -> list[dict[str, Any]]:
        """Every unfinished task of this agent (pending ones become assigned)."""
        answer = await self._call("GET", f"{self._agent_path}/tasks", "poll")
        tasks: list[dict[str, Any]] = answer.get("tasks", [])
        return tasks

    async def task_signing_keys(self) -> list[dict[str, Any]] | None:
        """The server's task-signing keys, over mTLS; None from a server that signs none."""
        try:
            answer = await self._call("GET", f"{self._agent_path}/task-signing-keys", "keys")
        except TaskGone:  # 404: a server older than signed tasks
            return None
        keys: list[dict[str, Any]] = answer.get("keys", [])
        return keys

    async def complete(self, task_id: str, body: dict[str, Any]) -> None:
        await self._call(
            "POST", f"{self._agent_path}/tasks/{task_id}/complete", f"complete {task_id}", body
        )

    @contextlib.asynccontextmanager
    async def stream(self) -> AsyncIterator[TaskStream]:
        """Open the task stream (raises `CredentialsRefused` or `ServerUnavailable`)."""
        url = self.server.replace("https://", "wss://", 1).replace("http://", "ws://", 1)
        try:
            connection = await connect(
                f"{url}{self._agent_path}/task-stream",
                ssl=self.ssl_context if url.startswith("wss://") else None,
                additional_headers={"Authorization": f"Bearer {self.identity.token}"},
                open_timeout=15,
                ping_interval=20,
                ping_timeout=20,
                close_timeout=5,
                max_size=8 * 1024 * 1024,
            )
        except Exception as exc:  # network, TLS and websockets' handshake errors
            raise ServerUnavailable(f"task stream: {exc!r}") from exc
        try:
            yield TaskStream(connection)
        finally:
            await connection.close()


class TaskStream:
    """One open task stream: send progress and log lines, dispatch what arrives."""

    def __init__(self, connection: ClientConnection) -> None:
        self.connection = connection
        self._syncs: dict[str, asyncio.Future[bool]] = {}
        self.closed = False

    async def send(self, message: dict[str, Any]) -> bool:
        """Send one message; False when the stream is gone (the caller falls back)."""
        if self.closed:
            return False
        try:
            await self.connection.send(json.dumps(message))
        except ConnectionClosed:
            self.closed = True
            return False
        return True

    async def sync(self, timeout: float = 5) -> bool:
        """Wait until the server has applied every message sent before this call.

        The server answers `{"type": "sync", "syncId"}` with `synced` once
        every earlier message of this stream is stored (it applies them in
        order), so log lines sent before it need not be sent again.
        """
        sync_id = uuid.uuid4().hex
        waiter: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._syncs[sync_id] = waiter
        try:
            if not await self.send({"type": "sync", "syncId": sync_id}):
                return False
            return await asyncio.wait_for(waiter, timeout)
        except TimeoutError:
            return False
        finally:
            self._syncs.pop(sync_id, None)

    async def run(self, on_message: Callable[[dict[str, Any]], Awaitable[None]]) -> None:
        """Dispatch server messages until the stream closes, then raise why.

        `CredentialsRefused` on 4401/4403 (retrying cannot help), else
        `ServerUnavailable` (reconnect later), a normal close included.
        """
        try:
            async for raw in self.connection:
                try:
                    message = json.loads(raw)
                except ValueError:
                    continue
                if not isinstance(message, dict):
                    continue
                if message.get("type") == "synced":
                    self._synced(message)
                    continue
                await on_message(message)
        except ConnectionClosed as exc:
            self._end()
            code = exc.rcvd.code if exc.rcvd is not None else None
            reason = exc.rcvd.reason if exc.rcvd is not None else ""
            if code in (CLOSE_UNAUTHORIZED, CLOSE_FORBIDDEN):
                raise CredentialsRefused(f"task stream closed: {code} {reason}") from exc
            raise ServerUnavailable(f"task stream closed: {code} {reason}") from exc
        self._end()
        rcvd = self.connection.protocol.close_rcvd
        if rcvd is not None and rcvd.code in (CLOSE_UNAUTHORIZED, CLOSE_FORBIDDEN):
            raise CredentialsRefused(f"task stream closed: {rcvd.code} {rcvd.reason}")
        raise ServerUnavailable(
            f"task stream closed: {rcvd.code if rcvd else None} {rcvd.reason if rcvd else ''}"
        )

    def _synced(self, message: dict[str, Any]) -> None:
        waiter = self._syncs.get(str(message.get("syncId")))
        if waiter is not None and not waiter.done():
            waiter.set_result(True)

    def _end(self) -> None:
        self.closed = True
        for waiter in self._syncs.values():
            if not waiter.done():
                waiter.set_result(False)
