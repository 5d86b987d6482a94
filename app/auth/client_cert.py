"""Finding the client certificate an agent presented.

Two ways in: our own TLS listener (`stella serve --tls`) puts the verified
peer certificate into the ASGI scope (see app/server/tls.py), or a
TLS-terminating proxy passes it URL-encoded in a header, which we accept
only from the proxy addresses the operator trusts.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote

from cryptography import x509

from app.server.tls import client_cert_pem
from app.settings import Settings

MAX_HEADER_CERT_BYTES = 16 * 1024


class MalformedCertificate(Exception):
    """A certificate was presented but cannot be parsed."""


def presented_certificate_pem(scope: Mapping[str, Any], settings: Settings) -> str | None:
    """The PEM client certificate of this request, unparsed, or None when there is none."""
    pem = client_cert_pem(scope)
    if pem is not None:
        return pem
    if not settings.trusted_proxy_networks or not _from_trusted_proxy(scope, settings):
        return None
    header = settings.client_cert_header.lower().encode()
    for name, value in scope.get("headers", ()):
        if name == header:
            if len(value) > MAX_HEADER_CERT_BYTES:
                raise MalformedCertificate("client certificate header is too large")
            return unquote(value.decode("latin-1"))
    return None


def _from_trusted_proxy(scope: Mapping[str, Any], settings: Settings) -> bool:
    client = scope.get("client")
    if not client:
        return False
    try:
        address = ipaddress.ip_address(client[0])
    except ValueError:
        return False
    return any(address in network for network in settings.trusted_proxy_networks)


def load_certificate(pem: str) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(pem.encode())
    except ValueError as exc:
        raise MalformedCertificate("client certificate is not a valid PEM certificate") from exc
