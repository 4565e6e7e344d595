"""The agent CLIs corral knows, at the versions it was tested with: the one place
where those versions live.

``corral doctor`` warns when the copy an adapter would use is not the pinned
version; ``corral.harness.install`` installs exactly these. A newer CLI often
works, but its flags and output formats are what the adapters parse, so a
version bump goes with a fresh capture of ``tests/harness/fixtures``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from corral.errors import UsageError


@dataclass(frozen=True)
class Pin:
    """One agent CLI: where it comes from and what its command is called."""

    #: the adapter's name (``agents.harness`` in corral.yaml)
    name: str
    #: the registry it is installed from
    kind: Literal["npm", "pypi"]
    package: str
    version: str
    #: the command the package installs
    binary: str

    @property
    def spec(self) -> str:
        """What the registry's client is given: ``pkg@1.2.3`` or ``pkg==1.2.3``."""
        return f"{self.package}@{self.version}" if self.kind == "npm" else \
            f"{self.package}=={self.version}"


PINS: dict[str, Pin] = {
    "claude-code": Pin("claude-code", "npm", "@anthropic-ai/claude-code", "2.1.197", "claude"),
    "codex": Pin("codex", "npm", "@openai/codex", "0.171.0", "codex"),
    "aider": Pin("aider", "pypi", "aider-chat", "0.86.2", "aider"),
}


def pin_for(name: str) -> Pin:
    """The pin of adapter ``name``; raises ``UsageError`` naming the known ones."""
    try:
        return PINS[name]
    except KeyError:
        raise UsageError(f"unknown agent CLI {name!r}; known: {', '.join(sorted(PINS))}") \
            from None
