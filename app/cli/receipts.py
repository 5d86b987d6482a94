"""`stella receipts get|verify`: an agent's signed receipt for a task, and its offline check.

`get` fetches `GET /api/v1/tasks/{id}/receipt` (operator API) and prints it as
JSON, to keep as evidence. `verify FILE` needs no server: the receipt's
signature must verify with the key of the agent certificate it carries, that
certificate must be issued by the CA certificate it carries (compare that one
with the CA you trust) and name the receipt's agent, and the readable fields
must be exactly the signed ones. Exit 0 "valid", 1 "invalid: <reason>", 2 an
unreadable file.
"""

from __future__ import annotations

import base64
import binascii
import json
from pathlib import Path
from typing import Annotated, Any

import typer
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.x509.oid import NameOID

from app.cli import render
from app.cli.options import (
    AdminTokenFileOpt,
    AdminTokenOpt,
    CaOpt,
    ServerOpt,
    operator_api,
)

cli = typer.Typer(help="Agents' signed task receipts.", no_args_is_help=True)

EXIT_INVALID = 1
EXIT_UNREADABLE = 2
_FIELDS = ("taskId", "agentId", "outcome", "resultDigest", "logsDigest", "startedAt", "finishedAt")


class Invalid(Exception):
    """The receipt does not prove what it says; the message says why."""


@cli.command("get")
def get(
    task_id: Annotated[str, typer.Argument(help="The task's id.")],
    server: ServerOpt = None,
    ca: CaOpt = None,
    admin_token: AdminTokenOpt = None,
    admin_token_file: AdminTokenFileOpt = None,
) -> None:
    """Print a task's receipt as JSON (save it to check it later with `verify`)."""
    with operator_api(server, ca, admin_token, admin_token_file) as api:
        document = api.get(f"/api/v1/tasks/{task_id}/receipt")
    render.print_json(document)


@cli.command("verify")
def verify(
    file: Annotated[Path, typer.Argument(help="A receipt as `get` or the API returned it.")],
) -> None:
    """Check a saved receipt offline: signature, certificate chain and agent."""
    try:
        document = json.loads(file.read_text())
        if not isinstance(document, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError, RecursionError) as exc:
        typer.echo(f"error: cannot read {file}: {exc}", err=True)
        raise typer.Exit(EXIT_UNREADABLE) from exc
    try:
        fields = check(document)
    except Invalid as exc:
        typer.echo(f"invalid: {exc}")
        raise typer.Exit(EXIT_INVALID) from exc
    typer.echo(
        f"valid: task {fields['taskId']} {fields['outcome']} on agent {fields['agentId']}, "
        f"finished {fields['finishedAt']}"
    )


def check(document: dict[str, Any]) -> dict[str, Any]:
    """The signed fields of a receipt that holds up; `Invalid` says why one does not."""
    try:
        signed = _b64decode(_text(document, "signed"))
        signature = _b64decode(_text(document, "signature"))
        certificate = x509.load_pem_x509_certificate(_text(document, "certificate").encode())
        ca = x509.load_pem_x509_certificate(_text(document, "caCertificate").encode())
        fields = json.loads(signed)
    except (ValueError, binascii.Error, UnicodeDecodeError, RecursionError) as exc:
        raise Invalid(f"malformed receipt: {exc}") from exc
    if not isinstance(fields, dict) or fields.get("v") != 1:
        raise Invalid("the signed bytes are not a version 1 receipt")
    _check_chain(certificate, ca)
    names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    common_name = str(names[0].value) if names else ""
    if common_name != fields.get("agentId") or common_name != document.get("agentId"):
        raise Invalid(
            f"the certificate names agent {common_name!r}, the receipt {fields.get('agentId')!r}"
        )
    _check_signature(certificate, _text(document, "algorithm"), signature, signed)
    if fields.get("taskId") != document.get("taskId"):
        raise Invalid("the signed task id is not the receipt's task id")
    readable = document.get("receipt")
    if readable is not None:
        differing = sorted(
            name for name in {*_FIELDS, *readable} if readable.get(name) != fields.get(name)
        )
        if differing:
            raise Invalid(f"fields differ from what was signed: {', '.join(differing)}")
    return fields


def _check_chain(certificate: x509.Certificate, ca: x509.Certificate) -> None:
    try:
        constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is None or not constraints.ca:
        raise Invalid("the CA certificate is not a CA")
    try:
        if certificate.issuer != ca.subject:
            raise ValueError("issuer differs")
        certificate.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise Invalid("the agent certificate was not issued by the CA certificate") from exc


def _check_signature(
    certificate: x509.Certificate, algorithm: str, signature: bytes, signed: bytes
) -> None:
    key = certificate.public_key()
    try:
        if isinstance(key, ec.EllipticCurvePublicKey) and algorithm == "ES256":
            key.verify(signature, signed, ec.ECDSA(hashes.SHA256()))
        elif isinstance(key, ed25519.Ed25519PublicKey) and algorithm == "EdDSA":
            key.verify(signature, signed)
        elif isinstance(key, rsa.RSAPublicKey) and algorithm == "RS256":
            key.verify(signature, signed, padding.PKCS1v15(), hashes.SHA256())
        else:
            raise Invalid(f"algorithm {algorithm!r} does not fit the certificate's key")
    except InvalidSignature as exc:
        raise Invalid("the signature does not verify with the agent certificate's key") from exc


def _text(document: dict[str, Any], name: str) -> str:
    value = document.get(name)
    if not isinstance(value, str):
        raise ValueError(f"{name} is missing")
    return value


def _b64decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
