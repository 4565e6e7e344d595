"""The exception tree of corral.

Every error a user can cause is a ``CorralError``; the CLI prints its message
as one line and exits with its ``exit_code`` (2 for usage errors, 1 for
failures).

    CorralError
    ├── UsageError                (exit 2: the request itself is wrong)
    │   ├── ConfigError             a corral.yaml / policy / plan that does not validate
    │   ├── NotFound
    │   │   ├── SandboxNotFound
    │   │   └── SnapshotNotFound
    │   └── InvalidState            an operation that the current state does not allow
    ├── MissingTool                 a binary or kernel feature the machine lacks
    ├── SandboxError                the sandbox machinery failed
    │   ├── CommandTimeout
    │   └── StorageError
    │       └── OutOfSpace
    └── StoreError                  the state database cannot be used
"""

from __future__ import annotations


class CorralError(Exception):
    """Root of every error corral raises on purpose."""

    exit_code = 1

    def __init__(self, message: str, *, sandbox_id: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.sandbox_id = sandbox_id

    def __str__(self) -> str:
        if self.sandbox_id and self.sandbox_id not in self.message:
            return f"{self.message} (sandbox {self.sandbox_id})"
        return self.message


class UsageError(CorralError):
    """The request is wrong: a bad argument, id, name or file."""

    exit_code = 2


class ConfigError(UsageError, ValueError):
    """A configuration file does not validate; the message names file, line and key."""


class NotFound(UsageError, LookupError):
    """Something named by the user does not exist."""


class SandboxNotFound(NotFound):
    """No sandbox has this id."""


class SnapshotNotFound(NotFound):
    """No snapshot has this id or name."""


class InvalidState(UsageError):
    """The operation is not legal in the sandbox's current state."""

    def __init__(self, message: str, *, sandbox_id: str | None = None, state: str = "") -> None:
        super().__init__(message, sandbox_id=sandbox_id)
        self.state = state


class MissingTool(CorralError, RuntimeError):
    """A binary or kernel feature is missing; the message says what to install."""


class SandboxError(CorralError, RuntimeError):
    """The sandbox machinery failed (mount, namespace, cgroup, process)."""


class CommandTimeout(SandboxError, TimeoutError):
    """A command ran past its timeout and was killed."""


class StorageError(SandboxError):
    """Layer storage (btrfs pool or copy fallback) failed."""


class OutOfSpace(StorageError):
    """The storage pool or the disk under it is full."""


class StoreError(CorralError):
    """The state database cannot be opened or migrated."""
