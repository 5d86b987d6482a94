"""Checking a client certificate presented by an agent.

The TLS handshake (or the trusted proxy) already verified the chain; this
check repeats it against our CA so that no path into the app skips it, and
extracts what the app compares with the agent's token and database row.
"""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from pki.authority import CertificateAuthority
from pki.keys import AgentPublicKey, jwk_thumbprint


class CertificateRejected(Exception):
    """The presented certificate does not identify an agent; the message says why."""


@dataclass(frozen=True)
class ClientIdentity:
    """Who a verified client certificate names."""

    agent_id: uuid.UUID
    key_thumbprint: str
    not_after: dt.datetime
    public_key: AgentPublicKey


def verify_client_certificate(
    ca: CertificateAuthority, cert: x509.Certificate, *, now: dt.datetime | None = None
) -> ClientIdentity:
    """Verify `cert` was issued by `ca` to an agent and is valid at `now`."""
    now = now or dt.datetime.now(dt.UTC)
    if cert.issuer != ca.cert.subject:
        raise CertificateRejected("certificate was not issued by this CA")
    try:
        cert.verify_directly_issued_by(ca.cert)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise CertificateRejected("certificate signature does not verify") from exc
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise CertificateRejected("certificate is expired or not yet valid")
    try:
        usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound as exc:
        raise CertificateRejected("certificate is not for client authentication") from exc
    if ExtendedKeyUsageOID.CLIENT_AUTH not in usages:
        raise CertificateRejected("certificate is not for client authentication")
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    try:
        agent_id = uuid.UUID(str(names[0].value))
    except (IndexError, ValueError) as exc:
        raise CertificateRejected("certificate does not name an agent") from exc
    key = cert.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | rsa.RSAPublicKey):
        raise CertificateRejected("certificate carries an unsupported key type")
    return ClientIdentity(
        agent_id=agent_id,
        key_thumbprint=jwk_thumbprint(key),
        not_after=cert.not_valid_after_utc,
        public_key=key,
    )
