"""lockout-proof renewal: the proof-of-possession challenges spent

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-30 06:10:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel  # noqa: F401  (autogenerate writes sqlmodel.sql.sqltypes.AutoString)
from alembic import op

import app.models.types  # noqa: F401  (UTCDateTime)

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "recovery_challenges",
        sa.Column("nonce", sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
        sa.Column("agent_id", sa.Uuid(), nullable=False),
        sa.Column("expires_at", app.models.types.UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("nonce"),
    )
    with op.batch_alter_table("recovery_challenges", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_recovery_challenges_expires_at"), ["expires_at"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("recovery_challenges", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_recovery_challenges_expires_at"))

    op.drop_table("recovery_challenges")
