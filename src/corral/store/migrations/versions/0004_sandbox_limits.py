"""security: per-sandbox model limits (the orchestrator's budgets, enforced by the proxy)

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "security_sandbox_limits",
        sa.Column("sandbox_id", sa.String(64), primary_key=True),
        sa.Column("task_id", sa.String(64), index=True),
        sa.Column("token_limit", sa.Integer),
        sa.Column("cost_limit", sa.Float),
        sa.Column("token_label", sa.Text),
        sa.Column("cost_label", sa.Text),
        sa.Column("refusals", sa.Integer, nullable=False),
        sa.Column("last_refusal", sa.Text),
        sa.Column("taken_id", sa.Integer, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("security_sandbox_limits")
