"""The verified client certificate reaches the app, over real TLS sockets.

app/server/tls.py relies on uvicorn's internal protocol classes: these tests
start real servers (one per protocol combination) and fail if an upgrade
stops the certificate from reaching the scope, or lets it leak.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from cryptography.hazmat.primitives import serialization
from starlette.types import Receive, Scope, Send
from websockets.asyncio.client import connect

from app.server.tls import client_cert_pem, uvicorn_config
from pki.authority import CertificateAuthority, load_or_create_pki
from pki.issue import issue_client_certificate
from pki.keys import generate_agent_key, private_key_pem

HAS_WSPROTO = find_spec("wsproto") is not None
TLS_1_2, TLS_1_3 = 0x0303, 0x0304
# TLS_AES_128_GCM_SHA256, TLS_AES_256_GCM_SHA384, TLS_CHACHA20_POLY1305_SHA256
TLS_1_3_SUITES = {0x1301, 0x1302, 0x1303}


async def echo_app(scope: Scope, receive: Receive, send: Send) -> None:
    """Answers HTTP and WebSocket alike with what the scope says about TLS."""
    extensions = scope.get("extensions") or {}
    body = json.dumps(
        {
            "has_tls": "tls" in extensions,
            "tls": extensions.get("tls"),
            "client_cert_pem": client_cert_pem(scope),
            "client_port": scope["client"][1],
        }
    )
    if scope["type"] == "http":
        headers = [(b"content-type", b"application/json")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body.encode()})
    elif scope["type"] == "websocket":
        assert (await receive())["type"] == "websocket.connect"
        await send({"type": "websocket.accept"})
        await send({"type": "websocket.send", "text": body})
        await send({"type": "websocket.close"})


@dataclass(frozen=True)
class Identity:
    """A client certificate and key on disk, as an agent holds them."""

    cert_pem: str
    cert_file: Path
    key_file: Path
    subject: str = ""


@dataclass(frozen=True)
class Pki:
    ca: CertificateAuthority
    server_cert: Path
    server_key: Path


def _write_private(path: Path, data: str) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as file:
        file.write(data)
    return path


def _agent(ca: CertificateAuthority, directory: Path) -> Identity:
    directory.mkdir()
    key = generate_agent_key()
    agent_id = uuid.uuid4()
    cert = issue_client_certificate(
        ca, agent_id=agent_id, public_key=key.public_key(), ttl=dt.timedelta(hours=1)
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM).decode()
    (directory / "agent.pem").write_text(cert_pem)
    return Identity(
        cert_pem,
        directory / "agent.pem",
        _write_private(directory / "agent.key", private_key_pem(key)),
        subject=f"CN={agent_id},O=Stella",
    )


@pytest.fixture(scope="module")
def our_pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    ca = load_or_create_pki(tmp_path_factory.mktemp("pki"))
    cert, key = ca.server_certificate_files(["127.0.0.1"])
    return Pki(ca, cert, key)


@pytest.fixture(scope="module")
def agent_a(our_pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Identity:
    return _agent(our_pki.ca, tmp_path_factory.mktemp("agents") / "a")


@pytest.fixture(scope="module")
def agent_b(our_pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Identity:
    return _agent(our_pki.ca, tmp_path_factory.mktemp("agents") / "b")


@pytest.fixture(scope="module")
def foreign_agent(tmp_path_factory: pytest.TempPathFactory) -> Identity:
    other_ca = load_or_create_pki(tmp_path_factory.mktemp("other-pki"))
    return _agent(other_ca, tmp_path_factory.mktemp("foreign") / "agent")


def client_context(our_pki: Pki, identity: Identity | None, **options: Any) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=our_pki.ca.files.ca_cert)
    if identity is not None:
        context.load_cert_chain(identity.cert_file, identity.key_file)
    for name, value in options.items():
        setattr(context, name, value)
    return context


@contextmanager
def serving(config: uvicorn.Config) -> Iterator[int]:
    """Run `config` in a thread on a free port (bound here, so no race); yield the port."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            assert thread.is_alive(), "uvicorn exited during startup"
            assert time.monotonic() < deadline, "uvicorn did not start within 10 s"
            time.sleep(0.01)
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def _config(our_pki: Pki, *, tls: bool, http: str, ws: str, loop: str = "auto") -> uvicorn.Config:
    return uvicorn_config(
        echo_app,
        host="127.0.0.1",
        port=0,
        tls=tls,
        ca_cert_file=our_pki.ca.files.ca_cert,
        server_cert_file=our_pki.server_cert,
        server_key_file=our_pki.server_key,
        http=http,
        ws=ws,
        loop=loop,
        lifespan="off",
        log_config=None,
        log_level="warning",
    )


