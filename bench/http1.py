"""A lean HTTP/1.1 client over asyncio TLS streams, for load generation.

The load generator shares two cores with the server it measures, so every
millisecond of client CPU per request is taken from the server. httpx
spends a millisecond or two per request; this client writes prepared
bytes and reads a status line, headers and a Content-Length (or chunked)
body, a fraction of that. Keep-alive by default; one connection serves
one request at a time, so concurrency is the number of connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from dataclasses import dataclass
from urllib.parse import urlsplit


@dataclass(frozen=True)
class Response:
    status: int
    headers: dict[str, str]  # names lower-cased
    body: bytes


class Connection:
    """One HTTP/1.1 connection to `url`'s host; reconnects when the server closes it."""

    def __init__(
        self, url: str, context: ssl.SSLContext, headers: dict[str, str] | None = None
    ) -> None:
        parts = urlsplit(url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 443
        self.context = context
        # Sent with every request (auth, content type).
        self.base_headers = {"Host": f"{self.host}:{self.port}", **(headers or {})}
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def connect(self) -> None:
        """Open the TCP connection and finish the TLS handshake now."""
        self._reader, self._writer = await asyncio.open_connection(
            self.host, self.port, ssl=self.context, server_hostname=self.host
        )

    async def request(
        self,
        method: str,
        path: str,
        body: bytes = b"",
        headers: dict[str, str] | None = None,
        *,
        resend: bool = True,
    ) -> Response:
        """Send and read the answer; `resend=False` when a repeat must not be automatic.

        A server killed mid-request also answers nothing: a caller for whom
        the first attempt's effect matters (a heartbeat answer hands over
        tasks) learns of the failure instead.
        """
        lines = [f"{method} {path} HTTP/1.1"]
        fields = {**self.base_headers, **(headers or {}), "Content-Length": str(len(body))}
        lines += [f"{name}: {value}" for name, value in fields.items()]
        message = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
        reused = self._writer is not None
        try:
            response = await self._exchange(message)
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            # A kept-alive connection the server closed while idle answers
            # nothing at all: it never saw the request, so send it again.
            partial = isinstance(exc, asyncio.IncompleteReadError) and exc.partial
            await self.close()
            if not reused or partial or not resend:
                raise
            response = await self._exchange(message)
        if response.headers.get("connection", "").lower() == "close":
            await self.close()
        return response

    async def _exchange(self, message: bytes) -> Response:
        if self._writer is None:
            await self.connect()
        assert self._reader is not None
        assert self._writer is not None
        self._writer.write(message)
        return await self._read(self._reader)

    async def close(self) -> None:
        writer, self._reader, self._writer = self._writer, None, None
        if writer is not None:
            writer.close()
            # The peer may have left first: nothing to flush then.
            with contextlib.suppress(ConnectionError, ssl.SSLError):
                await writer.wait_closed()

    @staticmethod
    async def _read(reader: asyncio.StreamReader) -> Response:
        head = await reader.readuntil(b"\r\n\r\n")
        status_line, *header_lines = head[:-4].decode("latin-1").split("\r\n")
        status = int(status_line.split(" ", 2)[1])
        headers: dict[str, str] = {}
        for line in header_lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if headers.get("transfer-encoding", "").lower() == "chunked":
            body = await _read_chunked(reader)
        else:
            body = await reader.readexactly(int(headers.get("content-length", "0")))
        return Response(status, headers, body)


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    chunks: list[bytes] = []
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";", 1)[0], 16)
        if size == 0:
            # Trailers, if any, end with an empty line.
            while await reader.readuntil(b"\r\n") != b"\r\n":
                pass
            return b"".join(chunks)
        chunks.append(await reader.readexactly(size))
        await reader.readexactly(2)
