"""signed tasks and signed receipts

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30 06:10:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel  # noqa: F401  (autogenerate writes sqlmodel.sql.sqltypes.AutoString)
from alembic import op

import app.models.types  # noqa: F401  (UTCDateTime)
from sqlalchemy.dialects import postgresql

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("tasks", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column(
                "signature",
                sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
                nullable=True,
            )
        )
    op.create_table(
        "task_receipts",
        sa.Column("task_id", sa.Uuid(), nullable=False),
        sa.Column("agent_id", sa.Uuid(), nullable=False),
        sa.Column("signed", sa.Text(), nullable=False),
        sa.Column("signature", sa.Text(), nullable=False),
        sa.Column("algorithm", sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
        sa.Column("certificate_pem", sa.Text(), nullable=False),
        sa.Column("received_at", app.models.types.UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("task_id"),
    )
    with op.batch_alter_table("task_receipts", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_task_receipts_agent_id"), ["agent_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("task_receipts", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_task_receipts_agent_id"))
    op.drop_table("task_receipts")
    with op.batch_alter_table("tasks", schema=None) as batch_op:
        batch_op.drop_column("signature")
