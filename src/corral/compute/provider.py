"""The small interface every sandbox backend implements.

A provider does the mechanics (namespaces, layers, processes); the ``Sandbox``
handle owns the state machine, the store and locking. Rows passed in are the
store's ``SandboxRow`` / ``SnapshotRow``; a provider may update ``row.runtime``
and ``row.lowers`` and the caller persists them.
"""

from __future__ import annotations

import abc
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, ClassVar

from corral.compute.types import Hooks
from corral.settings import Settings
from corral.store.models import SandboxRow, SnapshotRow


@dataclass(frozen=True)
class SealedLayer:
    """What ``Provider.snapshot`` produced."""

    layer: str
    lowers: list[str]
    size_bytes: int = 0


@dataclass(frozen=True)
class Spawn:
    """How to start one process inside a sandbox."""

    argv: Sequence[str]
    cwd: str
    env: Mapping[str, str]
    user: str = "agent"  # agent | root
    stdin: int | IO[Any] | None = subprocess.DEVNULL
    stdout: int | IO[Any] | None = subprocess.PIPE
    stderr: int | IO[Any] | None = subprocess.PIPE
    #: a pty slave fd: becomes stdin/stdout/stderr and the controlling terminal
    tty_fd: int | None = None
    #: for background commands: a host file that receives the exit code
    exit_file: str | None = None


def supervised(argv: Sequence[str], exit_file: str | None) -> list[str]:
    """Wrap a host-side argv so that its exit status lands in ``exit_file``.

    The wrapper is the host's own /bin/sh running corral's fixed script: nothing
    from the sandbox runs on the host.
    """
    if exit_file is None:
        return list(argv)
    script = 'f=$1; shift; "$@"; echo $? > "$f.tmp" && mv "$f.tmp" "$f"'
    return ["/bin/sh", "-c", script, "corral-supervise", exit_file, *argv]


class Provider(abc.ABC):
    """A sandbox backend. Implementations: ``local``, ``fake`` (``corral.testing``)."""

    name: ClassVar[str]

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    # -- lifecycle ---------------------------------------------------------
    @abc.abstractmethod
    def create(
        self,
        row: SandboxRow,
        *,
        workspace: Path | None,
        snapshot: SnapshotRow | None,
        hooks: Hooks,
    ) -> None:
        """Lay out the filesystem (from the environment base or ``snapshot``), seed
        ``/workspace`` from ``workspace`` (never writing to it), write hook files,
        and start the init process. Must leave nothing behind if it raises."""

    @abc.abstractmethod
    def start(self, row: SandboxRow) -> None:
        """Start a fresh init over the sandbox's existing layers (resume)."""

    @abc.abstractmethod
    def stop(self, row: SandboxRow) -> None:
        """End every process of the sandbox; keep its filesystem."""

    @abc.abstractmethod
    def pause(self, row: SandboxRow) -> None:
        """Freeze every process in place."""

    @abc.abstractmethod
    def unpause(self, row: SandboxRow) -> None:
        """Thaw what ``pause`` froze."""

    def is_frozen(self, row: SandboxRow) -> bool:
        """Whether the sandbox's processes are held frozen (by ``pause``, a snapshot
        in progress, or a snapshot whose process died half-way)."""
        return False

    @abc.abstractmethod
    def destroy(self, row: SandboxRow) -> None:
        """Remove everything of the sandbox. Idempotent; safe after a crash."""

    @abc.abstractmethod
    def is_alive(self, row: SandboxRow) -> bool:
        """Whether the sandbox's init is still running."""

    # -- processes ---------------------------------------------------------
    @abc.abstractmethod
    def spawn(self, row: SandboxRow, spec: Spawn) -> subprocess.Popen[bytes]:
        """Start a process inside the sandbox; the caller waits for it."""

    # -- filesystem --------------------------------------------------------
    @abc.abstractmethod
    def root(self, row: SandboxRow) -> Path:
        """Host path of the sandbox's merged root. Readers must not follow symlinks
        out of it (``corral.compute.files`` resolves paths inside it)."""

    def owner(self, row: SandboxRow) -> tuple[int, int]:
        """Host uid/gid that files created for the sandbox user should get."""
        return (self.settings.sandbox_uid, self.settings.sandbox_uid)

    # -- snapshots ---------------------------------------------------------
    @abc.abstractmethod
    def snapshot(self, row: SandboxRow, snapshot_id: str) -> SealedLayer:
        """Seal the sandbox's writable layer, consistently if it is running."""

    @abc.abstractmethod
    def restore(self, row: SandboxRow, snapshot: SnapshotRow) -> None:
        """Replace the sandbox's filesystem by ``snapshot``; processes must be ended
        by the caller first (``stop``) and are started again by ``start``."""

    @abc.abstractmethod
    def delete_snapshot(self, snapshot: SnapshotRow) -> None:
        """Remove a sealed layer nothing depends on."""

    def open_pty(self, row: SandboxRow) -> tuple[int, int]:
        """A (master, slave) terminal pair; the slave should belong to the sandbox's
        own devpts so that ``tty`` inside names it."""
        import os

        return os.openpty()

    # -- information ---------------------------------------------------------
    def stats(self, row: SandboxRow) -> dict[str, Any]:
        """Resource usage, as far as the backend knows it."""
        return {}

    def netns_path(self, row: SandboxRow) -> Path | None:
        """A path naming the sandbox's network namespace (stable across stop/resume)."""
        return None


_providers: dict[tuple[str, Path], Provider] = {}


def get_provider(name: str, settings: Settings) -> Provider:
    """The provider called ``name`` for this installation (cached)."""
    from corral.errors import UsageError

    key = (name, settings.home)
    prov = _providers.get(key)
    if prov is not None:
        return prov
    if name == "local":
        from corral.compute.local import LocalProvider

        prov = LocalProvider(settings)
    elif name == "fake":
        from corral.testing.fake_provider import FakeProvider

        prov = FakeProvider(settings)
    else:
        raise UsageError(f"unknown sandbox provider {name!r} (known: local, fake)")
    _providers[key] = prov
    return prov