# Importing uvicorn's legacy implementation warns with a UserWarning subclass,
# which pyproject's DeprecationWarning filters do not cover.
_LEGACY = pytest.mark.filterwarnings("ignore::uvicorn.config.UvicornDeprecationWarning")
_NEEDS_WSPROTO = pytest.mark.skipif(not HAS_WSPROTO, reason="wsproto is not installed")
COMBINATIONS = [
    pytest.param(("h11", "websockets", "auto"), marks=_LEGACY, id="h11-websockets"),
    pytest.param(("h11", "websockets-sansio", "auto"), id="h11-websockets_sansio"),
    pytest.param(("h11", "wsproto", "auto"), marks=_NEEDS_WSPROTO, id="h11-wsproto"),
    pytest.param(("httptools", "websockets", "auto"), marks=_LEGACY, id="httptools-websockets"),
    pytest.param(("httptools", "websockets-sansio", "auto"), id="httptools-websockets_sansio"),
    pytest.param(("httptools", "wsproto", "auto"), marks=_NEEDS_WSPROTO, id="httptools-wsproto"),
    # "auto" picks uvloop when installed; the plain asyncio loop has its own SSL transport.
    pytest.param(
        ("httptools", "websockets-sansio", "asyncio"), id="httptools-websockets_sansio-asyncio"
    ),
]


@pytest.fixture(scope="module", params=COMBINATIONS)
def tls_port(request: pytest.FixtureRequest, our_pki: Pki) -> Iterator[int]:
    http, ws, loop = request.param
    with serving(_config(our_pki, tls=True, http=http, ws=ws, loop=loop)) as port:
        yield port


@pytest.fixture(scope="module")
def default_tls_port(our_pki: Pki) -> Iterator[int]:
    with serving(_config(our_pki, tls=True, http="httptools", ws="websockets-sansio")) as port:
        yield port


def http_get(port: int, context: ssl.SSLContext) -> dict[str, Any]:
    with httpx.Client(verify=context, timeout=5) as client:
        response = client.get(f"https://127.0.0.1:{port}/")
    response.raise_for_status()
    result: dict[str, Any] = response.json()
    return result


def ws_get(port: int, context: ssl.SSLContext | None, scheme: str = "wss") -> dict[str, Any]:
    async def fetch() -> dict[str, Any]:
        async with connect(
            f"{scheme}://127.0.0.1:{port}/ws", ssl=context, open_timeout=5, close_timeout=5
        ) as websocket:
            message = await asyncio.wait_for(websocket.recv(), 5)
        result: dict[str, Any] = json.loads(message)
        return result

    return asyncio.run(fetch())


def assert_sees(seen: dict[str, Any], identity: Identity) -> None:
    assert seen["has_tls"]
    assert seen["tls"]["client_cert_chain"] == [identity.cert_pem]
    assert seen["client_cert_pem"] == identity.cert_pem


def test_http_sees_the_client_certificate(tls_port: int, our_pki: Pki, agent_a: Identity) -> None:
    seen = http_get(tls_port, client_context(our_pki, agent_a))

    assert_sees(seen, agent_a)
    tls = seen["tls"]
    assert tls["client_cert_name"] == agent_a.subject
    assert tls["tls_version"] == TLS_1_3
    assert tls["cipher_suite"] in TLS_1_3_SUITES
    assert tls["server_cert"] is None
    assert tls["client_cert_error"] is None


def test_websocket_sees_the_client_certificate(
    tls_port: int, our_pki: Pki, agent_a: Identity
) -> None:
    assert_sees(ws_get(tls_port, client_context(our_pki, agent_a)), agent_a)


def test_client_without_certificate_is_accepted(tls_port: int, our_pki: Pki) -> None:
    context = client_context(our_pki, None)

    for seen in (http_get(tls_port, context), ws_get(tls_port, context)):
        assert seen["has_tls"]
        assert seen["tls"]["client_cert_chain"] == []
        assert seen["tls"]["client_cert_name"] is None
        assert seen["client_cert_pem"] is None


