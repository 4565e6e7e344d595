"""Fixtures of the harness tests: the helpers beside this file are importable, and
the proxy daemon that fenced sandboxes start on demand is stopped at the end."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session", autouse=True)
def _stop_harness_proxy_daemon(corral_home: Path) -> Iterator[None]:
    yield
    from corral.security.daemon import DaemonClient

    DaemonClient(corral_home).stop()
