"""POST /api/v1/registration-tokens (operator)."""

from __future__ import annotations

from fastapi import APIRouter

from app.api.deps import AdminDep, ClientAddressDep, RuntimeDep, in_transaction
from app.api.problems import problems
from app.tokens import service
from app.tokens.schemas import RegistrationTokenCreate, RegistrationTokenCreated

router = APIRouter(prefix="/api/v1/registration-tokens", tags=["operators"])


@router.post(
    "",
    status_code=201,
    dependencies=[AdminDep],
    responses=problems(401, 413, 422),
)
async def create_registration_token(
    runtime: RuntimeDep, source: ClientAddressDep, body: RegistrationTokenCreate | None = None
) -> RegistrationTokenCreated:
    """Mint a single-use registration token (shown once, stored as a hash)."""
    ttl = body.ttl_seconds if body else None
    token, row = await in_transaction(
        runtime,
        lambda session: service.create_token(
            session=session, settings=runtime.settings, ttl_seconds=ttl, source=source
        ),
    )
    return RegistrationTokenCreated(token=token, expires_at=row.expires_at)
