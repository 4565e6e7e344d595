"""``fake``: a sandbox provider without namespaces, for fast tests of the layers above.

Each sandbox is a directory tree on the host (``$CORRAL_HOME/fake/<id>/root``).
Commands run as ordinary host processes with their working directory mapped
into that tree and ``CORRAL_ROOT`` pointing at it; absolute paths are *not*
remapped, and nothing is isolated. Use it only to test orchestration logic with
trusted commands; use the ``local`` provider for anything about isolation.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any

from corral.compute.provider import Provider, SealedLayer, Spawn, supervised
from corral.compute.types import WORKSPACE, Hooks
from corral.errors import SandboxError
from corral.store.models import SandboxRow, SnapshotRow


class FakeProvider(Provider):
    """In-process sandboxes made of plain directories; snapshots are copies."""

    name = "fake"

    def _base(self) -> Path:
        return self.settings.home / "fake"

    def _root(self, row: SandboxRow) -> Path:
        return self._base() / row.id / "root"

    def create(self, row: SandboxRow, *, workspace: Path | None,
               snapshot: SnapshotRow | None, hooks: Hooks) -> None:
        root = self._root(row)
        if snapshot is not None:
            shutil.copytree(Path(snapshot.layer), root, symlinks=True)
        else:
            (root / WORKSPACE.lstrip("/")).mkdir(parents=True)
            (root / "tmp").mkdir()
        if workspace is not None:
            ws = root / WORKSPACE.lstrip("/")
            shutil.rmtree(ws, ignore_errors=True)
            shutil.copytree(workspace, ws, symlinks=True)
        for path, data in hooks.files.items():
            dest = root / path.lstrip("/")
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(data)
        row.runtime["storage"] = "copy"
        self.start(row)

    def start(self, row: SandboxRow) -> None:
        row.runtime["alive"] = True
        row.runtime["pgids"] = []

    def stop(self, row: SandboxRow) -> None:
        for pgid in row.runtime.get("pgids", []):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)
        row.runtime["alive"] = False
        row.runtime["pgids"] = []

    def pause(self, row: SandboxRow) -> None:
        for pgid in row.runtime.get("pgids", []):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGSTOP)

    def unpause(self, row: SandboxRow) -> None:
        for pgid in row.runtime.get("pgids", []):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGCONT)

    def destroy(self, row: SandboxRow) -> None:
        self.stop(row)
        shutil.rmtree(self._base() / row.id, ignore_errors=True)

    def is_alive(self, row: SandboxRow) -> bool:
        return bool(row.runtime.get("alive"))

    def spawn(self, row: SandboxRow, spec: Spawn) -> subprocess.Popen[bytes]:
        root = self._root(row)
        cwd = root / spec.cwd.lstrip("/")
        if not cwd.is_dir():
            raise SandboxError(f"no directory {spec.cwd} in fake sandbox", sandbox_id=row.id)
        env = {**os.environ, **spec.env, "CORRAL_ROOT": str(root),
               "HOME": str(root / "tmp")}
        env["PATH"] = os.environ.get("PATH", env.get("PATH", ""))
        argv = supervised(spec.argv, spec.exit_file)
        kw: dict[str, Any] = {}
        if spec.tty_fd is not None:
            kw = {"stdin": spec.tty_fd, "stdout": spec.tty_fd, "stderr": spec.tty_fd}
        else:
            kw = {"stdin": spec.stdin, "stdout": spec.stdout, "stderr": spec.stderr}
        return subprocess.Popen(argv, cwd=cwd, env=env, start_new_session=True, **kw)

    def root(self, row: SandboxRow) -> Path:
        return self._root(row)

    def owner(self, row: SandboxRow) -> tuple[int, int]:
        return (os.getuid(), os.getgid())

    def snapshot(self, row: SandboxRow, snapshot_id: str) -> SealedLayer:
        dest = self._base() / "snapshots" / snapshot_id
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(self._root(row), dest, symlinks=True)
        return SealedLayer(layer=str(dest), lowers=[])

    def restore(self, row: SandboxRow, snapshot: SnapshotRow) -> None:
        root = self._root(row)
        shutil.rmtree(root, ignore_errors=True)
        shutil.copytree(Path(snapshot.layer), root, symlinks=True)

    def delete_snapshot(self, snapshot: SnapshotRow) -> None:
        shutil.rmtree(Path(snapshot.layer), ignore_errors=True)
