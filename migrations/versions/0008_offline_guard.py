"""mass-offline guard

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-30 06:10:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import app.models.types

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("sweep_marks", schema=None) as batch_op:
        batch_op.add_column(sa.Column("guard_reason", sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column("guard_since", app.models.types.UTCDateTime(), nullable=True))
        batch_op.add_column(sa.Column("guard_held", sa.Integer(), nullable=True))
        batch_op.add_column(
            sa.Column("guard_outages", sa.Integer(), server_default="0", nullable=False)
        )
        batch_op.add_column(
            sa.Column("guard_percent_trips", sa.Integer(), server_default="0", nullable=False)
        )


def downgrade() -> None:
    with op.batch_alter_table("sweep_marks", schema=None) as batch_op:
        batch_op.drop_column("guard_percent_trips")
        batch_op.drop_column("guard_outages")
        batch_op.drop_column("guard_held")
        batch_op.drop_column("guard_since")
        batch_op.drop_column("guard_reason")
