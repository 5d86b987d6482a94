"""Tests for pki.issue: agent client certificates and the server certificate."""

from __future__ import annotations

import datetime as dt
import ipaddress
import uuid

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from pki.authority import CertificateAuthority, load_or_create_pki
from pki.issue import (
    BACKDATE,
    SERVER_CERT_LIFETIME,
    issue_client_certificate,
    issue_server_certificate,
    san_entries,
)
from pki.keys import AgentPublicKey, generate_agent_key

# Certificates keep whole seconds: a fixed instant makes validity comparisons exact.
NOW = dt.datetime(2026, 6, 1, 12, 0, 0, tzinfo=dt.UTC)
TTL = dt.timedelta(days=7)


def _spki(key: AgentPublicKey | ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _extension_types(cert: x509.Certificate) -> set[type[x509.ExtensionType]]:
    return {type(extension.value) for extension in cert.extensions}


@pytest.fixture(params=["ec", "ed25519", "p384", "rsa"])
def agent_key(request: pytest.FixtureRequest, rsa_2048_key: rsa.RSAPrivateKey) -> AgentPublicKey:
    """Every key type an agent certificate may carry."""
    if request.param == "rsa":
        return rsa_2048_key.public_key()
    if request.param == "p384":
        return ec.generate_private_key(ec.SECP384R1()).public_key()
    return generate_agent_key(request.param).public_key()


class TestIssueClientCertificate:
    def test_names_the_agent_only(self, ca: CertificateAuthority) -> None:
        agent_id = uuid.uuid4()
        cert = issue_client_certificate(
            ca, agent_id=agent_id, public_key=generate_agent_key().public_key(), ttl=TTL
        )
        common_names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        assert [attribute.value for attribute in common_names] == [str(agent_id)]
        assert cert.subject.rfc4514_string() == f"CN={agent_id},O=Stella"

    def test_issued_by_the_ca(self, ca: CertificateAuthority, agent_key: AgentPublicKey) -> None:
        cert = issue_client_certificate(ca, agent_id=uuid.uuid4(), public_key=agent_key, ttl=TTL)
        assert cert.issuer == ca.cert.subject
        cert.verify_directly_issued_by(ca.cert)
        authority_key_id = cert.extensions.get_extension_for_class(
            x509.AuthorityKeyIdentifier
        ).value.key_identifier
        subject_key_id = ca.cert.extensions.get_extension_for_class(
            x509.SubjectKeyIdentifier
        ).value.digest
        assert authority_key_id == subject_key_id

    def test_certifies_the_given_key(
        self, ca: CertificateAuthority, agent_key: AgentPublicKey
    ) -> None:
        cert = issue_client_certificate(ca, agent_id=uuid.uuid4(), public_key=agent_key, ttl=TTL)
        assert _spki(cert.public_key()) == _spki(agent_key)  # type: ignore[arg-type]
        key_id = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        assert key_id == x509.SubjectKeyIdentifier.from_public_key(agent_key)

    def test_is_never_a_ca(self, ca: CertificateAuthority, agent_key: AgentPublicKey) -> None:
        cert = issue_client_certificate(ca, agent_id=uuid.uuid4(), public_key=agent_key, ttl=TTL)
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
        assert constraints.critical
        assert constraints.value.ca is False
        assert constraints.value.path_length is None
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage)
        assert usage.critical
        assert usage.value.digital_signature
        assert not usage.value.key_cert_sign
        assert not usage.value.crl_sign

    def test_client_auth_only(self, ca: CertificateAuthority, agent_key: AgentPublicKey) -> None:
        cert = issue_client_certificate(ca, agent_id=uuid.uuid4(), public_key=agent_key, ttl=TTL)
        usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert list(usages) == [ExtendedKeyUsageOID.CLIENT_AUTH]

    def test_no_other_extensions(self, ca: CertificateAuthority) -> None:
        cert = issue_client_certificate(
            ca, agent_id=uuid.uuid4(), public_key=generate_agent_key().public_key(), ttl=TTL
        )
        assert _extension_types(cert) == {
            x509.BasicConstraints,
            x509.KeyUsage,
            x509.ExtendedKeyUsage,
            x509.SubjectKeyIdentifier,
            x509.AuthorityKeyIdentifier,
        }

    @pytest.mark.parametrize(
        "ttl", [dt.timedelta(minutes=5), dt.timedelta(hours=1), dt.timedelta(days=90)]
    )
    def test_validity_is_the_ttl(self, ca: CertificateAuthority, ttl: dt.timedelta) -> None:
        cert = issue_client_certificate(
            ca,
            agent_id=uuid.uuid4(),
            public_key=generate_agent_key().public_key(),
            ttl=ttl,
            now=NOW,
        )
        assert cert.not_valid_before_utc == NOW - dt.timedelta(minutes=1)
        assert cert.not_valid_after_utc == NOW + ttl
        assert cert.not_valid_after_utc - cert.not_valid_before_utc == ttl + BACKDATE

    def test_now_defaults_to_the_clock(self, ca: CertificateAuthority) -> None:
        before = dt.datetime.now(dt.UTC).replace(microsecond=0)
        cert = issue_client_certificate(
            ca, agent_id=uuid.uuid4(), public_key=generate_agent_key().public_key(), ttl=TTL
        )
        after = dt.datetime.now(dt.UTC)
        assert before - BACKDATE <= cert.not_valid_before_utc <= after - BACKDATE
        assert before + TTL <= cert.not_valid_after_utc <= after + TTL

    def test_serial_numbers_are_unique(self, ca: CertificateAuthority) -> None:
        key = generate_agent_key().public_key()
        agent_id = uuid.uuid4()
        serials = {
            issue_client_certificate(ca, agent_id=agent_id, public_key=key, ttl=TTL).serial_number
            for _ in range(5)
        }
        assert len(serials) == 5

    def test_renewal_for_the_same_key_keeps_the_key(self, ca: CertificateAuthority) -> None:
        key = generate_agent_key("ed25519").public_key()
        agent_id = uuid.uuid4()
        first = issue_client_certificate(ca, agent_id=agent_id, public_key=key, ttl=TTL)
        second = issue_client_certificate(ca, agent_id=agent_id, public_key=key, ttl=TTL)
        assert first != second
        assert _spki(first.public_key()) == _spki(second.public_key())  # type: ignore[arg-type]

    def test_another_ca_does_not_verify(
        self, ca: CertificateAuthority, tmp_path_factory: pytest.TempPathFactory
    ) -> None:
        other = load_or_create_pki(tmp_path_factory.mktemp("other"))
        cert = issue_client_certificate(
            other, agent_id=uuid.uuid4(), public_key=generate_agent_key().public_key(), ttl=TTL
        )
        with pytest.raises(ValueError):  # noqa: PT011 (cryptography: issuer name mismatch)
            cert.verify_directly_issued_by(ca.cert)


