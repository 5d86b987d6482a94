"""outcome unknown for non-idempotent tasks

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-30 06:10:00

No schema change: `unknown` is one more value of tasks.status (a string of up
to 16 characters, unconstrained), and which task types are idempotent is a
declaration in code (app/tasks/types.py), not data. The revision keeps its
place in the chain.
"""

from collections.abc import Sequence

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
