"""GET /api/v1/pki/ca.pem: the CA certificate agents and operators pin (public)."""

from __future__ import annotations

from fastapi import APIRouter, Response

from app.api.deps import RuntimeDep

router = APIRouter(prefix="/api/v1/pki", tags=["pki"])


@router.get(
    "/ca.pem", response_class=Response, responses={200: {"content": {"application/x-pem-file": {}}}}
)
async def ca_certificate(runtime: RuntimeDep) -> Response:
    return Response(runtime.ca.cert_pem, media_type="application/x-pem-file")
