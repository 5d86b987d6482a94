"""The verified client certificate in the ASGI scope, for uvicorn.

Agents authenticate with client certificates (mTLS), but uvicorn 0.54 puts
nothing about TLS into the scope: the app cannot see which certificate the
handshake verified. `TLSScopeMixin` fixes that at the protocol level. Each
connection builds its own protocol instance, which holds the app as
`self.app`; on `connection_made` the mixin wraps that per-instance reference
so every HTTP and WebSocket scope of the connection carries
`scope["extensions"]["tls"]` as described by the ASGI TLS extension. h11 and
httptools hand the same transport to the WebSocket protocol on upgrade, so
the WebSocket classes get the same treatment.

The protocol classes are uvicorn internals: hence the `uvicorn==0.54.*` pin
and tests/server/test_tls.py, which fails when the certificate stops reaching
the app. Use `uvicorn_config` rather than naming the classes yourself.
"""

from __future__ import annotations

import asyncio
import importlib.util
import ssl
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypedDict

import uvicorn
from cryptography import x509
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from app.server.websocket import LeanWebSocketsSansIOProtocol

# ssl.SSLObject.version() -> the 16-bit protocol number the extension uses.
_TLS_VERSIONS = {"TLSv1": 0x0301, "TLSv1.1": 0x0302, "TLSv1.2": 0x0303, "TLSv1.3": 0x0304}
# Cipher name -> IANA number, filled on first sight (ssl only reports names).
_cipher_ids: dict[str, int | None] = {}


class TLSExtension(TypedDict):
    """`scope["extensions"]["tls"]`, per the ASGI TLS extension."""

    server_cert: str | None
    client_cert_chain: list[str]
    client_cert_name: str | None
    client_cert_error: str | None
    tls_version: int | None
    cipher_suite: int | None


def client_cert_pem(scope: Mapping[str, Any]) -> str | None:
    """The PEM client certificate the TLS handshake verified, or None (none sent, no TLS)."""
    tls = (scope.get("extensions") or {}).get("tls")
    if not tls or not tls["client_cert_chain"]:
        return None
    pem: str = tls["client_cert_chain"][0]
    return pem


class _WithTLSExtension:
    """The app as one TLS connection sees it."""

    __slots__ = ("_app", "_tls")

    def __init__(self, app: ASGIApp, tls: TLSExtension) -> None:
        self._app = app
        self._tls = tls

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            # A fresh copy per request: an app that edits it cannot affect later requests.
            tls = self._tls.copy()
            tls["client_cert_chain"] = list(tls["client_cert_chain"])
            scope["extensions"] = {**(scope.get("extensions") or {}), "tls": tls}
        elif scope["type"] == "websocket":
            # A WebSocket connection has one scope, kept as long as the stream
            # is open: no later scope to protect, so no copy to keep.
            scope["extensions"] = {**(scope.get("extensions") or {}), "tls": self._tls}
        await self._app(scope, receive, send)


def _tls_extension(ssl_object: ssl.SSLObject) -> TLSExtension:
    # With CERT_OPTIONAL a certificate that fails verification aborts the handshake,
    # so any certificate here was verified against the CA.
    der = ssl_object.getpeercert(binary_form=True)
    cipher = ssl_object.cipher()
    return TLSExtension(
        server_cert=None,
        client_cert_chain=[ssl.DER_cert_to_PEM_cert(der)] if der else [],
        client_cert_name=_subject_name(der) if der else None,
        client_cert_error=None,
        tls_version=_TLS_VERSIONS.get(ssl_object.version() or ""),
        cipher_suite=_cipher_id(ssl_object, cipher[0]) if cipher else None,
    )


def _subject_name(der: bytes) -> str | None:
    # ~12 µs once per connection, next to a handshake that costs milliseconds.
    try:
        return x509.load_der_x509_certificate(der).subject.rfc4514_string()
    except ValueError:  # OpenSSL accepted what cryptography will not parse
        return None


def _cipher_id(ssl_object: ssl.SSLObject, name: str) -> int | None:
    if name not in _cipher_ids:
        # OpenSSL ids are 0x0300xxxx over the 16-bit IANA number.
        _cipher_ids.update({c["name"]: c["id"] & 0xFFFF for c in ssl_object.context.get_ciphers()})
        _cipher_ids.setdefault(name, None)
    return _cipher_ids[name]


class TLSScopeMixin:
    """Put `scope["extensions"]["tls"]` into every scope of a TLS connection.

    Goes before a uvicorn protocol class in the bases. Without TLS it does nothing.
    """

    # Each uvicorn protocol sets it from config.loaded_app, typed differently per class.
    app: Any

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None:
            # An instance attribute of this connection's protocol: nothing shared changes.
            self.app = _WithTLSExtension(self.app, _tls_extension(ssl_object))
        super().connection_made(transport)  # type: ignore[misc]


class TLSH11Protocol(TLSScopeMixin, H11Protocol):
    """uvicorn's h11 HTTP protocol with the TLS extension."""


class TLSHttpToolsProtocol(TLSScopeMixin, HttpToolsProtocol):
    """uvicorn's httptools HTTP protocol with the TLS extension."""


class TLSWebSocketsSansIOProtocol(TLSScopeMixin, LeanWebSocketsSansIOProtocol):
    """uvicorn's websockets (sans-I/O) WebSocket protocol, lightened (app/server/websocket.py),
    with the TLS extension."""


