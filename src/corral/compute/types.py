"""Value types of the compute layer shared by the API and every provider."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

from corral._units import parse_size

#: default sandbox working directory
WORKSPACE = "/workspace"
#: name of the unprivileged account commands run as by default
AGENT_USER = "agent"
AGENT_HOME = "/home/agent"
#: a sandbox may fork at most this many processes unless told otherwise
DEFAULT_PIDS = 4096


@dataclass(frozen=True)
class Limits:
    """Resource limits enforced by cgroups. ``None`` means no limit."""

    cpus: float | None = None
    memory: int | None = None  # bytes
    pids: int | None = DEFAULT_PIDS

    @classmethod
    def parse(
        cls, cpus: float | None = None, memory: str | int | None = None, pids: int | None = None
    ) -> Limits:
        """Build from user input (``memory="2G"``); raises ``ValueError`` on nonsense."""
        if cpus is not None and cpus <= 0:
            raise ValueError(f"cpus must be positive, not {cpus}")
        if pids is not None and pids < 1:
            raise ValueError(f"pids must be at least 1, not {pids}")
        mem = parse_size(memory) if memory is not None else None
        if mem is not None and mem < 4 * 1024 * 1024:
            raise ValueError(f"memory limit {memory!r} is below 4M; nothing would start")
        return cls(cpus=cpus, memory=mem, pids=pids if pids is not None else DEFAULT_PIDS)

    def to_json(self) -> dict[str, Any]:
        return {"cpus": self.cpus, "memory": self.memory, "pids": self.pids}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Limits:
        return cls(cpus=data.get("cpus"), memory=data.get("memory"), pids=data.get("pids"))


@dataclass(frozen=True)
class Hooks:
    """What an upper layer (the security fence) adds to a sandbox it creates.

    ``files`` are written into the sandbox's own writable layer before its first
    process starts (a CA bundle, resolv.conf); ``env`` is added to every
    command's environment. The network namespace is exposed as
    ``Sandbox.netns_path`` for the layer above to attach to.
    """

    env: dict[str, str] = field(default_factory=dict)
    files: dict[str, bytes] = field(default_factory=dict)
    #: free-form facts the layer above wants kept with the sandbox (e.g. policy path)
    labels: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"env": dict(self.env), "labels": dict(self.labels), "files": sorted(self.files)}


@dataclass(frozen=True)
class CommandResult:
    """What a finished command left: exit code, output, and wall time in seconds."""

    exit_code: int
    stdout_bytes: bytes
    stderr_bytes: bytes
    duration: float
    timed_out: bool = False

    @property
    def stdout(self) -> str:
        return self.stdout_bytes.decode("utf-8", "replace")

    @property
    def stderr(self) -> str:
        return self.stderr_bytes.decode("utf-8", "replace")

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    def to_json(self) -> dict[str, Any]:
        return {
            "exit_code": self.exit_code,
            "stdout": self.stdout,
            "stderr": self.stderr,
            "duration": round(self.duration, 6),
            "timed_out": self.timed_out,
        }


@dataclass(frozen=True)
class FileEntry:
    """One directory entry as seen inside the sandbox."""

    name: str
    path: str
    type: str  # file | dir | symlink | other
    size: int
    mode: int
    mtime: float
    target: str | None = None  # symlink target, never followed

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "path": self.path,
            "type": self.type,
            "size": self.size,
            "mode": oct(self.mode & 0o7777),
            "mtime": self.mtime,
            "target": self.target,
        }


@dataclass(frozen=True)
class SnapshotInfo:
    """A sealed filesystem layer of a sandbox."""

    id: str
    name: str | None
    sandbox_id: str | None
    parent_id: str | None
    kind: str
    storage: str
    size_bytes: int
    created_at: dt.datetime

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "sandbox_id": self.sandbox_id,
            "parent_id": self.parent_id,
            "kind": self.kind,
            "storage": self.storage,
            "size_bytes": self.size_bytes,
            "created_at": self.created_at.isoformat(),
        }
