"""A virtual clock: time moves only when a test says so.

    clock = VirtualClock()
    orch = Orchestrator(..., clock=clock)
    clock.advance(601)        # ten minutes of silence, in no time at all

``wait`` returns as soon as its event is set or the virtual deadline passes; it
never waits longer than ``real_poll`` seconds of real time per call, so loops
that also poll real things (an agent's output) keep running.
"""

from __future__ import annotations

import threading


class VirtualClock:
    """A ``corral.orchestrator.clock.Clock`` whose time is advanced by hand."""

    def __init__(self, start: float = 1000.0, *, real_poll: float = 0.02) -> None:
        self._now = start
        self._cond = threading.Condition()
        self.real_poll = real_poll

    def now(self) -> float:
        with self._cond:
            return self._now

    def advance(self, seconds: float) -> None:
        """Move time forward; every ``wait`` whose deadline passed returns."""
        if seconds < 0:
            raise ValueError("time does not go backwards")
        with self._cond:
            self._now += seconds
            self._cond.notify_all()

    def wait(self, event: threading.Event, timeout: float) -> bool:
        with self._cond:
            deadline = self._now + max(0.0, timeout)
            if not event.is_set() and self._now < deadline:
                self._cond.wait(self.real_poll)
        return event.is_set()
