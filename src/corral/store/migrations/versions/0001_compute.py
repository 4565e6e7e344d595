"""compute: sandboxes, snapshots, environments

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "sandboxes",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("state", sa.String(16), nullable=False, index=True),
        sa.Column("provider", sa.String(16), nullable=False),
        sa.Column("env", sa.String(128), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.Column("meta", sa.JSON, nullable=False),
        sa.Column("limits", sa.JSON, nullable=False),
        sa.Column("spec", sa.JSON, nullable=False),
        sa.Column("runtime", sa.JSON, nullable=False),
        sa.Column("lowers", sa.JSON, nullable=False),
        sa.Column("origin_snapshot", sa.String(32)),
        sa.Column("error", sa.Text),
    )
    op.create_table(
        "snapshots",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("name", sa.String(128), index=True),
        sa.Column(
            "sandbox_id", sa.String(32),
            sa.ForeignKey("sandboxes.id", ondelete="SET NULL"), index=True,
        ),
        sa.Column("parent_id", sa.String(32)),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("storage", sa.String(16), nullable=False),
        sa.Column("layer", sa.Text, nullable=False),
        sa.Column("lowers", sa.JSON, nullable=False),
        sa.Column("env", sa.String(128), nullable=False),
        sa.Column("spec", sa.JSON, nullable=False),
        sa.Column("size_bytes", sa.Integer, nullable=False),
        sa.Column("created_at", TS, nullable=False),
    )
    op.create_table(
        "environments",
        sa.Column("name", sa.String(128), primary_key=True),
        sa.Column("key", sa.String(64), nullable=False),
        sa.Column("snapshot_id", sa.String(32), nullable=False),
        sa.Column("repo", sa.Text, nullable=False),
        sa.Column("config", sa.JSON, nullable=False),
        sa.Column("built_at", TS, nullable=False),
        sa.Column("build_seconds", sa.Integer, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("environments")
    op.drop_table("snapshots")
    op.drop_table("sandboxes")
