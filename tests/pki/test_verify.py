"""Tests for pki.verify: what a presented client certificate must be to name an agent."""

from __future__ import annotations

import dataclasses
import datetime as dt
import uuid
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa, x25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from pki.authority import CertificateAuthority, load_or_create_pki
from pki.issue import BACKDATE, issue_client_certificate, issue_server_certificate
from pki.keys import AgentPublicKey, generate_agent_key, jwk_thumbprint
from pki.verify import CertificateRejected, ClientIdentity, verify_client_certificate

TTL = dt.timedelta(hours=1)


def _spki(key: object) -> bytes:
    return key.public_bytes(  # type: ignore[attr-defined, no-any-return]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _issue(
    ca: CertificateAuthority,
    *,
    agent_id: uuid.UUID | None = None,
    public_key: AgentPublicKey | None = None,
    now: dt.datetime | None = None,
    ttl: dt.timedelta = TTL,
) -> x509.Certificate:
    return issue_client_certificate(
        ca,
        agent_id=agent_id or uuid.uuid4(),
        public_key=public_key or generate_agent_key().public_key(),
        ttl=ttl,
        now=now,
    )


def _manual_cert(
    ca: CertificateAuthority,
    *,
    subject: x509.Name,
    usages: tuple[x509.ObjectIdentifier, ...] | None = (ExtendedKeyUsageOID.CLIENT_AUTH,),
    public_key: object | None = None,
) -> x509.Certificate:
    """A certificate from the CA's key that `issue_client_certificate` would never make."""
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca.cert.subject)
        .public_key(public_key or generate_agent_key().public_key())  # type: ignore[arg-type]
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + TTL)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
    )
    if usages is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage(list(usages)), critical=False)
    return builder.sign(ca.key, hashes.SHA256())


def _agent_name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Stella"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _impostor_ca(ca: CertificateAuthority, directory: Path) -> CertificateAuthority:
    """Another CA whose certificate copies our CA's subject name exactly."""
    other = load_or_create_pki(directory)
    now = dt.datetime.now(dt.UTC)
    forged = (
        x509.CertificateBuilder()
        .subject_name(ca.cert.subject)
        .issuer_name(ca.cert.subject)
        .public_key(other.key.public_key())
        .serial_number(ca.cert.serial_number)
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(other.key, hashes.SHA256())
    )
    return dataclasses.replace(other, cert=forged)


