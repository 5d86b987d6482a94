"""Tests for pki.csr: which PKCS#10 requests we certify, and what we take from them."""

from __future__ import annotations

import base64
import datetime as dt
import textwrap
import uuid

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from pki.authority import CertificateAuthority
from pki.csr import MAX_CSR_BYTES, CsrError, public_key_from_csr
from pki.issue import issue_client_certificate
from pki.keys import private_key_pem
from pki.verify import verify_client_certificate

SigningKey = (
    ec.EllipticCurvePrivateKey
    | ed25519.Ed25519PrivateKey
    | ed448.Ed448PrivateKey
    | rsa.RSAPrivateKey
)

SUBJECT_CN = "tamper-me-please"


def _csr(
    key: SigningKey,
    *,
    common_name: str = SUBJECT_CN,
    extensions: tuple[tuple[x509.ExtensionType, bool], ...] = (),
) -> x509.CertificateSigningRequest:
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    )
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical=critical)
    algorithm = (
        None
        if isinstance(key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey)
        else hashes.SHA256()
    )
    return builder.sign(key, algorithm)


def _pem(csr: x509.CertificateSigningRequest) -> str:
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def _der(csr: x509.CertificateSigningRequest) -> bytes:
    return csr.public_bytes(serialization.Encoding.DER)


def _armor(der: bytes, label: str = "CERTIFICATE REQUEST") -> str:
    body = "\n".join(textwrap.wrap(base64.b64encode(der).decode(), 64))
    return f"-----BEGIN {label}-----\n{body}\n-----END {label}-----\n"


