"""Looking for secrets where they must not be: every encoding, every place.

A secret counts as found in its plain form, in hex, and in base64 (standard
and URL-safe, padded or not) at each of the three byte alignments it can
take inside a longer encoded value. What is searched: text, or raw bytes
read from Redis (a MONITOR and a PSUBSCRIBE connection recording everything
the server sends them, and a dump of every key) and from `pg_dump`.
"""

from __future__ import annotations

import base64
import re
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import redis
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url


def encodings(secret: str) -> set[str]:
    """Every form of `secret` to look for."""
    raw = secret.encode()
    forms = {secret, raw.hex(), raw.hex().upper()}
    for shift in range(3):
        # Behind `shift` other bytes, the characters that depend on the secret's
        # bytes alone run from ceil(8*shift/6) to floor(8*(shift+len)/6).
        shifted = b"\0" * shift + raw
        start, end = -(-8 * shift // 6), 8 * (shift + len(raw)) // 6
        for encode in (base64.b64encode, base64.urlsafe_b64encode):
            encoded = encode(shifted).decode()
            forms.add(encoded[start:end])
            if shift == 0:
                forms.update({encoded, encoded.rstrip("=")})
    return forms


class Secrets:
    """Named secrets, each with every form it is searched in."""

    def __init__(self, named: Mapping[str, str]) -> None:
        self.forms = {name: encodings(value) for name, value in named.items()}

    def __or__(self, other: Secrets) -> Secrets:
        merged = Secrets({})
        merged.forms = self.forms | other.forms
        return merged

    def found(self, haystack: str | bytes) -> list[str]:
        """Names of the secrets in `haystack`, with the form each was found in."""
        if isinstance(haystack, bytes):
            haystack = haystack.decode("latin-1")
        return [
            f"{name} ({form!r})"
            for name, forms in self.forms.items()
            for form in sorted(forms)
            if form in haystack
        ]

    def found_in(self, places: Mapping[str, str | bytes]) -> dict[str, list[str]]:
        """place -> secrets found there, for the places holding any."""
        hits = {place: self.found(content) for place, content in places.items()}
        return {place: found for place, found in hits.items() if found}


def pem_body_lines(pem: str) -> list[str]:
    """The base64 lines of a PEM block: any one of them found is the key found."""
    return [line for line in pem.splitlines() if line and not line.startswith("-----")]


# --- Redis ---------------------------------------------------------------------------------


def _command(*args: str) -> bytes:
    parts = [f"*{len(args)}\r\n".encode()]
    for arg in args:
        data = arg.encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


class RedisTap:
    """A raw connection that sends one command (MONITOR, PSUBSCRIBE) and records
    every byte the server sends back until closed."""

    def __init__(self, url: str, *command: str) -> None:
        parts = urlsplit(url)
        self._socket = socket.create_connection(
            (parts.hostname or "127.0.0.1", parts.port or 6379), timeout=5
        )
        self._socket.sendall(_command(*command))
        self._socket.settimeout(0.1)
        self._chunks: list[bytes] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                data = self._socket.recv(1 << 16)
            except TimeoutError:
                continue
            except OSError:
                return
            if not data:
                return
            self._chunks.append(data)

    def recorded(self) -> bytes:
        return b"".join(self._chunks)

    def close(self) -> bytes:
        """Stop recording; everything recorded."""
        self._stop.set()
        self._thread.join(timeout=5)
        self._socket.close()
        return self.recorded()


def redis_dump(url: str, prefix: str) -> dict[str, bytes]:
    """Every key under `prefix`, whatever its type: key -> its values, raw."""
    # decode_responses=False: every value is bytes (redis-py types them bytes | str).
    client: Any = redis.Redis.from_url(url)
    values: dict[str, bytes] = {}
    try:
        for key in client.scan_iter(match=f"{prefix}*", count=1000):
            kind = client.type(key).decode()
            items: Iterable[bytes]
            if kind == "string":
                items = [client.get(key) or b""]
            elif kind == "list":
                items = client.lrange(key, 0, -1)
            elif kind == "hash":
                items = [f + b"=" + v for f, v in client.hgetall(key).items()]
            elif kind == "set":
                items = client.smembers(key)
            elif kind == "zset":
                items = client.zrange(key, 0, -1)
            elif kind == "stream":
                items = [repr(entry).encode() for entry in client.xrange(key)]
            else:
                items = [f"<{kind}>".encode()]
            values[key.decode()] = b"\n".join(items)
    finally:
        client.close()
    return values


# --- PostgreSQL ----------------------------------------------------------------------------


def pg_dump_binary(database_url: str) -> str | None:
    """A pg_dump of the server's major version (an older one refuses to dump)."""
    engine = create_engine(make_url(database_url))
    try:
        with engine.connect() as connection:
            version = int(connection.execute(text("SHOW server_version_num")).scalar_one())
    finally:
        engine.dispose()
    matching = Path(f"/usr/lib/postgresql/{version // 10000}/bin/pg_dump")
    if matching.exists():
        return str(matching)
    return shutil.which("pg_dump")


def pg_dump(binary: str, database_url: str) -> bytes:
    """The whole database as SQL (data included)."""
    url = make_url(database_url)
    libpq = re.sub(r"^postgresql\+\w+://", "postgresql://", url.render_as_string(False))
    done = subprocess.run(
        [binary, "--no-owner", "--dbname", libpq], capture_output=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    return done.stdout
