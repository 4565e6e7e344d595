"""Lifecycle events of the compute layer, for layers above (the audit log) to observe.

The compute layer never imports the layers above; they register a listener.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

Listener = Callable[[str, str, dict[str, Any]], None]
_listeners: list[Listener] = []
log = logging.getLogger("corral.compute")


def add_listener(fn: Listener) -> None:
    """Call ``fn(event, sandbox_id, details)`` for every compute event in this process."""
    if fn not in _listeners:
        _listeners.append(fn)


def remove_listener(fn: Listener) -> None:
    if fn in _listeners:
        _listeners.remove(fn)


def emit(event: str, sandbox_id: str, **details: Any) -> None:
    for fn in list(_listeners):
        try:
            fn(event, sandbox_id, details)
        except Exception:  # a broken observer must not break a sandbox operation
            log.exception("event listener failed for %s", event)