def _spki(key: object) -> bytes:
    return key.public_bytes(  # type: ignore[attr-defined, no-any-return]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@pytest.fixture(scope="module")
def rsa_1024_key() -> rsa.RSAPrivateKey:
    # The weak key is the point: it must be refused.
    return rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505


@pytest.fixture
def p256_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


class TestPublicKeyFromCsr:
    # -- accepted ---------------------------------------------------------------

    @pytest.mark.parametrize("curve", [ec.SECP256R1(), ec.SECP384R1()], ids=["P-256", "P-384"])
    def test_accepts_ec(self, curve: ec.EllipticCurve) -> None:
        key = ec.generate_private_key(curve)
        public = public_key_from_csr(_pem(_csr(key)))
        assert isinstance(public, ec.EllipticCurvePublicKey)
        assert public == key.public_key()

    def test_accepts_ed25519(self) -> None:
        key = ed25519.Ed25519PrivateKey.generate()
        public = public_key_from_csr(_pem(_csr(key)))
        assert isinstance(public, ed25519.Ed25519PublicKey)
        assert public == key.public_key()

    def test_accepts_rsa_2048(self, rsa_2048_key: rsa.RSAPrivateKey) -> None:
        public = public_key_from_csr(_pem(_csr(rsa_2048_key)))
        assert isinstance(public, rsa.RSAPublicKey)
        assert public.public_numbers() == rsa_2048_key.public_key().public_numbers()

    def test_accepts_surrounding_whitespace(self, p256_key: ec.EllipticCurvePrivateKey) -> None:
        pem = "\n  " + _pem(_csr(p256_key)) + "\n\n"
        assert _spki(public_key_from_csr(pem)) == _spki(p256_key.public_key())

    def test_accepts_crlf_line_endings(self, p256_key: ec.EllipticCurvePrivateKey) -> None:
        pem = _pem(_csr(p256_key)).replace("\n", "\r\n")
        assert _spki(public_key_from_csr(pem)) == _spki(p256_key.public_key())

    # -- not a CSR ----------------------------------------------------------------

    @pytest.mark.parametrize(
        "text",
        [
            pytest.param("", id="empty"),
            pytest.param("hello", id="text"),
            pytest.param("MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA", id="bare-base64"),
        ],
    )
    def test_not_pem(self, text: str) -> None:
        with pytest.raises(CsrError, match="exactly one PEM block"):
            public_key_from_csr(text)

    def test_raw_der_is_not_pem(self, p256_key: ec.EllipticCurvePrivateKey) -> None:
        der = _der(_csr(p256_key))
        with pytest.raises(CsrError):
            public_key_from_csr(der.decode("latin-1"))

    @pytest.mark.parametrize(
        "body",
        [
            pytest.param("Z2FyYmFnZQ==", id="base64-garbage"),
            pytest.param("!!!! not base64 ????", id="not-base64"),
            pytest.param("", id="empty-body"),
        ],
    )
    def test_garbage_inside_armor(self, body: str) -> None:
        pem = f"-----BEGIN CERTIFICATE REQUEST-----\n{body}\n-----END CERTIFICATE REQUEST-----\n"
        with pytest.raises(CsrError, match="not a valid"):
            public_key_from_csr(pem)

    def test_truncated(self, p256_key: ec.EllipticCurvePrivateKey) -> None:
        der = _der(_csr(p256_key))
        with pytest.raises(CsrError):
            public_key_from_csr(_armor(der[: len(der) // 2]))

    def test_certificate_instead_of_csr(self, ca: CertificateAuthority) -> None:
        with pytest.raises(CsrError, match="CERTIFICATE REQUEST"):
            public_key_from_csr(ca.cert_pem)

    def test_certificate_der_in_csr_armor(self, ca: CertificateAuthority) -> None:
        der = ca.cert.public_bytes(serialization.Encoding.DER)
        with pytest.raises(CsrError, match="not a valid"):
            public_key_from_csr(_armor(der))

    def test_private_key_instead_of_csr(self, p256_key: ec.EllipticCurvePrivateKey) -> None:
        with pytest.raises(CsrError, match="CERTIFICATE REQUEST"):
            public_key_from_csr(private_key_pem(p256_key))

    # -- broken signature ----------------------------------------------------------

    @pytest.mark.parametrize("kind", ["ec", "ed25519"])
    def test_tampered_signature(self, kind: str) -> None:
        key: SigningKey = (
            ec.generate_private_key(ec.SECP256R1())
            if kind == "ec"
            else ed25519.Ed25519PrivateKey.generate()
        )
        der = bytearray(_der(_csr(key)))
        der[-1] ^= 0x01  # last byte of the signature BIT STRING
        with pytest.raises(CsrError, match="signature does not verify"):
            public_key_from_csr(_armor(bytes(der)))

    @pytest.mark.parametrize("kind", ["ec", "ed25519"])
    def test_tampered_subject(self, kind: str) -> None:
        key: SigningKey = (
            ec.generate_private_key(ec.SECP256R1())
            if kind == "ec"
            else ed25519.Ed25519PrivateKey.generate()
        )
        der = _der(_csr(key))
        assert der.count(SUBJECT_CN.encode()) == 1
        tampered = der.replace(SUBJECT_CN.encode(), b"tamper-me-pleasf")
        assert x509.load_der_x509_csr(tampered).subject != _csr(key).subject
        with pytest.raises(CsrError, match="signature does not verify"):
            public_key_from_csr(_armor(tampered))

    def test_tampered_public_key(self, p256_key: ec.EllipticCurvePrivateKey) -> None:
        # Someone else's public key spliced into a request signed by ours.
        other = ec.generate_private_key(ec.SECP256R1())
        der = _der(_csr(p256_key))
        ours, theirs = _spki(p256_key.public_key()), _spki(other.public_key())
        assert len(ours) == len(theirs)
        with pytest.raises(CsrError, match="signature does not verify"):
            public_key_from_csr(_armor(der.replace(ours, theirs)))

    @pytest.mark.parametrize(
        "algorithm",
        [
            pytest.param("06082a8648ce3d040301", id="ecdsa-with-SHA224"),
            pytest.param("06082a8648ce3d040309", id="unknown-oid"),
        ],
    )
    def test_signature_algorithm_swapped(
        self, p256_key: ec.EllipticCurvePrivateKey, algorithm: str
    ) -> None:
        der = _der(_csr(p256_key))
        ecdsa_with_sha256 = bytes.fromhex("06082a8648ce3d040302")  # OID 1.2.840.10045.4.3.2
        assert der.count(ecdsa_with_sha256) == 1
        swapped = der.replace(ecdsa_with_sha256, bytes.fromhex(algorithm))
        with pytest.raises(CsrError, match="signature does not verify"):
            public_key_from_csr(_armor(swapped))

    # -- key types we do not certify -----------------------------------------------

    def test_rsa_1024(self, rsa_1024_key: rsa.RSAPrivateKey) -> None:
        with pytest.raises(CsrError, match="at least 2048 bits"):
            public_key_from_csr(_pem(_csr(rsa_1024_key)))

    @pytest.mark.parametrize(
        "curve",
        [ec.SECP521R1(), ec.SECP256K1(), ec.BrainpoolP256R1(), ec.SECP224R1()],
        ids=lambda curve: curve.name,
    )
    def test_curve_not_allowed(self, curve: ec.EllipticCurve) -> None:
        key = ec.generate_private_key(curve)
        with pytest.raises(CsrError, match=f"EC curve {curve.name} is not allowed"):
            public_key_from_csr(_pem(_csr(key)))

    def test_ed448(self) -> None:
        with pytest.raises(CsrError, match="CSR key must be"):
            public_key_from_csr(_pem(_csr(ed448.Ed448PrivateKey.generate())))

    def test_unknown_key_algorithm(self, p256_key: ec.EllipticCurvePrivateKey) -> None:
        der = _der(_csr(p256_key))
        ec_public_key = bytes.fromhex("06072a8648ce3d0201")  # OID 1.2.840.10045.2.1
        assert der.count(ec_public_key) == 1
        unknown = der.replace(ec_public_key, bytes.fromhex("06072a8648ce3d0205"))
        with pytest.raises(CsrError, match="unsupported public key"):
            public_key_from_csr(_armor(unknown))

    def test_unknown_curve(self, p256_key: ec.EllipticCurvePrivateKey) -> None:
        der = _der(_csr(p256_key))
        p256 = bytes.fromhex("06082a8648ce3d030107")  # OID 1.2.840.10045.3.1.7
        assert der.count(p256) == 1
        unknown = der.replace(p256, bytes.fromhex("06082a8648ce3d030163"))
        with pytest.raises(CsrError, match="unsupported public key"):
            public_key_from_csr(_armor(unknown))

    # -- more than one PEM block, too large ------------------------------------------

    def test_two_csrs(self, p256_key: ec.EllipticCurvePrivateKey) -> None:
        other = ec.generate_private_key(ec.SECP256R1())
        with pytest.raises(CsrError, match="exactly one PEM block"):
            public_key_from_csr(_pem(_csr(p256_key)) + _pem(_csr(other)))

    @pytest.mark.parametrize("key_first", [False, True], ids=["csr-then-key", "key-then-csr"])
    def test_csr_with_private_key(
        self, p256_key: ec.EllipticCurvePrivateKey, key_first: bool
    ) -> None:
        parts = [_pem(_csr(p256_key)), private_key_pem(p256_key)]
        if key_first:
            parts.reverse()
        with pytest.raises(CsrError, match="exactly one PEM block"):
            public_key_from_csr("".join(parts))

    def test_csr_with_certificate(
        self, ca: CertificateAuthority, p256_key: ec.EllipticCurvePrivateKey
    ) -> None:
        with pytest.raises(CsrError, match="exactly one PEM block"):
            public_key_from_csr(ca.cert_pem + _pem(_csr(p256_key)))

    def test_one_megabyte(self, p256_key: ec.EllipticCurvePrivateKey) -> None:
        pem = _pem(_csr(p256_key)) + "\n" * (1024 * 1024)
        with pytest.raises(CsrError, match="larger than"):
            public_key_from_csr(pem)

    def test_one_megabyte_of_garbage(self) -> None:
        with pytest.raises(CsrError, match="larger than"):
            public_key_from_csr("A" * (1024 * 1024))

    def test_size_limit_is_inclusive(self, p256_key: ec.EllipticCurvePrivateKey) -> None:
        pem = _pem(_csr(p256_key))
        padded = pem + "\n" * (MAX_CSR_BYTES - len(pem))
        assert _spki(public_key_from_csr(padded)) == _spki(p256_key.public_key())
        with pytest.raises(CsrError, match="larger than"):
            public_key_from_csr(padded + "\n")

    # -- the CSR contributes its public key and nothing else -----------------------

    def test_requested_names_and_powers_are_ignored(
        self, ca: CertificateAuthority, p256_key: ec.EllipticCurvePrivateKey
    ) -> None:
        agent_id = uuid.uuid4()
        impersonated = uuid.uuid4()
        csr = _csr(
            p256_key,
            common_name=str(impersonated),
            extensions=(
                (
                    x509.SubjectAlternativeName(
                        [
                            x509.UniformResourceIdentifier("spiffe://stella/admin"),
                            x509.DNSName("stella.example.com"),
                        ]
                    ),
                    False,
                ),
                (x509.BasicConstraints(ca=True, path_length=None), True),
                (
                    x509.ExtendedKeyUsage(
                        [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CODE_SIGNING]
                    ),
                    False,
                ),
                (
                    x509.KeyUsage(
                        digital_signature=True,
                        content_commitment=True,
                        key_encipherment=True,
                        data_encipherment=True,
                        key_agreement=False,
                        key_cert_sign=True,
                        crl_sign=True,
                        encipher_only=False,
                        decipher_only=False,
                    ),
                    True,
                ),
            ),
        )
        public_key = public_key_from_csr(_pem(csr))
        cert = issue_client_certificate(
            ca, agent_id=agent_id, public_key=public_key, ttl=dt.timedelta(days=1)
        )

        assert cert.subject == x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Stella"),
                x509.NameAttribute(NameOID.COMMON_NAME, str(agent_id)),
            ]
        )
        assert str(impersonated) not in cert.subject.rfc4514_string()
        with pytest.raises(x509.ExtensionNotFound):
            cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
        usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert list(usages) == [ExtendedKeyUsageOID.CLIENT_AUTH]
        key_usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
        assert not key_usage.key_cert_sign
        assert not key_usage.crl_sign
        assert _spki(cert.public_key()) == _spki(p256_key.public_key())
        cert.verify_directly_issued_by(ca.cert)
        assert verify_client_certificate(ca, cert).agent_id == agent_id
