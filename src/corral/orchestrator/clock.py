"""The orchestrator's notion of time, so timeouts and stuck detection are testable.

Everything that decides *when* (silence, retry backoff, turn timeouts) asks a
``Clock``; polling the agent's output always uses short real sleeps. Tests use
``corral.testing.clock.VirtualClock`` and move time on by hand.
"""

from __future__ import annotations

import threading
import time
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float:
        """Seconds on a monotonic scale."""
        ...

    def wait(self, event: threading.Event, timeout: float) -> bool:
        """Wait for ``event`` at most ``timeout`` seconds of this clock; True if set."""
        ...


class SystemClock:
    """Real time (``time.monotonic``)."""

    def now(self) -> float:
        return time.monotonic()

    def wait(self, event: threading.Event, timeout: float) -> bool:
        return event.wait(max(0.0, timeout))
