"""Tests for pki.keys: key generation, PEM I/O and RFC 7638 thumbprints."""

from __future__ import annotations

import base64
import hashlib
import json

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa, x25519

from pki.keys import (
    generate_agent_key,
    jwk_thumbprint,
    load_public_key_pem,
    private_key_pem,
    public_key_pem,
)

# RFC 7638 section 3.1: the example RSA key and its published SHA-256 thumbprint.
RFC7638_N = (
    "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_B"
    "JECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_F"
    "DW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4"
    "vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw"
)
RFC7638_E = "AQAB"
RFC7638_THUMBPRINT = "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"

# RFC 8037 appendix A.2/A.3: the example Ed25519 public key and its thumbprint.
RFC8037_X = "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"
RFC8037_THUMBPRINT = "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"


def _b64url_decode(value: str) -> bytes:
    return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _reference_ec_thumbprint(key: ec.EllipticCurvePublicKey, crv: str, size: int) -> str:
    """RFC 7638 written out independently: required members, sorted, no whitespace."""
    numbers = key.public_numbers()
    jwk = {
        "crv": crv,
        "kty": "EC",
        "x": _b64url(numbers.x.to_bytes(size, "big")),
        "y": _b64url(numbers.y.to_bytes(size, "big")),
    }
    canonical = json.dumps(jwk, separators=(",", ":"), sort_keys=True).encode()
    return _b64url(hashlib.sha256(canonical).digest())


class TestGenerateAgentKey:
    def test_default_is_p256(self) -> None:
        key = generate_agent_key()
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        assert isinstance(key.curve, ec.SECP256R1)

    def test_ec_is_p256(self) -> None:
        key = generate_agent_key("ec")
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        assert key.curve.name == "secp256r1"
        assert key.key_size == 256

    def test_ed25519(self) -> None:
        key = generate_agent_key("ed25519")
        assert isinstance(key, ed25519.Ed25519PrivateKey)

    def test_each_call_makes_a_new_key(self) -> None:
        first, second = generate_agent_key(), generate_agent_key()
        assert jwk_thumbprint(first.public_key()) != jwk_thumbprint(second.public_key())

    @pytest.mark.parametrize("kind", ["rsa", "EC", "p384", ""])
    def test_unknown_kind(self, kind: str) -> None:
        with pytest.raises(ValueError, match="unsupported key kind"):
            generate_agent_key(kind)


class TestPrivateKeyPem:
    @pytest.mark.parametrize("kind", ["ec", "ed25519"])
    def test_unencrypted_pkcs8_round_trip(self, kind: str) -> None:
        key = generate_agent_key(kind)
        pem = private_key_pem(key)
        assert pem.startswith("-----BEGIN PRIVATE KEY-----\n")
        loaded = serialization.load_pem_private_key(pem.encode(), password=None)
        assert public_key_pem(loaded.public_key()) == public_key_pem(key.public_key())  # type: ignore[arg-type]


class TestPublicKeyPem:
    @pytest.mark.parametrize("kind", ["ec", "ed25519"])
    def test_subject_public_key_info(self, kind: str) -> None:
        key = generate_agent_key(kind).public_key()
        pem = public_key_pem(key)
        assert pem.startswith("-----BEGIN PUBLIC KEY-----\n")
        assert serialization.load_pem_public_key(pem.encode()) == key

    def test_never_contains_private_material(self) -> None:
        key = generate_agent_key()
        assert "PRIVATE" not in public_key_pem(key.public_key())


class TestLoadPublicKeyPem:
    @pytest.mark.parametrize("kind", ["ec", "ed25519"])
    def test_round_trip(self, kind: str) -> None:
        key = generate_agent_key(kind).public_key()
        assert load_public_key_pem(public_key_pem(key)) == key

    def test_rsa_round_trip(self, rsa_2048_key: rsa.RSAPrivateKey) -> None:
        key = rsa_2048_key.public_key()
        loaded = load_public_key_pem(public_key_pem(key))
        assert isinstance(loaded, rsa.RSAPublicKey)
        assert loaded.public_numbers() == key.public_numbers()

    def test_refuses_key_types_never_certified(self) -> None:
        pem = (
            x25519.X25519PrivateKey.generate()
            .public_key()
            .public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            .decode()
        )
        with pytest.raises(ValueError, match="unsupported public key type"):
            load_public_key_pem(pem)

    def test_refuses_garbage(self) -> None:
        with pytest.raises(ValueError):  # noqa: PT011 (cryptography's own message)
            load_public_key_pem(
                "-----BEGIN PUBLIC KEY-----\nZ2FyYmFnZQ==\n-----END PUBLIC KEY-----\n"
            )


