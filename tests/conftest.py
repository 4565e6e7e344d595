"""Shared fixtures: every test session gets its own corral installation.

The session's ``CORRAL_HOME`` is a fresh temporary directory; at teardown every
sandbox made in it is destroyed and its btrfs pool (a loop device) released, so
a test run leaves no mounts, namespaces, cgroups or loop devices behind.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest


@pytest.fixture(scope="session", autouse=True)
def corral_home() -> Iterator[Path]:
    home = Path(tempfile.mkdtemp(prefix="corral-test-"))
    old = os.environ.get("CORRAL_HOME")
    os.environ["CORRAL_HOME"] = str(home)
    try:
        yield home
    finally:
        teardown_home(home)
        if old is None:
            os.environ.pop("CORRAL_HOME", None)
        else:
            os.environ["CORRAL_HOME"] = old


@pytest.fixture(scope="session")
def release_home() -> Callable[[Path], None]:
    """``teardown_home``, for a test that makes an installation of its own (a
    ``from conftest import`` would find whichever conftest was imported last)."""
    return teardown_home


def teardown_home(home: Path) -> None:
    """Destroy every sandbox of ``home`` and release its storage."""
    from corral.compute import Sandbox
    from corral.compute.local.storage import release

    if (home / "corral.db").exists() or os.environ.get("CORRAL_DB_URL"):
        try:
            sandboxes = Sandbox.list(home=home)
        except Exception as exc:  # a store the test broke: release the rest all the same
            print(f"teardown: could not list the sandboxes: {exc}")
            sandboxes = []
        for sbx in sandboxes:
            try:
                sbx.destroy()
            except Exception as exc:  # keep tearing down the rest
                print(f"teardown: could not destroy {sbx.id}: {exc}")
    try:  # the fence's proxy daemon, if a test started one
        from corral.security.daemon import DaemonClient

        DaemonClient(home).stop()
    except Exception as exc:
        print(f"teardown: could not stop the proxy daemon: {exc}")
    _umount_under(home)  # whatever a killed run left behind (a netns bind mount)
    release(home)
    shutil.rmtree(home, ignore_errors=True)


def _umount_under(home: Path) -> None:
    """Lazily unmount every mount below ``home`` except its storage pool, deepest first."""
    import re
    import subprocess

    root, pool = str(home.resolve()), str((home / "storage").resolve())
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), line.split()[4])
        if point.startswith(root + "/") and point != pool and not point.startswith(pool + "/"):
            points.append(point)
    for point in sorted(points, key=len, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True, check=False)


SAMPLE_REPO = Path(__file__).parent / "data" / "sample_repo"


@pytest.fixture
def sandbox() -> Iterator[object]:
    """A fresh running sandbox, destroyed after the test."""
    from corral.compute import Sandbox

    sbx = Sandbox.create(metadata={"test": "fixture"})
    try:
        yield sbx
    finally:
        try:
            sbx.destroy()
        except Exception:  # already destroyed by the test
            pass


@pytest.fixture
def sample_repo(tmp_path: Path) -> Path:
    """A copy of tests/data/sample_repo in a git repository."""
    import subprocess

    repo = tmp_path / "sample"
    shutil.copytree(SAMPLE_REPO, repo)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.invalid"]
    subprocess.run([*git, "init", "-q", "-b", "main"], cwd=repo, check=True)
    subprocess.run([*git, "add", "-A"], cwd=repo, check=True)
    subprocess.run([*git, "commit", "-qm", "init"], cwd=repo, check=True)
    return repo


@pytest.fixture
def corral_cli() -> object:
    """Run the real ``corral`` command: ``corral_cli("sandbox", "ls", "--json")``."""
    import subprocess
    import sys

    exe = str(Path(sys.executable).parent / "corral")

    def run(*args: str, input: str | None = None, timeout: float = 120
            ) -> subprocess.CompletedProcess[str]:
        return subprocess.run([exe, *args], capture_output=True, text=True, input=input,
                              timeout=timeout)

    return run
