"""Tables of the state store. Each layer owns its tables; migrations live in ``migrations/``."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import JSON, DateTime, ForeignKey, Integer, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class Base(DeclarativeBase):
    type_annotation_map = {  # noqa: RUF012 - SQLAlchemy reads this class attribute
        dict[str, Any]: JSON,
        list[Any]: JSON,
        dt.datetime: DateTime(timezone=True),
    }


class SandboxRow(Base):
    """One sandbox, alive or destroyed (destroyed rows are kept for the audit trail)."""

    __tablename__ = "sandboxes"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    state: Mapped[str] = mapped_column(String(16), index=True)
    provider: Mapped[str] = mapped_column(String(16))
    env: Mapped[str] = mapped_column(String(128), default="default")
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    meta: Mapped[dict[str, Any]] = mapped_column(default=dict)
    limits: Mapped[dict[str, Any]] = mapped_column(default=dict)
    #: everything needed to start the sandbox again: user, env vars, exposed paths, hooks
    spec: Mapped[dict[str, Any]] = mapped_column(default=dict)
    #: provider-private runtime facts: init pid and its start time, paths, cgroups
    runtime: Mapped[dict[str, Any]] = mapped_column(default=dict)
    #: read-only layers below the sandbox's own writable layer, top first
    lowers: Mapped[list[Any]] = mapped_column(default=list)
    origin_snapshot: Mapped[str | None] = mapped_column(String(32), default=None)
    error: Mapped[str | None] = mapped_column(Text, default=None)


class SnapshotRow(Base):
    """A sealed layer: what a sandbox's filesystem held at one moment."""

    __tablename__ = "snapshots"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str | None] = mapped_column(String(128), index=True, default=None)
    sandbox_id: Mapped[str | None] = mapped_column(
        ForeignKey("sandboxes.id", ondelete="SET NULL"), index=True, default=None
    )
    #: the snapshot the sandbox was started from, if any (snapshots form a tree)
    parent_id: Mapped[str | None] = mapped_column(String(32), default=None)
    kind: Mapped[str] = mapped_column(String(16), default="user")  # user | prebuild
    storage: Mapped[str] = mapped_column(String(16))
    layer: Mapped[str] = mapped_column(Text)
    lowers: Mapped[list[Any]] = mapped_column(default=list)
    env: Mapped[str] = mapped_column(String(128), default="default")
    spec: Mapped[dict[str, Any]] = mapped_column(default=dict)
    size_bytes: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class EnvironmentRow(Base):
    """A built environment: a prebuild snapshot keyed by its config and lock files."""

    __tablename__ = "environments"

    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    key: Mapped[str] = mapped_column(String(64))
    snapshot_id: Mapped[str] = mapped_column(String(32))
    repo: Mapped[str] = mapped_column(Text)
    config: Mapped[dict[str, Any]] = mapped_column(default=dict)
    built_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    build_seconds: Mapped[int] = mapped_column(Integer, default=0)
