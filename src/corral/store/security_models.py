"""Tables of the security layer: approvals, remembered approvals, model usage.

No foreign keys to ``sandboxes``: the proxy meters and holds requests by
sandbox id, and these rows outlive the sandbox for the audit trail.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import Boolean, Float, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from corral.store.models import Base, utcnow


class ApprovalRow(Base):
    """A request held for a human (``ask``), and what became of it."""

    __tablename__ = "security_approvals"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    sandbox_id: Mapped[str] = mapped_column(String(64), index=True)
    task_id: Mapped[str | None] = mapped_column(String(64), index=True, default=None)
    summary: Mapped[str] = mapped_column(Text)
    reason: Mapped[str] = mapped_column(Text)
    #: pending | approved | denied | timeout
    status: Mapped[str] = mapped_column(String(16), index=True, default="pending")
    #: the request's shape: method, scheme, host, port, path, query, refs
    request: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    decided_at: Mapped[dt.datetime | None] = mapped_column(default=None)
    actor: Mapped[str | None] = mapped_column(String(128), default=None)
    decision_reason: Mapped[str | None] = mapped_column(Text, default=None)
    remember: Mapped[bool] = mapped_column(Boolean, default=False)


class RememberedRow(Base):
    """An approval given with ``--remember``: that exact request shape is allowed."""

    __tablename__ = "security_remembered"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    #: the scope: a sandbox, or (when set) every sandbox of a task
    sandbox_id: Mapped[str] = mapped_column(String(64), index=True)
    task_id: Mapped[str | None] = mapped_column(String(64), index=True, default=None)
    method: Mapped[str] = mapped_column(String(32))
    host: Mapped[str] = mapped_column(String(255))
    port: Mapped[int] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(Text)
    #: for git pushes: the ref this approval covers ("" otherwise)
    ref: Mapped[str] = mapped_column(Text, default="")
    approval_id: Mapped[str] = mapped_column(String(32))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class UsageRow(Base):
    """Token usage of one model API response, read by the proxy."""

    __tablename__ = "security_usage"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    sandbox_id: Mapped[str] = mapped_column(String(64), index=True)
    task_id: Mapped[str | None] = mapped_column(String(64), index=True, default=None)
    provider: Mapped[str | None] = mapped_column(String(16), default=None)
    model: Mapped[str | None] = mapped_column(String(128), default=None)
    input_tokens: Mapped[int] = mapped_column(Integer, default=0)
    output_tokens: Mapped[int] = mapped_column(Integer, default=0)
    cache_read_tokens: Mapped[int] = mapped_column(Integer, default=0)
    cache_write_tokens: Mapped[int] = mapped_column(Integer, default=0)
    #: USD, when the policy has a price for the model
    cost: Mapped[float | None] = mapped_column(Float, default=None)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
