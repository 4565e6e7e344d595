"""The lifecycle of a sandbox: its states and the legal moves between them."""

from __future__ import annotations

import enum

from corral.errors import InvalidState


class SandboxState(enum.StrEnum):
    """Where a sandbox is in its life. Stored as the string value."""

    #: being set up; a sandbox left here by a crash is cleaned up by the next ``reconcile``
    CREATING = "creating"
    #: its init process is alive; commands, files and terminals work
    RUNNING = "running"
    #: every process frozen in place by the cgroup freezer; memory kept, no CPU used
    PAUSED = "paused"
    #: every process ended; the filesystem (all layers) kept; uses no CPU or memory
    STOPPED = "stopped"
    #: being torn down; a crash here is finished by the next ``reconcile``
    DESTROYING = "destroying"
    #: gone: processes, mounts, cgroups, netns and layers removed; the row stays for history
    DESTROYED = "destroyed"


S = SandboxState

#: operation -> states it may start from. The resulting state is in ``RESULT``.
LEGAL: dict[str, frozenset[SandboxState]] = {
    "exec": frozenset({S.RUNNING}),
    "pty": frozenset({S.RUNNING}),
    "files": frozenset({S.RUNNING, S.PAUSED, S.STOPPED}),
    "pause": frozenset({S.RUNNING}),
    "unpause": frozenset({S.PAUSED}),
    "stop": frozenset({S.RUNNING, S.PAUSED}),
    "resume": frozenset({S.STOPPED}),
    "snapshot": frozenset({S.RUNNING, S.PAUSED, S.STOPPED}),
    # restore replaces the filesystem: running processes are ended and a fresh
    # init starts over the restored layers; a stopped sandbox stays stopped
    "restore": frozenset({S.RUNNING, S.PAUSED, S.STOPPED}),
    "destroy": frozenset({S.CREATING, S.RUNNING, S.PAUSED, S.STOPPED, S.DESTROYING}),
}

#: operation -> state afterwards (``None``: unchanged, or decided by the operation)
RESULT: dict[str, SandboxState | None] = {
    "exec": None,
    "pty": None,
    "files": None,
    "pause": S.PAUSED,
    "unpause": S.RUNNING,
    "stop": S.STOPPED,
    "resume": S.RUNNING,
    "snapshot": None,
    "restore": None,
    "destroy": S.DESTROYED,
}

_HINTS: dict[str, str] = {
    "exec": "resume or unpause it first",
    "pty": "resume or unpause it first",
    "pause": "only a running sandbox can be paused",
    "unpause": "only a paused sandbox can be unpaused",
    "resume": "only a stopped sandbox can be resumed; use unpause for a paused one",
}


def check(op: str, state: SandboxState, sandbox_id: str) -> None:
    """Raise ``InvalidState`` naming the state when ``op`` is illegal in ``state``."""
    if state in LEGAL[op]:
        return
    hint = _HINTS.get(op)
    if state is S.DESTROYED:
        hint = "it was destroyed"
    msg = f"cannot {op} sandbox {sandbox_id}: it is {state.value}"
    if hint and state is not S.DESTROYED:
        msg += f" ({hint})"
    elif state is S.DESTROYED:
        msg = f"cannot {op} sandbox {sandbox_id}: it was destroyed"
    raise InvalidState(msg, sandbox_id=sandbox_id, state=state.value)
