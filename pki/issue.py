"""Issuing certificates from the CA.

Agent certificates name the agent id as CN and nothing else, are for client
authentication only and can never sign other certificates, whatever the
agent asked for in its CSR: the CSR contributes its public key, no more.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from pki.keys import AgentPublicKey

if TYPE_CHECKING:
    from pki.authority import CertificateAuthority

# Tolerate agents whose clock runs a little behind ours.
BACKDATE = dt.timedelta(minutes=1)
SERVER_CERT_LIFETIME = dt.timedelta(days=90)


def issue_client_certificate(
    ca: CertificateAuthority,
    *,
    agent_id: uuid.UUID,
    public_key: AgentPublicKey,
    ttl: dt.timedelta,
    now: dt.datetime | None = None,
) -> x509.Certificate:
    """Certify `public_key` as agent `agent_id` for `ttl` (clientAuth only, never a CA)."""
    now = now or dt.datetime.now(dt.UTC)
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Stella"),
            x509.NameAttribute(NameOID.COMMON_NAME, str(agent_id)),
        ]
    )
    return (
        _builder(ca, subject=subject, public_key=public_key, now=now, ttl=ttl)
        .add_extension(_key_usage(), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca.key, hashes.SHA256())
    )


def issue_server_certificate(
    ca: CertificateAuthority,
    *,
    names: Sequence[str],
    key: ec.EllipticCurvePrivateKey,
    now: dt.datetime | None = None,
) -> x509.Certificate:
    """The HTTPS certificate for `names` (DNS names and IP addresses), serverAuth only."""
    if not names:
        raise ValueError("a server certificate needs at least one name")
    now = now or dt.datetime.now(dt.UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0][:64])])
    return (
        _builder(
            ca, subject=subject, public_key=key.public_key(), now=now, ttl=SERVER_CERT_LIFETIME
        )
        .add_extension(_key_usage(), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(san_entries(names)), critical=False)
        .sign(ca.key, hashes.SHA256())
    )


def san_entries(names: Sequence[str]) -> list[x509.GeneralName]:
    """Each name as an IP address entry where it parses as one, else as a DNS name."""
    entries: list[x509.GeneralName] = []
    for name in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return entries


def _builder(
    ca: CertificateAuthority,
    *,
    subject: x509.Name,
    public_key: AgentPublicKey,
    now: dt.datetime,
    ttl: dt.timedelta,
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca.cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + ttl)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
            critical=False,
        )
    )


def _key_usage() -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )
