"""orchestrator: runs, tasks, events, attempts, CI runs, outbox, inbox

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "orch_runs",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("state", sa.String(24), nullable=False, index=True),
        sa.Column("repo", sa.Text, nullable=False),
        sa.Column("plan_path", sa.Text),
        sa.Column("origin", sa.Text, nullable=False),
        sa.Column("branch", sa.String(255), nullable=False),
        sa.Column("config", sa.JSON, nullable=False),
        sa.Column("options", sa.JSON, nullable=False),
        sa.Column("env_name", sa.String(128)),
        sa.Column("base_commit", sa.String(64)),
        sa.Column("main_commit", sa.String(64)),
        sa.Column("prebuild_commit", sa.String(64)),
        sa.Column("owner", sa.String(128)),
        sa.Column("heartbeat", sa.Float, nullable=False),
        sa.Column("tokens", sa.Integer, nullable=False),
        sa.Column("cost_usd", sa.Float, nullable=False),
        sa.Column("error", sa.Text),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("finished_at", TS),
    )
    op.create_table(
        "orch_tasks",
        sa.Column("run_id", sa.String(32), sa.ForeignKey("orch_runs.id", ondelete="CASCADE"),
                  primary_key=True),
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("state", sa.String(24), nullable=False, index=True),
        sa.Column("spec", sa.JSON, nullable=False),
        sa.Column("position", sa.Integer, nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("failures", sa.Integer, nullable=False),
        sa.Column("ci_rounds", sa.Integer, nullable=False),
        sa.Column("conflicts", sa.Integer, nullable=False),
        sa.Column("stuck_level", sa.Integer, nullable=False),
        sa.Column("tokens", sa.Integer, nullable=False),
        sa.Column("cost_usd", sa.Float, nullable=False),
        sa.Column("base_commit", sa.String(64)),
        sa.Column("head_commit", sa.String(64)),
        sa.Column("merged_commit", sa.String(64)),
        sa.Column("sandbox_id", sa.String(32)),
        sa.Column("snapshot_id", sa.String(32)),
        sa.Column("session_id", sa.String(255)),
        sa.Column("turn_command", sa.String(64)),
        sa.Column("pending", sa.JSON, nullable=False),
        sa.Column("memo", sa.JSON, nullable=False),
        sa.Column("reason", sa.Text),
        sa.Column("lease_owner", sa.String(128)),
        sa.Column("lease_expires", sa.Float, nullable=False),
        sa.Column("not_before", sa.Float, nullable=False),
        sa.Column("queued_at", sa.Float, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
    )
    op.create_table(
        "orch_events",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("run_id", sa.String(32), nullable=False),
        sa.Column("task_id", sa.String(64)),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("from_state", sa.String(24)),
        sa.Column("to_state", sa.String(24)),
        sa.Column("at", sa.Float, nullable=False),
        sa.Column("clock", sa.Float, nullable=False),
        sa.Column("data", sa.JSON, nullable=False),
    )
    op.create_index("ix_orch_events_run_task", "orch_events", ["run_id", "task_id"])
    op.create_table(
        "orch_attempts",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("run_id", sa.String(32), nullable=False, index=True),
        sa.Column("task_id", sa.String(64), nullable=False),
        sa.Column("number", sa.Integer, nullable=False),
        sa.Column("sandbox_id", sa.String(32)),
        sa.Column("turns", sa.Integer, nullable=False),
        sa.Column("tokens", sa.Integer, nullable=False),
        sa.Column("cost_usd", sa.Float, nullable=False),
        sa.Column("outcome", sa.String(32)),
        sa.Column("log_path", sa.Text, nullable=False),
        sa.Column("started_at", sa.Float, nullable=False),
        sa.Column("ended_at", sa.Float),
    )
    op.create_table(
        "orch_ci_runs",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("run_id", sa.String(32), nullable=False, index=True),
        sa.Column("task_id", sa.String(64), nullable=False),
        sa.Column("stage", sa.String(16), nullable=False),
        sa.Column("commit", sa.String(64), nullable=False),
        sa.Column("tree", sa.String(64), nullable=False, index=True),
        sa.Column("passed", sa.Boolean, nullable=False),
        sa.Column("exit_code", sa.Integer, nullable=False),
        sa.Column("seconds", sa.Float, nullable=False),
        sa.Column("signature", sa.String(64), nullable=False),
        sa.Column("summary", sa.JSON, nullable=False),
        sa.Column("log_path", sa.Text),
        sa.Column("at", sa.Float, nullable=False),
    )
    op.create_table(
        "orch_outbox",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("run_id", sa.String(32), nullable=False, index=True),
        sa.Column("task_id", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("payload", sa.JSON, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("error", sa.Text),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("done_at", sa.Float),
    )
    op.create_table(
        "orch_inbox",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("run_id", sa.String(32), nullable=False, index=True),
        sa.Column("task_id", sa.String(64)),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("payload", sa.JSON, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("handled_at", sa.Float),
    )


def downgrade() -> None:
    for table in ("orch_inbox", "orch_outbox", "orch_ci_runs", "orch_attempts", "orch_events",
                  "orch_tasks", "orch_runs"):
        op.drop_table(table)