class TestIssueServerCertificate:
    def test_server_certificate(self, ca: CertificateAuthority) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = issue_server_certificate(
            ca, names=["stella.example.com", "10.1.2.3", "fd00::1"], key=key, now=NOW
        )
        cert.verify_directly_issued_by(ca.cert)
        assert cert.issuer == ca.cert.subject
        assert cert.subject.rfc4514_string() == "CN=stella.example.com"
        assert _spki(cert.public_key()) == _spki(key.public_key())  # type: ignore[arg-type]
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.DNSName) == ["stella.example.com"]
        assert san.get_values_for_type(x509.IPAddress) == [
            ipaddress.ip_address("10.1.2.3"),
            ipaddress.ip_address("fd00::1"),
        ]
        usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert list(usages) == [ExtendedKeyUsageOID.SERVER_AUTH]
        assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
        assert not cert.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
        assert cert.not_valid_before_utc == NOW - BACKDATE
        assert cert.not_valid_after_utc == NOW + SERVER_CERT_LIFETIME

    def test_long_first_name_is_cut_to_64_characters_in_the_cn(
        self, ca: CertificateAuthority
    ) -> None:
        long_name = ".".join(["a" * 30] * 4) + ".example.com"
        cert = issue_server_certificate(
            ca, names=[long_name], key=ec.generate_private_key(ec.SECP256R1())
        )
        common_name = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
        assert common_name == long_name[:64]
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.DNSName) == [long_name]

    def test_needs_a_name(self, ca: CertificateAuthority) -> None:
        with pytest.raises(ValueError, match="at least one name"):
            issue_server_certificate(ca, names=[], key=ec.generate_private_key(ec.SECP256R1()))


class TestSanEntries:
    def test_ip_addresses_and_dns_names(self) -> None:
        assert san_entries(["localhost", "127.0.0.1", "::1", "stella.internal"]) == [
            x509.DNSName("localhost"),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            x509.IPAddress(ipaddress.ip_address("::1")),
            x509.DNSName("stella.internal"),
        ]

    def test_not_quite_ip_addresses_are_dns_names(self) -> None:
        assert san_entries(["127.0.0.256", "1.2.3"]) == [
            x509.DNSName("127.0.0.256"),
            x509.DNSName("1.2.3"),
        ]

    def test_empty(self) -> None:
        assert san_entries([]) == []
