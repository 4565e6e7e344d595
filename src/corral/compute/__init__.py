"""Layer 1: sandboxes that are real dev environments, with full lifecycle control."""

from corral.compute.commands import CommandHandle, Commands
from corral.compute.files import Files
from corral.compute.pty import Pty
from corral.compute.sandbox import Sandbox
from corral.compute.states import SandboxState
from corral.compute.types import CommandResult, FileEntry, Hooks, Limits, SnapshotInfo

__all__ = [
    "CommandHandle",
    "CommandResult",
    "Commands",
    "FileEntry",
    "Files",
    "Hooks",
    "Limits",
    "Pty",
    "Sandbox",
    "SandboxState",
    "SnapshotInfo",
]
