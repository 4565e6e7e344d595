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


class SandboxLimitRow(Base):
    """A sandbox's own model-call limits (what is left of the budgets of the task it
    works on), set by the orchestrator, enforced by the proxy beside the policy's
    ``llm`` limits; and what the proxy refused and handed out on account of them."""

    __tablename__ = "security_sandbox_limits"

    sandbox_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    task_id: Mapped[str | None] = mapped_column(String(64), index=True, default=None)
    #: the sandbox's metered tokens (as ``Totals.tokens``) at which calls are refused
    token_limit: Mapped[int | None] = mapped_column(Integer, default=None)
    #: the same in USD (``Totals.cost``)
    cost_limit: Mapped[float | None] = mapped_column(Float, default=None)
    #: what each limit stands for, named in the refusal ("the task's token budget")
    token_label: Mapped[str | None] = mapped_column(Text, default=None)
    cost_label: Mapped[str | None] = mapped_column(Text, default=None)
    #: model calls refused for this sandbox (any limit), and the last refusal's text
    refusals: Mapped[int] = mapped_column(Integer, default=0)
    last_refusal: Mapped[str | None] = mapped_column(Text, default=None)
    #: the last ``security_usage`` row handed out by ``ProxyMeter.take``
    taken_id: Mapped[int] = mapped_column(Integer, default=0)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)
