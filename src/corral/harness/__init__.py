"""Layer 4: harness adapters that start agent CLIs inside sandboxes.

``get_harness(name, options)`` returns an adapter; every adapter speaks the
interface of ``corral.harness.base`` and reports ``corral.harness.events``.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from corral.errors import ConfigError
from corral.harness.base import AgentContext, Harness, Launch, Prompt, Turn
from corral.harness.events import Event, EventKind, EventLog, iter_events

#: harness name -> "module:Class"; adapters not installed fail with a clear error
ADAPTERS: dict[str, str] = {
    "command": "corral.harness.command:Command",
    "scripted": "corral.harness.scripted:Scripted",
    "claude-code": "corral.harness.claude_code:ClaudeCode",
    "codex": "corral.harness.codex:Codex",
    "aider": "corral.harness.aider:Aider",
}


def get_harness(name: str, options: Mapping[str, Any] | None = None) -> Harness:
    """The adapter called ``name``; raises ``ConfigError`` for an unknown one."""
    target = ADAPTERS.get(name)
    if target is None:
        raise ConfigError(f"agents.harness: unknown harness {name!r} "
                          f"(one of {', '.join(sorted(ADAPTERS))})")
    module, _, cls = target.partition(":")
    try:
        mod = importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"agents.harness: the {name} adapter is not available") from None
    adapter = getattr(mod, cls)
    if not (isinstance(adapter, type) and issubclass(adapter, Harness)):
        raise ConfigError(f"agents.harness: {target} is not a Harness")
    return adapter(options)


__all__ = [
    "ADAPTERS",
    "AgentContext",
    "Event",
    "EventKind",
    "EventLog",
    "Harness",
    "Launch",
    "Prompt",
    "Turn",
    "get_harness",
    "iter_events",
]