def test_connections_do_not_see_each_others_certificate(
    tls_port: int, our_pki: Pki, agent_a: Identity, agent_b: Identity
) -> None:
    clients = {
        name: httpx.Client(verify=client_context(our_pki, identity), timeout=5)
        for name, identity in (("a", agent_a), ("b", agent_b), ("none", None))
    }
    expected = {"a": [agent_a.cert_pem], "b": [agent_b.cert_pem], "none": []}
    ports: dict[str, set[int]] = {name: set() for name in clients}
    try:
        for _ in range(3):  # a, b, none, a, b, none, ... on three live connections
            for name, client in clients.items():
                seen = client.get(f"https://127.0.0.1:{tls_port}/").json()
                assert seen["tls"]["client_cert_chain"] == expected[name], name
                ports[name].add(seen["client_port"])
    finally:
        for client in clients.values():
            client.close()
    # One connection per client, kept alive throughout: the interleaving was real.
    assert all(len(used) == 1 for used in ports.values()), ports
    assert len(set.union(*ports.values())) == 3

    # Two WebSocket connections open at once, each with its own certificate.
    async def both() -> tuple[Any, Any]:
        url = f"wss://127.0.0.1:{tls_port}/ws"
        async with (
            connect(url, ssl=client_context(our_pki, agent_a), open_timeout=5) as ws_a,
            connect(url, ssl=client_context(our_pki, agent_b), open_timeout=5) as ws_b,
        ):
            return json.loads(await ws_b.recv()), json.loads(await ws_a.recv())

    seen_b, seen_a = asyncio.run(asyncio.wait_for(both(), 10))
    assert_sees(seen_a, agent_a)
    assert_sees(seen_b, agent_b)


def test_tls_1_2_client_sees_the_client_certificate(
    default_tls_port: int, our_pki: Pki, agent_a: Identity
) -> None:
    context = client_context(our_pki, agent_a, maximum_version=ssl.TLSVersion.TLSv1_2)

    seen = http_get(default_tls_port, context)

    assert_sees(seen, agent_a)
    assert seen["tls"]["tls_version"] == TLS_1_2
    # ECDHE-ECDSA with AES-GCM or ChaCha20 (the server key is P-256).
    assert seen["tls"]["cipher_suite"] in {0xC02B, 0xC02C, 0xCCA9}


@pytest.mark.parametrize("tls_max", [ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2])
@pytest.mark.parametrize("who", ["foreign CA", "server certificate"])
def test_untrusted_client_certificate_fails_the_handshake(
    default_tls_port: int,
    our_pki: Pki,
    foreign_agent: Identity,
    who: str,
    tls_max: ssl.TLSVersion,
) -> None:
    if who == "foreign CA":
        identity = foreign_agent
    else:  # our CA signed it, but for serverAuth only
        identity = Identity("", our_pki.server_cert, our_pki.server_key)
    context = client_context(our_pki, identity, maximum_version=tls_max)

    # TLS 1.2 fails in the handshake; in TLS 1.3 the client may finish first
    # and learn of the server's alert on its first read.
    with pytest.raises((httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError)):
        http_get(default_tls_port, context)


def test_plain_server_has_no_tls_extension(our_pki: Pki) -> None:
    config = _config(our_pki, tls=False, http="httptools", ws="websockets-sansio")
    with serving(config) as port:
        seen_http = httpx.get(f"http://127.0.0.1:{port}/", timeout=5).json()
        seen_ws = ws_get(port, None, scheme="ws")

    for seen in (seen_http, seen_ws):
        assert not seen["has_tls"]
        assert seen["client_cert_pem"] is None


def test_server_requires_tls_1_2_or_newer(our_pki: Pki) -> None:
    config = _config(our_pki, tls=True, http="h11", ws="websockets-sansio")
    config.load()

    assert config.ssl is not None
    assert config.ssl.minimum_version == ssl.TLSVersion.TLSv1_2
    assert config.ssl.verify_mode == ssl.CERT_OPTIONAL


def test_client_cert_pem() -> None:
    assert client_cert_pem({"type": "http"}) is None
    assert client_cert_pem({"extensions": {}}) is None
    assert client_cert_pem({"extensions": {"tls": {"client_cert_chain": []}}}) is None
    assert client_cert_pem({"extensions": {"tls": {"client_cert_chain": ["A", "B"]}}}) == "A"


def test_uvicorn_config_refuses_incomplete_settings() -> None:
    with pytest.raises(ValueError, match="ca_cert_file"):
        uvicorn_config(echo_app, host="127.0.0.1", port=0, tls=True)
    with pytest.raises(ValueError, match="http must be"):
        uvicorn_config(echo_app, host="127.0.0.1", port=0, tls=False, http="auto")
    with pytest.raises(ValueError, match="import string"):
        uvicorn_config(echo_app, host="127.0.0.1", port=0, tls=False, workers=2)
    if not HAS_WSPROTO:
        with pytest.raises(ValueError, match="wsproto"):
            uvicorn_config(echo_app, host="127.0.0.1", port=0, tls=False, ws="wsproto")
