"""security: approvals, remembered approvals, model usage

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "security_approvals",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("sandbox_id", sa.String(64), nullable=False, index=True),
        sa.Column("task_id", sa.String(64), index=True),
        sa.Column("summary", sa.Text, nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("status", sa.String(16), nullable=False, index=True),
        sa.Column("request", sa.JSON, nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("expires_at", TS, nullable=False),
        sa.Column("decided_at", TS),
        sa.Column("actor", sa.String(128)),
        sa.Column("decision_reason", sa.Text),
        sa.Column("remember", sa.Boolean, nullable=False),
    )
    op.create_table(
        "security_remembered",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("sandbox_id", sa.String(64), nullable=False, index=True),
        sa.Column("task_id", sa.String(64), index=True),
        sa.Column("method", sa.String(32), nullable=False),
        sa.Column("host", sa.String(255), nullable=False),
        sa.Column("port", sa.Integer, nullable=False),
        sa.Column("path", sa.Text, nullable=False),
        sa.Column("ref", sa.Text, nullable=False),
        sa.Column("approval_id", sa.String(32), nullable=False),
        sa.Column("created_at", TS, nullable=False),
    )
    op.create_table(
        "security_usage",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("sandbox_id", sa.String(64), nullable=False, index=True),
        sa.Column("task_id", sa.String(64), index=True),
        sa.Column("provider", sa.String(16)),
        sa.Column("model", sa.String(128)),
        sa.Column("input_tokens", sa.Integer, nullable=False),
        sa.Column("output_tokens", sa.Integer, nullable=False),
        sa.Column("cache_read_tokens", sa.Integer, nullable=False),
        sa.Column("cache_write_tokens", sa.Integer, nullable=False),
        sa.Column("cost", sa.Float),
        sa.Column("created_at", TS, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("security_usage")
    op.drop_table("security_remembered")
    op.drop_table("security_approvals")
