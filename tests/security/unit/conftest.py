"""Fixtures of the policy-side unit tests: a fresh store and audit log per test."""

from __future__ import annotations

from pathlib import Path

import pytest

from corral.security.audit import AuditLog
from corral.store import Store, open_store


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return open_store(f"sqlite:///{tmp_path / 'corral.db'}")


@pytest.fixture
def audit(tmp_path: Path) -> AuditLog:
    return AuditLog(tmp_path / "audit.jsonl")
