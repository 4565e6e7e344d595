"""Tables of the orchestrator (Layer 3): runs, tasks, their events, attempts, CI
runs, the outbox of side effects and the inbox of human decisions.

Every fact the orchestrator needs to resume after ``kill -9`` lives here.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import Boolean, Float, ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from corral.store.models import Base, utcnow


class RunRow(Base):
    """One ``corral run``: a plan driven against one origin."""

    __tablename__ = "orch_runs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    #: running | finished | incomplete | cancelled | budget_exceeded | failed
    state: Mapped[str] = mapped_column(String(24), index=True)
    repo: Mapped[str] = mapped_column(Text)
    plan_path: Mapped[str | None] = mapped_column(Text, default=None)
    origin: Mapped[str] = mapped_column(Text)
    branch: Mapped[str] = mapped_column(String(255), default="main")
    #: the orchestrator config in force (last good one) and the plan's tasks
    config: Mapped[dict[str, Any]] = mapped_column(default=dict)
    options: Mapped[dict[str, Any]] = mapped_column(default=dict)
    env_name: Mapped[str | None] = mapped_column(String(128), default=None)
    base_commit: Mapped[str | None] = mapped_column(String(64), default=None)
    main_commit: Mapped[str | None] = mapped_column(String(64), default=None)
    #: the commit the prebuild's workspace holds (incremental bundles start there)
    prebuild_commit: Mapped[str | None] = mapped_column(String(64), default=None)
    #: the process driving the run ("host:pid:starttime") and its last heartbeat
    owner: Mapped[str | None] = mapped_column(String(128), default=None)
    heartbeat: Mapped[float] = mapped_column(Float, default=0.0)
    tokens: Mapped[int] = mapped_column(Integer, default=0)
    cost_usd: Mapped[float] = mapped_column(Float, default=0.0)
    error: Mapped[str | None] = mapped_column(Text, default=None)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[dt.datetime | None] = mapped_column(default=None)


class TaskRow(Base):
    """One task of a run, with everything its state machine needs."""

    __tablename__ = "orch_tasks"

    run_id: Mapped[str] = mapped_column(
        ForeignKey("orch_runs.id", ondelete="CASCADE"), primary_key=True)
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    state: Mapped[str] = mapped_column(String(24), index=True)
    spec: Mapped[dict[str, Any]] = mapped_column(default=dict)
    position: Mapped[int] = mapped_column(Integer, default=0)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    failures: Mapped[int] = mapped_column(Integer, default=0)
    ci_rounds: Mapped[int] = mapped_column(Integer, default=0)
    conflicts: Mapped[int] = mapped_column(Integer, default=0)
    stuck_level: Mapped[int] = mapped_column(Integer, default=0)
    tokens: Mapped[int] = mapped_column(Integer, default=0)
    cost_usd: Mapped[float] = mapped_column(Float, default=0.0)
    base_commit: Mapped[str | None] = mapped_column(String(64), default=None)
    head_commit: Mapped[str | None] = mapped_column(String(64), default=None)
    merged_commit: Mapped[str | None] = mapped_column(String(64), default=None)
    sandbox_id: Mapped[str | None] = mapped_column(String(32), default=None)
    snapshot_id: Mapped[str | None] = mapped_column(String(32), default=None)
    session_id: Mapped[str | None] = mapped_column(String(255), default=None)
    #: the background command of the turn in flight (re-attached after a restart)
    turn_command: Mapped[str | None] = mapped_column(String(64), default=None)
    #: the reaction to send next (name + payload), set when the task goes to running
    pending: Mapped[dict[str, Any]] = mapped_column(default=dict)
    #: counters and history: reactions sent, CI failure signatures, turn fingerprints
    memo: Mapped[dict[str, Any]] = mapped_column(default=dict)
    reason: Mapped[str | None] = mapped_column(Text, default=None)
    lease_owner: Mapped[str | None] = mapped_column(String(128), default=None)
    lease_expires: Mapped[float] = mapped_column(Float, default=0.0)
    #: clock time before which the task must not be dispatched (retry backoff)
    not_before: Mapped[float] = mapped_column(Float, default=0.0)
    queued_at: Mapped[float] = mapped_column(Float, default=0.0)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class TaskEventRow(Base):
    """One thing that happened to a task: a state transition, a reaction, a CI result."""

    __tablename__ = "orch_events"
    __table_args__ = (Index("ix_orch_events_run_task", "run_id", "task_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(String(32))
    task_id: Mapped[str | None] = mapped_column(String(64), default=None)
    kind: Mapped[str] = mapped_column(String(32))
    from_state: Mapped[str | None] = mapped_column(String(24), default=None)
    to_state: Mapped[str | None] = mapped_column(String(24), default=None)
    #: wall time (epoch seconds, high resolution) and the orchestrator clock's time
    at: Mapped[float] = mapped_column(Float)
    clock: Mapped[float] = mapped_column(Float, default=0.0)
    data: Mapped[dict[str, Any]] = mapped_column(default=dict)


class AttemptRow(Base):
    """One agent session on a task (a fresh sandbox or a fresh start)."""

    __tablename__ = "orch_attempts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(String(32), index=True)
    task_id: Mapped[str] = mapped_column(String(64))
    number: Mapped[int] = mapped_column(Integer)
    sandbox_id: Mapped[str | None] = mapped_column(String(32), default=None)
    turns: Mapped[int] = mapped_column(Integer, default=0)
    tokens: Mapped[int] = mapped_column(Integer, default=0)
    cost_usd: Mapped[float] = mapped_column(Float, default=0.0)
    outcome: Mapped[str | None] = mapped_column(String(32), default=None)
    log_path: Mapped[str] = mapped_column(Text)
    started_at: Mapped[float] = mapped_column(Float)
    ended_at: Mapped[float | None] = mapped_column(Float, default=None)


class CIRunRow(Base):
    """One run of the repo's CI command in a fresh sandbox."""

    __tablename__ = "orch_ci_runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(String(32), index=True)
    task_id: Mapped[str] = mapped_column(String(64))
    stage: Mapped[str] = mapped_column(String(16))  # task | merge
    commit: Mapped[str] = mapped_column(String(64))
    tree: Mapped[str] = mapped_column(String(64), index=True)
    passed: Mapped[bool] = mapped_column(Boolean)
    exit_code: Mapped[int] = mapped_column(Integer)
    seconds: Mapped[float] = mapped_column(Float)
    signature: Mapped[str] = mapped_column(String(64))
    summary: Mapped[dict[str, Any]] = mapped_column(default=dict)
    log_path: Mapped[str | None] = mapped_column(Text, default=None)
    at: Mapped[float] = mapped_column(Float)


class OutboxRow(Base):
    """A side effect decided but maybe not yet done (a push of main): done exactly once."""

    __tablename__ = "orch_outbox"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(String(32), index=True)
    task_id: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(32))
    payload: Mapped[dict[str, Any]] = mapped_column(default=dict)
    state: Mapped[str] = mapped_column(String(16), default="pending")  # pending|done|failed
    error: Mapped[str | None] = mapped_column(Text, default=None)
    created_at: Mapped[float] = mapped_column(Float)
    done_at: Mapped[float | None] = mapped_column(Float, default=None)


class InboxRow(Base):
    """A request from outside the orchestrator process (review decision, cancel)."""

    __tablename__ = "orch_inbox"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(String(32), index=True)
    task_id: Mapped[str | None] = mapped_column(String(64), default=None)
    kind: Mapped[str] = mapped_column(String(16))  # approve | reject | cancel
    payload: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[float] = mapped_column(Float)
    handled_at: Mapped[float | None] = mapped_column(Float, default=None)