def __getattr__(name: str) -> type[asyncio.Protocol]:
    """`TLSWebSocketProtocol` and `TLSWSProtocol`, built on first use.

    Importing uvicorn's legacy websockets implementation warns (deprecated) and
    wsproto is optional, so neither is imported unless asked for.
    """
    cls: type[asyncio.Protocol]
    if name == "TLSWebSocketProtocol":
        from uvicorn.protocols.websockets.websockets_impl import WebSocketProtocol  # noqa: PLC0415

        class _Legacy(TLSScopeMixin, WebSocketProtocol):
            """uvicorn's legacy websockets WebSocket protocol with the TLS extension."""

        cls = _Legacy
    elif name == "TLSWSProtocol":
        from uvicorn.protocols.websockets.wsproto_impl import WSProtocol  # noqa: PLC0415

        class _WSProto(TLSScopeMixin, WSProtocol):
            """uvicorn's wsproto WebSocket protocol with the TLS extension."""

        cls = _WSProto
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    # Named as a module attribute, so pickle (uvicorn --workers) finds it by reference.
    cls.__name__ = cls.__qualname__ = name
    globals()[name] = cls
    return cls


_HTTP_PROTOCOLS: dict[str, type[asyncio.Protocol]] = {
    "h11": TLSH11Protocol,
    "httptools": TLSHttpToolsProtocol,
}
# Attribute names: two of them only exist once asked for (see __getattr__).
_WS_PROTOCOLS = {
    "websockets": "TLSWebSocketProtocol",
    "websockets-sansio": "TLSWebSocketsSansIOProtocol",
    "wsproto": "TLSWSProtocol",
}


def _ws_protocol(attribute: str) -> type[asyncio.Protocol]:
    cls: type[asyncio.Protocol] | None = globals().get(attribute)
    return cls if cls is not None else __getattr__(attribute)


def _tls12_or_newer(
    config: uvicorn.Config, default: Callable[[], ssl.SSLContext]
) -> ssl.SSLContext:
    # Module level, so a Config holding it still pickles for worker processes.
    context = default()
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def uvicorn_config(
    app: ASGIApp | str,
    *,
    host: str,
    port: int,
    tls: bool,
    ca_cert_file: Path | None = None,
    server_cert_file: Path | None = None,
    server_key_file: Path | None = None,
    factory: bool = False,
    workers: int = 1,
    log_level: str = "info",
    http: str = "httptools",
    ws: str = "websockets-sansio",
    **extra: Any,
) -> uvicorn.Config:
    """A uvicorn Config whose scopes carry the verified client certificate.

    With `tls=True` the server asks for a client certificate but does not
    require one (agents register before they have one), verifies any it gets
    against `ca_cert_file` (a bad one fails the handshake) and speaks TLS 1.2
    or newer. Read the certificate in the app with `client_cert_pem(scope)`.
    `http` is "h11" or "httptools"; `ws` is "websockets-sansio",
    "websockets" (legacy), "wsproto" (needs the wsproto package) or "none".
    `extra` goes to `uvicorn.Config` as is.

    >>> config = uvicorn_config(
    ...     "app.main:create_app", factory=True, host="0.0.0.0", port=8443, tls=True,
    ...     ca_cert_file=ca.files.ca_cert, server_cert_file=cert, server_key_file=key,
    ... )
    >>> uvicorn.Server(config).run()
    """
    if http not in _HTTP_PROTOCOLS:
        raise ValueError(f"http must be one of {sorted(_HTTP_PROTOCOLS)}, not {http!r}")
    if ws != "none" and ws not in _WS_PROTOCOLS:
        raise ValueError(f"ws must be 'none' or one of {sorted(_WS_PROTOCOLS)}, not {ws!r}")
    if ws == "wsproto" and importlib.util.find_spec("wsproto") is None:
        raise ValueError("ws='wsproto' needs the wsproto package, which is not installed")
    if workers > 1 and not isinstance(app, str):
        raise ValueError("workers > 1 needs the app as an import string ('module:attribute')")
    if tls:
        if ca_cert_file is None or server_cert_file is None or server_key_file is None:
            raise ValueError("tls=True needs ca_cert_file, server_cert_file and server_key_file")
        extra |= {
            "ssl_certfile": server_cert_file,
            "ssl_keyfile": server_key_file,
            "ssl_ca_certs": ca_cert_file,
            "ssl_cert_reqs": ssl.CERT_OPTIONAL,
            "ssl_context_factory": _tls12_or_newer,
        }
    # scope["client"] stays the TCP peer: the trusted-proxy check of the client
    # certificate header (app/auth/client_cert.py) is about who sent the header.
    # uvicorn's default rewrites it from X-Forwarded-For (sent from 127.0.0.1 or
    # FORWARDED_ALLOW_IPS), which refuses agents behind a local proxy and lets a
    # forged X-Forwarded-For pass a header certificate off as the proxy's.
    extra.setdefault("proxy_headers", False)
    # Our classes also without TLS: one code path, and the mixin then adds nothing.
    # Classes rather than import strings: they pickle by reference for --workers.
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        factory=factory,
        workers=workers,
        log_level=log_level,
        http=_HTTP_PROTOCOLS[http],
        ws=_ws_protocol(_WS_PROTOCOLS[ws]) if ws != "none" else "none",
        **extra,
    )