class TestVerifyClientCertificate:
    # -- accepted ---------------------------------------------------------------

    @pytest.mark.parametrize("kind", ["ec", "ed25519"])
    def test_accepts_an_agent_certificate(self, ca: CertificateAuthority, kind: str) -> None:
        agent_id = uuid.uuid4()
        key = generate_agent_key(kind).public_key()
        cert = _issue(ca, agent_id=agent_id, public_key=key)
        identity = verify_client_certificate(ca, cert)
        assert isinstance(identity, ClientIdentity)
        assert identity.agent_id == agent_id
        assert identity.key_thumbprint == jwk_thumbprint(key)
        assert identity.not_after == cert.not_valid_after_utc
        assert identity.not_after.tzinfo is not None
        assert _spki(identity.public_key) == _spki(key)

    def test_accepts_rsa_and_p384(
        self, ca: CertificateAuthority, rsa_2048_key: rsa.RSAPrivateKey
    ) -> None:
        for key in (
            rsa_2048_key.public_key(),
            ec.generate_private_key(ec.SECP384R1()).public_key(),
        ):
            identity = verify_client_certificate(ca, _issue(ca, public_key=key))
            assert identity.key_thumbprint == jwk_thumbprint(key)

    def test_accepts_after_a_round_trip_through_pem(self, ca: CertificateAuthority) -> None:
        cert = _issue(ca)
        presented = x509.load_pem_x509_certificate(cert.public_bytes(serialization.Encoding.PEM))
        assert verify_client_certificate(ca, presented) == verify_client_certificate(ca, cert)

    def test_accepts_with_a_ca_loaded_again(self, ca: CertificateAuthority) -> None:
        cert = _issue(ca)
        reloaded = load_or_create_pki(ca.files.directory)
        assert (
            verify_client_certificate(reloaded, cert).agent_id
            == verify_client_certificate(ca, cert).agent_id
        )

    def test_thumbprint_survives_renewal(self, ca: CertificateAuthority) -> None:
        key = generate_agent_key().public_key()
        agent_id = uuid.uuid4()
        first = verify_client_certificate(ca, _issue(ca, agent_id=agent_id, public_key=key))
        second = verify_client_certificate(ca, _issue(ca, agent_id=agent_id, public_key=key))
        assert first.key_thumbprint == second.key_thumbprint

    # -- validity window ---------------------------------------------------------

    def test_rejects_expired(self, ca: CertificateAuthority) -> None:
        cert = _issue(ca, now=dt.datetime.now(dt.UTC) - dt.timedelta(days=2), ttl=dt.timedelta(1))
        with pytest.raises(CertificateRejected, match="expired or not yet valid"):
            verify_client_certificate(ca, cert)

    def test_rejects_not_yet_valid(self, ca: CertificateAuthority) -> None:
        cert = _issue(ca, now=dt.datetime.now(dt.UTC) + dt.timedelta(hours=1))
        with pytest.raises(CertificateRejected, match="expired or not yet valid"):
            verify_client_certificate(ca, cert)

    def test_window_edges(self, ca: CertificateAuthority) -> None:
        cert = _issue(ca)
        second = dt.timedelta(seconds=1)
        verify_client_certificate(ca, cert, now=cert.not_valid_before_utc)
        verify_client_certificate(ca, cert, now=cert.not_valid_after_utc)
        for instant in (cert.not_valid_before_utc - second, cert.not_valid_after_utc + second):
            with pytest.raises(CertificateRejected, match="expired or not yet valid"):
                verify_client_certificate(ca, cert, now=instant)

    def test_backdate_tolerates_a_slow_clock(self, ca: CertificateAuthority) -> None:
        issued_at = dt.datetime(2026, 6, 1, 12, 0, 0, tzinfo=dt.UTC)
        cert = _issue(ca, now=issued_at)
        verify_client_certificate(ca, cert, now=issued_at - BACKDATE / 2)

    # -- not from our CA -----------------------------------------------------------

    def test_rejects_another_ca(self, ca: CertificateAuthority, tmp_path: Path) -> None:
        other = load_or_create_pki(tmp_path / "other")
        with pytest.raises(CertificateRejected, match="not issued by this CA"):
            verify_client_certificate(ca, _issue(other))

    def test_rejects_another_ca_with_the_same_subject(
        self, ca: CertificateAuthority, tmp_path: Path
    ) -> None:
        impostor = _impostor_ca(ca, tmp_path / "impostor")
        assert impostor.cert.subject == ca.cert.subject
        cert = _issue(impostor)
        assert cert.issuer == ca.cert.subject
        cert.verify_directly_issued_by(impostor.cert)
        with pytest.raises(CertificateRejected, match="signature does not verify"):
            verify_client_certificate(ca, cert)

    def test_rejects_a_self_signed_certificate_naming_our_ca(
        self, ca: CertificateAuthority
    ) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(_agent_name(str(uuid.uuid4())))
            .issuer_name(ca.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=1))
            .not_valid_after(now + TTL)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False)
            .sign(key, hashes.SHA256())
        )
        with pytest.raises(CertificateRejected, match="signature does not verify"):
            verify_client_certificate(ca, cert)

    def test_rejects_an_ed25519_signature_under_our_name(self, ca: CertificateAuthority) -> None:
        signer = ed25519.Ed25519PrivateKey.generate()
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(_agent_name(str(uuid.uuid4())))
            .issuer_name(ca.cert.subject)
            .public_key(generate_agent_key().public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=1))
            .not_valid_after(now + TTL)
            .sign(signer, None)
        )
        with pytest.raises(CertificateRejected, match="signature does not verify"):
            verify_client_certificate(ca, cert)

    def test_rejects_another_agent_id_spliced_in(self, ca: CertificateAuthority) -> None:
        agent_id, victim = uuid.uuid4(), uuid.uuid4()
        der = _issue(ca, agent_id=agent_id).public_bytes(serialization.Encoding.DER)
        assert der.count(str(agent_id).encode()) == 1
        spliced = x509.load_der_x509_certificate(
            der.replace(str(agent_id).encode(), str(victim).encode())
        )
        with pytest.raises(CertificateRejected, match="signature does not verify"):
            verify_client_certificate(ca, spliced)

    def test_rejects_a_tampered_signature(self, ca: CertificateAuthority) -> None:
        der = bytearray(_issue(ca).public_bytes(serialization.Encoding.DER))
        der[-1] ^= 0x01
        with pytest.raises(CertificateRejected, match="signature does not verify"):
            verify_client_certificate(ca, x509.load_der_x509_certificate(bytes(der)))

    # -- from our CA, but not an agent certificate ------------------------------------

    def test_rejects_the_server_certificate(self, ca: CertificateAuthority) -> None:
        cert_path, _ = ca.server_certificate_files(["localhost", "127.0.0.1"])
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        with pytest.raises(CertificateRejected, match="not for client authentication"):
            verify_client_certificate(ca, cert)

    def test_rejects_server_auth_even_with_an_agent_name(self, ca: CertificateAuthority) -> None:
        cert = issue_server_certificate(
            ca, names=[str(uuid.uuid4())], key=ec.generate_private_key(ec.SECP256R1())
        )
        with pytest.raises(CertificateRejected, match="not for client authentication"):
            verify_client_certificate(ca, cert)

    def test_rejects_no_extended_key_usage(self, ca: CertificateAuthority) -> None:
        cert = _manual_cert(ca, subject=_agent_name(str(uuid.uuid4())), usages=None)
        with pytest.raises(CertificateRejected, match="not for client authentication"):
            verify_client_certificate(ca, cert)

    def test_rejects_the_ca_certificate(self, ca: CertificateAuthority) -> None:
        with pytest.raises(CertificateRejected, match="not for client authentication"):
            verify_client_certificate(ca, ca.cert)

    @pytest.mark.parametrize(
        "common_name", ["not-a-uuid", "stella.example.com", "", "00000000-0000-0000-0000"]
    )
    def test_rejects_a_common_name_that_is_not_a_uuid(
        self, ca: CertificateAuthority, common_name: str
    ) -> None:
        if common_name:
            subject = _agent_name(common_name)
        else:
            subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Stella")])
        cert = _manual_cert(ca, subject=subject)
        cert.verify_directly_issued_by(ca.cert)
        with pytest.raises(CertificateRejected, match="does not name an agent"):
            verify_client_certificate(ca, cert)

    def test_rejects_a_key_type_we_never_certify(self, ca: CertificateAuthority) -> None:
        key = x25519.X25519PrivateKey.generate().public_key()
        cert = _manual_cert(ca, subject=_agent_name(str(uuid.uuid4())), public_key=key)
        with pytest.raises(CertificateRejected, match="unsupported key type"):
            verify_client_certificate(ca, cert)