class TestJwkThumbprint:
    def test_rfc7638_rsa_example(self) -> None:
        numbers = rsa.RSAPublicNumbers(
            e=int.from_bytes(_b64url_decode(RFC7638_E), "big"),
            n=int.from_bytes(_b64url_decode(RFC7638_N), "big"),
        )
        assert numbers.e == 65537
        assert jwk_thumbprint(numbers.public_key()) == RFC7638_THUMBPRINT

    def test_rfc8037_ed25519_example(self) -> None:
        key = ed25519.Ed25519PublicKey.from_public_bytes(_b64url_decode(RFC8037_X))
        assert jwk_thumbprint(key) == RFC8037_THUMBPRINT

    def test_is_base64url_sha256_without_padding(self) -> None:
        thumbprint = jwk_thumbprint(generate_agent_key().public_key())
        assert len(thumbprint) == 43
        assert "=" not in thumbprint
        assert len(_b64url_decode(thumbprint)) == 32

    @pytest.mark.parametrize("kind", ["ec", "ed25519"])
    def test_stable_across_reserialization(self, kind: str) -> None:
        key = generate_agent_key(kind)
        reloaded_from_private = serialization.load_pem_private_key(
            private_key_pem(key).encode(), password=None
        ).public_key()
        reloaded_from_public = load_public_key_pem(public_key_pem(key.public_key()))
        der = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        reloaded_from_der = serialization.load_der_public_key(der)
        expected = jwk_thumbprint(key.public_key())
        assert jwk_thumbprint(reloaded_from_private) == expected  # type: ignore[arg-type]
        assert jwk_thumbprint(reloaded_from_public) == expected
        assert jwk_thumbprint(reloaded_from_der) == expected  # type: ignore[arg-type]

    def test_ec_point_compression_does_not_matter(self) -> None:
        key = generate_agent_key().public_key()
        assert isinstance(key, ec.EllipticCurvePublicKey)
        compressed = key.public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.CompressedPoint
        )
        decompressed = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), compressed)
        assert jwk_thumbprint(decompressed) == jwk_thumbprint(key)

    @pytest.mark.parametrize("kind", ["ec", "ed25519"])
    def test_differs_between_keys(self, kind: str) -> None:
        thumbprints = {jwk_thumbprint(generate_agent_key(kind).public_key()) for _ in range(5)}
        assert len(thumbprints) == 5

    def test_ec_and_ed25519_never_collide_in_form(self) -> None:
        ec_key = generate_agent_key("ec").public_key()
        ed_key = generate_agent_key("ed25519").public_key()
        assert jwk_thumbprint(ec_key) != jwk_thumbprint(ed_key)

    def test_p256_matches_reference(self) -> None:
        key = generate_agent_key().public_key()
        assert isinstance(key, ec.EllipticCurvePublicKey)
        assert jwk_thumbprint(key) == _reference_ec_thumbprint(key, "P-256", 32)

    def test_p384_matches_reference(self) -> None:
        key = ec.generate_private_key(ec.SECP384R1()).public_key()
        assert jwk_thumbprint(key) == _reference_ec_thumbprint(key, "P-384", 48)

    def test_ec_coordinates_keep_leading_zero_bytes(self) -> None:
        # RFC 7518 6.2.1.2: x and y are the full field size, even when the
        # integer is shorter. Find a (deterministic) key whose x needs padding.
        scalar = 1
        while True:
            key = ec.derive_private_key(scalar, ec.SECP256R1()).public_key()
            if key.public_numbers().x.bit_length() <= 248:
                break
            scalar += 1
        short = key.public_numbers().x.to_bytes(31, "big")
        unpadded = json.dumps(
            {
                "crv": "P-256",
                "kty": "EC",
                "x": _b64url(short),
                "y": _b64url(key.public_numbers().y.to_bytes(32, "big")),
            },
            separators=(",", ":"),
        ).encode()
        assert jwk_thumbprint(key) == _reference_ec_thumbprint(key, "P-256", 32)
        assert jwk_thumbprint(key) != _b64url(hashlib.sha256(unpadded).digest())

    def test_rsa_stable_across_reserialization(self, rsa_2048_key: rsa.RSAPrivateKey) -> None:
        key = rsa_2048_key.public_key()
        reloaded = load_public_key_pem(public_key_pem(key))
        assert jwk_thumbprint(reloaded) == jwk_thumbprint(key)
