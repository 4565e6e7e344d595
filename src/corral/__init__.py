"""corral: run many autonomous coding agents at once, safely, on your real codebase."""

from corral.compute import (
    CommandHandle,
    CommandResult,
    FileEntry,
    Hooks,
    Limits,
    Pty,
    Sandbox,
    SandboxState,
    SnapshotInfo,
)
from corral.errors import (
    CommandTimeout,
    ConfigError,
    CorralError,
    InvalidState,
    MissingTool,
    NotFound,
    OutOfSpace,
    SandboxError,
    SandboxNotFound,
    SnapshotNotFound,
    StorageError,
    StoreError,
    UsageError,
)

__version__ = "0.1.0"

__all__ = [
    "CommandHandle",
    "CommandResult",
    "CommandTimeout",
    "ConfigError",
    "CorralError",
    "FileEntry",
    "Hooks",
    "InvalidState",
    "Limits",
    "MissingTool",
    "NotFound",
    "OutOfSpace",
    "Pty",
    "Sandbox",
    "SandboxError",
    "SandboxNotFound",
    "SandboxState",
    "SnapshotInfo",
    "SnapshotNotFound",
    "StorageError",
    "StoreError",
    "UsageError",
    "__version__",
]
